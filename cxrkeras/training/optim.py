"""The optimiser factory (optim.optimizer + schedule), layer groups with their learning rates, and backbone
freezing of a training phase.

Layer groups follow fastai's `vision_learner` split of torchvision's backbones (fastai/vision/learner.py:
`_densenet_split` cuts `features` at index 7, before transition 2; `_vgg_split` at index 22, after block 3;
`_resnet_split` before layer3), and the added layers (LKA blocks, attention gates, the patient branch, the head)
form the last group: [early backbone, late backbone, added layers + head].
"""

import math

from cxrkeras.errors import ConfigError
from cxrkeras.models.parts import HEAD_LAYERS  # noqa: F401 (its old home)

GROUP_NAMES = ("early backbone", "late backbone", "added layers (LKA, gates, patient branch) + head")
# the first layer of the late-backbone group: DenseNet's transition 2 (torchvision features[7], Keras "pool3_*"),
# VGG's block 4 (features[22:] holds block 3's last ReLU, which has no weights, then blocks 4 and 5), ResNet's
# layer3 (`_resnet_split`: children [:6] = conv1 .. layer2; Keras "conv4_block*"); EfficientNet-B2's first stride-16
# stage (block4a, as ResNet's layer3 is its first stride-16 stage)
LATE_GROUP_START = {"densenet121": "pool3_", "vgg16": "block4_", "resnet50": "conv4_", "efficientnetb2": "block4"}


def make_schedule(optim, total_steps, lr=None, pct_start=None, div=None, first_step=0):
    """The learning rate: a number (plateau and constant schedules; reduce-on-plateau lowers it in place) or a
    keras schedule over `total_steps` optimiser steps (cosine; one_cycle, starting at step `first_step`).
    `lr`, `pct_start`, `div`: the phase's values (default: optim.lr and the one-cycle defaults)."""
    import keras

    from cxrkeras.training.schedules import ONE_CYCLE_DEFAULTS, one_cycle_lr

    lr = optim.lr if lr is None else lr
    if optim.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps), alpha=optim.cosine_alpha)
    if optim.schedule == "one_cycle":
        return one_cycle_lr(lr, total_steps, _or(pct_start, optim.pct_start, ONE_CYCLE_DEFAULTS["pct_start"]),
                            _or(div, optim.div, ONE_CYCLE_DEFAULTS["div"]), optim.div_final, first_step)
    return lr


def _or(*values):
    return next(v for v in values if v is not None)


def make_optimizer(optim, total_steps, lr=None, lr_multipliers=None, no_decay=(), pct_start=None, div=None,
                   first_step=0):
    """A fresh keras optimiser for config.optim with its schedule: `GroupAdam` for adam / adamw (per-variable
    learning-rate multipliers `lr_multipliers` {path: m}, decoupled weight decay sparing the paths in `no_decay`,
    beta_1 cycled by the one-cycle schedule when optim.moms is set), keras SGD for sgd."""
    import keras

    from cxrkeras.training.adam import GroupAdam
    from cxrkeras.training.schedules import ONE_CYCLE_DEFAULTS, one_cycle_beta_1

    schedule = make_schedule(optim, total_steps, lr, pct_start, div, first_step)
    kw = {"clipnorm": optim.clipnorm} if optim.clipnorm else {}
    if optim.optimizer == "sgd":
        if lr_multipliers and any(m != 1.0 for m in lr_multipliers.values()):
            raise ConfigError("layer-group learning rates (optim.lr_low, train.recipe: fine_tune) need optim.optimizer "
                              "adam or adamw")
        return keras.optimizers.SGD(schedule, momentum=optim.momentum, nesterov=optim.nesterov, **kw)
    beta_1 = optim.beta_1
    if optim.schedule == "one_cycle" and optim.moms:
        beta_1 = one_cycle_beta_1(optim.moms, total_steps,
                                  _or(pct_start, optim.pct_start, ONE_CYCLE_DEFAULTS["pct_start"]), first_step)
    return GroupAdam(schedule, beta_1=beta_1, beta_2=optim.beta_2, epsilon=optim.epsilon, eps_style=optim.eps_style,
                     weight_decay=optim.weight_decay if optim.optimizer == "adamw" else None,
                     lr_multipliers=lr_multipliers, no_decay=no_decay, **kw)


# --- layer groups ---


def is_backbone(layer):
    """A layer of the pretrained backbone: it has weights and is none of the added layers (LKA blocks, attention
    gates, the patient branch, the head: `cxrkeras.models.parts`)."""
    from cxrkeras.models.parts import is_added

    return bool(layer.weights) and not is_added(layer)


def layer_groups(model):
    """[[layer, ...] x 3]: early backbone, late backbone, the added layers (LKA, attention gates, patient branch,
    head), each with the layers that have weights, in model order."""
    from cxrkeras.models import model_info
    from cxrkeras.models.parts import is_added
    from cxrkeras.models.registry import get_variant

    try:
        backbone = get_variant(model_info(model)["variant"]).backbone
    except Exception as exc:  # not a cxrkeras model
        raise ConfigError(f"layer groups need a cxrkeras model (its variant tells the backbone): {exc}") from exc
    start = LATE_GROUP_START[backbone]
    groups, late = ([], [], []), False
    for layer in model.layers:
        if not layer.weights:
            continue
        late = late or layer.name.startswith(start)
        groups[2 if is_added(layer) else 1 if late else 0].append(layer)
    return [list(g) for g in groups]


def group_multipliers(model, group_lrs, base_lr):
    """{variable path: group lr / base_lr} for every trainable variable of the model's layer groups."""
    out = {}
    for layers, lr in zip(layer_groups(model), group_lrs):
        for layer in layers:
            for v in layer.trainable_weights:
                out[v.path] = float(lr) / float(base_lr)
    return out


def norm_and_bias_paths(model):
    """Paths of batch-norm variables and of every bias: what fastai spares from weight decay (wd_bn_bias=False)."""
    import keras

    out = []
    for layer in model.layers:
        bn = isinstance(layer, keras.layers.BatchNormalization)
        out += [v.path for v in layer.weights if bn or v.path.rsplit("/", 1)[-1] == "bias"]
    return out


# --- freezing ---


def set_backbone_trainable(model, trainable, train_bn=False):
    """Freeze/unfreeze the backbone: every layer with weights except the added ones (LKA, gates, patient, head).

    train_bn: batch-norm layers stay trainable when the backbone is frozen (fastai's `train_bn=True`): their scale
    and offset are trained and, since a trainable Keras BatchNormalization runs in training mode, they normalise
    with batch statistics and keep updating their moving mean and variance. Without it, a frozen Keras BN layer
    runs in inference mode (moving statistics, no updates)."""
    import keras

    for layer in model.layers:
        if is_backbone(layer):
            keep = train_bn and isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = bool(trainable or keep)


def count_params(variables):
    return int(sum(math.prod(v.shape) for v in variables))
