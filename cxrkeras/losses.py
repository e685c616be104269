"""The stages' losses: binary cross-entropy (stage 1) and sigmoid focal loss (stage 2), from Keras built-ins; for a
Feature Pyramid Sum head, the sum of that loss over the pyramid levels (`PyramidLoss`).

The paper's FocalLoss(alpha=1, gamma=2) is the mean over images and labels of (1 - p_t)^gamma * BCE: Keras'
`BinaryFocalCrossentropy(gamma=2)` without class balancing computes exactly that (its alpha is a class weight,
used only with apply_class_balancing).
"""

import keras

DEFAULT_BALANCING_ALPHA = 0.25  # Lin et al. 2017, when loss.apply_class_balancing is on and loss.alpha is null


def loss_kind(config, stage):
    """"bce" or "focal": loss.kind, else the stage's (1: bce, 2: focal)."""
    return config.loss.kind or ("bce" if int(stage) == 1 else "focal")


def make_loss(config, stage):
    """`BinaryCrossentropy` or `BinaryFocalCrossentropy` (Lin et al. 2017) as `loss_kind` says, with gamma / class
    balancing / label smoothing from `config.loss`. A run with `head: fpsm` (merge sum) gets that loss summed over
    its pyramid levels."""
    from cxrkeras.models.fpsm import loss_levels

    if loss_kind(config, stage) == "bce":
        base = keras.losses.BinaryCrossentropy(label_smoothing=config.loss.label_smoothing)
    else:
        balancing = bool(config.loss.apply_class_balancing)
        alpha = DEFAULT_BALANCING_ALPHA if config.loss.alpha is None or not balancing else config.loss.alpha
        base = keras.losses.BinaryFocalCrossentropy(apply_class_balancing=balancing, alpha=alpha,
                                                   gamma=config.loss.gamma,
                                                   label_smoothing=config.loss.label_smoothing)
    levels = loss_levels(config.model.overrides)
    return PyramidLoss(keras.losses.serialize(base), len(levels)) if levels else base


@keras.saving.register_keras_serializable(package="cxrkeras")
class PyramidLoss(keras.losses.Loss):
    """The FPSM training loss: sum over the levels of `base` (a serialized Keras loss: BCE or focal) on each level's
    logits.

    y_pred [batch, levels, labels]: the per-level logits a `PyramidSum` head gives in training -> sum_s base(y, z_s)
    (computed from logits, numerically stable). y_pred [batch, labels]: the model's probabilities (what the
    validation callback scores) -> levels x base(y, p), the loss of the summed prediction on the training loss's
    scale (the per-level logits exist only inside `fit`); predicting 0.5 thus costs levels x the base loss of 0.5.
    """

    def __init__(self, base, levels, name="pyramid_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.base = dict(base)
        self.levels = int(levels)
        loss = keras.losses.deserialize(self.base)
        config = {k: v for k, v in loss.get_config().items() if k not in ("name", "reduction", "dtype")}
        self._on_logits = type(loss)(**{**config, "from_logits": True}, reduction=None)
        self._on_probs = type(loss)(**{**config, "from_logits": False}, reduction=None)

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        if len(y_pred.shape) == 3:
            return sum(self._on_logits(y_true, y_pred[:, s]) for s in range(int(y_pred.shape[1])))
        return self.levels * self._on_probs(y_true, y_pred)

    def get_config(self):
        return {**super().get_config(), "base": dict(self.base), "levels": self.levels}
