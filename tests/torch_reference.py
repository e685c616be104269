"""Plain-PyTorch references for the equivalence tests: torchvision's DenseNet121 and VGG16-BN, written out here (no
torchvision: its wheels do not import with the CPU torch build), and the paper's six LKA modules as its notebooks
define them (module names, forward order, dropout 0.5). `width` and `blocks` make thin copies for fast tests; at
their defaults the networks are the full ones."""

from collections import OrderedDict

try:
    import torch
except ImportError as exc:  # the tests must fail, not skip, without torch
    raise ImportError("the PyTorch equivalence tests need torch: `pip install -e '.[dev]'` installs torch==2.13.0 "
                      "(CPU build without the CUDA download: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)"
                      ) from exc
from torch import nn
from torch.nn import functional as F

# one thread: on 2 cores shared with TensorFlow and the background checks (tests/background_helpers.py), torch's
# 2-thread OpenMP convolutions wait on each other and run 2-10x slower than on one thread (measured on a DenseNet121
# forward pass); the references' results do not depend on it
torch.set_num_threads(1)

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
DENSENET121_BLOCKS = (6, 12, 24, 16)


# --- torchvision's networks (module names and forward as torchvision.models.densenet / vgg) ---

class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers, cin, growth):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, stride=2)


def densenet_features(width=1.0, blocks=DENSENET121_BLOCKS):
    growth, channels = max(1, round(32 * width)), max(1, round(64 * width))
    layers = OrderedDict(conv0=nn.Conv2d(3, channels, 7, stride=2, padding=3, bias=False),
                         norm0=nn.BatchNorm2d(channels), relu0=nn.ReLU(inplace=True),
                         pool0=nn.MaxPool2d(3, stride=2, padding=1))
    for b, num_layers in enumerate(blocks, start=1):
        layers[f"denseblock{b}"] = DenseBlock(num_layers, channels, growth)
        channels += num_layers * growth
        if b < len(blocks):
            layers[f"transition{b}"] = Transition(channels, channels // 2)
            channels //= 2
    layers["norm5"] = nn.BatchNorm2d(channels)
    return nn.Sequential(layers), channels


def densenet_dims(width=1.0, blocks=DENSENET121_BLOCKS):
    """Channels after each dense block (the paper's LKA dims: 256, 512, 1024, 1024)."""
    growth, channels, dims = max(1, round(32 * width)), max(1, round(64 * width)), []
    for b, num_layers in enumerate(blocks, start=1):
        channels += num_layers * growth
        dims.append(channels)
        if b < len(blocks):
            channels //= 2
    return dims


class DenseNet121(nn.Module):
    """torchvision's DenseNet forward: features -> ReLU -> adaptive average pool -> classifier (CheXNet's head)."""

    def __init__(self, num_classes=14, width=1.0, blocks=DENSENET121_BLOCKS):
        super().__init__()
        self.features, channels = densenet_features(width, blocks)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


def vgg16_bn_features(width=1.0):
    layers, cin = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        else:
            cout = max(1, round(v * width))
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
    return nn.Sequential(*layers), cin


class VGG16BN(nn.Module):
    """torchvision's vgg16_bn().features with a CheXNet-style head: adaptive average pool -> Linear."""

    def __init__(self, num_classes=14, width=1.0):
        super().__init__()
        self.features, channels = vgg16_bn_features(width)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), (1, 1)), 1))


# --- the paper's modules (its notebooks' appendix code; torchvision backbones replaced by the ones above) ---

