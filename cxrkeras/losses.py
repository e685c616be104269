"""The two stages' losses: binary cross-entropy (stage 1) and sigmoid focal loss (stage 2), from Keras built-ins."""


def make_loss(config, stage):
    """Stage 1: `BinaryCrossentropy`. Stage 2: `BinaryFocalCrossentropy` (Lin et al. 2017), gamma/alpha/class
    balancing from `config.loss`; alpha only acts with apply_class_balancing, as in Keras."""
    import keras

    if stage == 1:
        return keras.losses.BinaryCrossentropy(label_smoothing=config.loss.label_smoothing)
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=config.loss.apply_class_balancing,
                                               alpha=config.loss.alpha, gamma=config.loss.gamma,
                                               label_smoothing=config.loss.label_smoothing)
