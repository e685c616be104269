"""The stages' losses: binary cross-entropy (stage 1) and sigmoid focal loss (stage 2), from Keras built-ins.

The paper's FocalLoss(alpha=1, gamma=2) is the mean over images and labels of (1 - p_t)^gamma * BCE: Keras'
`BinaryFocalCrossentropy(gamma=2)` without class balancing computes exactly that (its alpha is a class weight,
used only with apply_class_balancing).
"""

DEFAULT_BALANCING_ALPHA = 0.25  # Lin et al. 2017, when loss.apply_class_balancing is on and loss.alpha is null


def loss_kind(config, stage):
    """"bce" or "focal": loss.kind, else the stage's (1: bce, 2: focal)."""
    return config.loss.kind or ("bce" if int(stage) == 1 else "focal")


def make_loss(config, stage):
    """`BinaryCrossentropy` or `BinaryFocalCrossentropy` (Lin et al. 2017) as `loss_kind` says, with gamma / class
    balancing / label smoothing from `config.loss`."""
    import keras

    if loss_kind(config, stage) == "bce":
        return keras.losses.BinaryCrossentropy(label_smoothing=config.loss.label_smoothing)
    balancing = bool(config.loss.apply_class_balancing)
    alpha = DEFAULT_BALANCING_ALPHA if config.loss.alpha is None or not balancing else config.loss.alpha
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=balancing, alpha=alpha, gamma=config.loss.gamma,
                                               label_smoothing=config.loss.label_smoothing)