class LKA(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dw_conv1 = nn.Conv2d(dim, dim, kernel_size=5, padding=2, groups=dim)
        self.dw_conv2 = nn.Conv2d(dim, dim, kernel_size=7, padding=9, dilation=3, groups=dim)
        self.pw_conv = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        u = x
        x = self.dw_conv1(x)
        x = self.dw_conv2(x)
        x = self.pw_conv(x)
        return x * u


class PaperDenseNetLKA(nn.Module):
    """DenseNet121_fullLKA: att_block<b> after dense block b (all four, or blocks 3 and 4 for "2 block")."""

    def __init__(self, lka_blocks=(1, 2, 3, 4), num_classes=14, dropout=0.5, width=1.0, blocks=DENSENET121_BLOCKS):
        super().__init__()
        self.features, channels = densenet_features(width, blocks)
        self.lka_blocks = tuple(lka_blocks)
        for b, dim in enumerate(densenet_dims(width, blocks), start=1):
            if b in self.lka_blocks:
                setattr(self, f"att_block{b}", LKA(dim))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        for b in range(1, 5):
            x = getattr(f, f"denseblock{b}")(x)
            if b in self.lka_blocks:
                x = getattr(self, f"att_block{b}")(x)
            if b < 4:
                x = getattr(f, f"transition{b}")(x)
        x = f.norm5(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(self.dropout(x))


class PaperDenseNetLKAAfter(nn.Module):
    """densenet_LKA_after: LKA(features(x)) -> pool -> dropout -> classifier (features end with norm5)."""

    def __init__(self, num_classes=14, dropout=0.5, width=1.0, blocks=DENSENET121_BLOCKS):
        super().__init__()
        self.features, channels = densenet_features(width, blocks)
        self.lka = LKA(channels)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.pool(self.lka(self.features(x))).flatten(1)
        return self.classifier(self.dropout(x))


class PaperVGGLKA(nn.Module):
    """VGG16_LKA: block<b> = nn.Sequential(*vgg16_bn().features[a:b]) -> lka<b> -> F.max_pool2d(2, 2)."""

    SLICES = ((0, 6), (7, 13), (14, 23), (24, 33), (34, 43))

    def __init__(self, lka_blocks=(3, 4, 5), num_classes=14, dropout=0.5, width=1.0):
        super().__init__()
        features, channels = vgg16_bn_features(width)
        self.lka_blocks = tuple(lka_blocks)
        for b, (start, stop) in enumerate(self.SLICES, start=1):
            block = nn.Sequential(*features[start:stop])
            setattr(self, f"block{b}", block)
            if b in self.lka_blocks:
                setattr(self, f"lka{b}", LKA(block[-3].out_channels))
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        for b in range(1, 6):
            x = getattr(self, f"block{b}")(x)
            if b in self.lka_blocks:
                x = getattr(self, f"lka{b}")(x)
            x = F.max_pool2d(x, 2, 2)
        return self.classifier(self.dropout(self.pool(x).flatten(1)))


class PaperVGGLKAAfter(nn.Module):
    """VGG_LKA_after: LKA(vgg16_bn().features(x)) -> pool -> dropout -> classifier."""

    def __init__(self, num_classes=14, dropout=0.5, width=1.0):
        super().__init__()
        self.features, channels = vgg16_bn_features(width)
        self.lka = LKA(channels)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.pool(self.lka(self.features(x))).flatten(1)
        return self.classifier(self.dropout(x))


# --- the attention study's DenseNet-121 with "learn to pay attention" gates (Jetley et al., ICLR 2018) ---

class AttentionDenseNet(nn.Module):
    """Written from the study's definitions, independently of cxrkeras: L1..L3 = the outputs of transitions 1-3,
    g = GAP(ReLU(norm5(features))); att-A ("a"): each L projected by a bias-free 1x1 convolution to g's size,
    c_i = <u, l^_i + g>, g_a = sum_i a_i l^_i; att-B ("b"): c_i = <u, [l_i; g]>, g_a = sum_i a_i l_i; a = softmax
    of c over the pixels; one Linear classifier over the concatenated g_a (dropout before it)."""

    def __init__(self, form, num_classes=15, width=1.0, blocks=DENSENET121_BLOCKS, dropout=0.2):
        super().__init__()
        self.form = form
        self.features, channels = densenet_features(width, blocks)
        local = [d // 2 for d in densenet_dims(width, blocks)[:3]]  # the transitions halve the channels
        for s, c in enumerate(local, start=1):
            if form == "a":
                setattr(self, f"projector{s}", nn.Conv2d(c, channels, 1, bias=False))
                setattr(self, f"u{s}", nn.Linear(channels, 1, bias=False))
            else:
                setattr(self, f"u{s}", nn.Linear(c + channels, 1, bias=False))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(3 * channels if form == "a" else sum(local), num_classes)

    def gates(self, x):
        """(attention weights [N, H*W] per scale, attended vectors [N, C'] per scale)."""
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        local = []
        for b in range(1, 5):
            x = getattr(f, f"denseblock{b}")(x)
            if b < 4:
                x = getattr(f, f"transition{b}")(x)
                local.append(x)
        g = torch.flatten(F.adaptive_avg_pool2d(F.relu(f.norm5(x)), (1, 1)), 1)
        weights, vectors = [], []
        for s, l in enumerate(local, start=1):
            if self.form == "a":
                l = getattr(self, f"projector{s}")(l)
            seq = l.flatten(2).transpose(1, 2)  # N, H*W, C
            gs = g[:, None, :].expand(-1, seq.shape[1], -1)
            c = getattr(self, f"u{s}")(seq + gs if self.form == "a" else torch.cat([seq, gs], dim=2))[..., 0]
            a = torch.softmax(c, dim=1)
            weights.append(a)
            vectors.append((a[..., None] * seq).sum(dim=1))
        return weights, vectors

    def forward(self, x):
        return self.classifier(self.dropout(torch.cat(self.gates(x)[1], dim=1)))


# cxrkeras variant -> (reference factory, is the checkpoint in the paper's layout)
REFERENCES = {
    "densenet121": (lambda **kw: DenseNet121(**kw), False),
    "densenet121-lka-full": (lambda **kw: PaperDenseNetLKA((1, 2, 3, 4), **kw), True),
    "densenet121-lka-last2": (lambda **kw: PaperDenseNetLKA((3, 4), **kw), True),
    "densenet121-lka-after": (lambda **kw: PaperDenseNetLKAAfter(**kw), True),
    "vgg16-bn": (lambda **kw: VGG16BN(**kw), False),
    "vgg16-lka-full": (lambda **kw: PaperVGGLKA((1, 2, 3, 4, 5), **kw), True),
    "vgg16-lka-last3": (lambda **kw: PaperVGGLKA((3, 4, 5), **kw), True),
    "vgg16-lka-after": (lambda **kw: PaperVGGLKAAfter(**kw), True),
}


def randomize(model, seed, calibration_size=(224, 224)):
    """Random weights with non-trivial batch-norm statistics, at a scale where the outputs do not saturate.

    Every parameter is redrawn (LKA kernels scaled so x * attn keeps the activations' scale); then one training-mode
    pass over random images sets each BN's running mean / variance to that batch's statistics (cumulative average),
    and the classifier is rescaled so the logits have a standard deviation near 2.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.2)
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                scale = (2.0 / fan_in) ** 0.5
                if name.split(".")[-1] in ("dw_conv1", "dw_conv2", "pw_conv"):
                    scale = 1.0 / fan_in ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * scale)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative: one pass sets the batch statistics
        model.train()
        model(torch.randn(4, 3, *calibration_size, generator=g))
        for bn in bns:
            bn.momentum = 0.1
        model.eval()
        x = torch.randn(4, 3, *calibration_size, generator=g)
        captured = []
        hook = model.classifier.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        model(x)
        hook.remove()
        feats = captured[0]
        w = torch.randn(model.classifier.weight.shape, generator=g) / (feats.std() * feats.shape[1] ** 0.5 + 1e-12)
        model.classifier.weight.copy_(w * 2.0)
        model.classifier.bias.copy_(-(feats.mean(0) @ model.classifier.weight.T))
    return model
