"""Named model variants (each only sets build arguments) and `build_model`, the one way to make a model."""

import dataclasses

from cxrkeras.errors import ConfigError

PAPER_DROPOUT = 0.5  # nn.Dropout(0.5) before the classifier in all six of the paper's modules


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backbone: str  # "densenet121" | "vgg16" | "resnet50" | "efficientnetb2"
    lka_blocks: object = "none"
    batch_norm: bool = False  # VGG16 only
    description: str = ""
    paper_params: int | None = None  # the paper's trainable parameters at 14 classes (targets of the tests)
    paper_gflops: float | None = None  # the paper's GFLOPs (fvcore's count of its PyTorch modules) at 224x224
    final_relu: bool = False  # DenseNet: ReLU after norm5, as torchvision's DenseNet.forward (the paper has none)
    dropout: float = 0.2  # head dropout rate by default (the paper's code: 0.5)
    attention: str = "none"  # DenseNet: "learn to pay attention" gates on the transitions' outputs, "a" | "b"
    study_params: int | None = None  # the attention study's trainable parameters at 15 classes (its Table 2)
    sequence_head: bool = False  # the feature map's H*W tokens -> LSTM -> multi-head self-attention before the head
    compare_to: str | None = None  # `cxrkeras models` prints the parameter ratio to this variant

    @property
    def preprocessing(self):
        """Input normalisation the initial weights expect: "torch" (RGB, ImageNet mean/std: DenseNet121 and the
        torchvision VGG16-BN) or "caffe" (BGR, mean-subtracted: keras.applications' plain VGG16 and ResNet50)."""
        return "caffe" if self.backbone == "resnet50" or self.backbone == "vgg16" and not self.batch_norm else "torch"

    @property
    def imagenet_source(self):
        """Where weights="imagenet" comes from: "keras" (keras.applications files) or "torchvision" (torchvision's
        vgg16_bn, the only ImageNet VGG16-BN weights, as timm publishes them in safetensors)."""
        return "torchvision" if self.backbone == "vgg16" and self.batch_norm else "keras"


def _variants():
    out = [
        Variant("densenet121", "densenet121", "none", final_relu=True,
                description="DenseNet121 (CheXNet backbone, torchvision's forward)", study_params=6_969_231),
        # the attention study's att-A / att-B: g after norm5 -> ReLU -> GAP (the baseline's forward), gates on the
        # outputs of transitions 1-3, the classifier over the attended vectors
        Variant("densenet121-att-a", "densenet121", "none", final_relu=True, attention="a",
                description="DenseNet121, attention gates att-A (1x1 projections to 1024, <u, l + g>)",
                study_params=7_920_527),
        Variant("densenet121-att-b", "densenet121", "none", final_relu=True, attention="b",
                description="DenseNet121, attention gates att-B (<u, [l; g]>)", study_params=6_971_279),
        Variant("densenet121-lka-after", "densenet121", "after", description="LKA after the final norm (norm5)",
                paper_params=8_095_630, paper_gflops=2.92, dropout=PAPER_DROPOUT),
        Variant("densenet121-lka-last2", "densenet121", "last2", description="LKA after dense blocks 3 and 4",
                paper_params=9_223_054, paper_gflops=3.14, dropout=PAPER_DROPOUT),
        Variant("densenet121-lka-full", "densenet121", "full", description="LKA after dense blocks 1-4",
                paper_params=9_609_870, paper_gflops=3.64, dropout=PAPER_DROPOUT),
        Variant("vgg16-bn", "vgg16", "none", batch_norm=True, description="VGG16 with batch norm"),
        Variant("vgg16-lka-after", "vgg16", "after", batch_norm=True,
                description="VGG16-BN, LKA after the feature extractor", paper_params=15_031_886,
                paper_gflops=15.39, dropout=PAPER_DROPOUT),
        Variant("vgg16-lka-last3", "vgg16", "last3", batch_norm=True,
                description="VGG16-BN, LKA after conv blocks 3-5 (the paper's best)",
                paper_params=15_418_702, paper_gflops=15.93, dropout=PAPER_DROPOUT),
        Variant("vgg16-lka-full", "vgg16", "full", batch_norm=True, description="VGG16-BN, LKA after conv blocks 1-5",
                paper_params=15_453_966, paper_gflops=16.70, dropout=PAPER_DROPOUT),
        Variant("vgg16-plain", "vgg16", "none", description="VGG16 as keras.applications (ImageNet weights)"),
        Variant("resnet50", "resnet50", "none", description="ResNet-50 as keras.applications (the attention "
                "study's baseline)"),
        # the lightweight pneumothorax classifier: EfficientNet-B2 -> LSTM over the spatial tokens -> self-attention
        Variant("efficientnetb2-lstm-mha", "efficientnetb2", "none", sequence_head=True, compare_to="resnet50",
                description="EfficientNet-B2, LSTM over the H*W tokens, multi-head self-attention"),
    ]
    for placement, where in (("after", "after the feature extractor"), ("last3", "after conv blocks 3-5"),
                             ("full", "after conv blocks 1-5")):
        out.append(Variant(f"vgg16-plain-lka-{placement}", "vgg16", placement,
                           description=f"plain VGG16, LKA {where}"))
    return {v.name: v for v in out}


VARIANTS = _variants()


def list_variants():
    """Names of all registered variants, in table order."""
    return list(VARIANTS)


def get_variant(name):
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown model variant {name!r}; valid variants: {', '.join(VARIANTS)}") from None
