"""The optimiser factory (optim.optimizer + schedule) and backbone freezing of a training phase."""

import math

HEAD_LAYERS = ("avg_pool", "head_dropout", "predictions")


def make_schedule(optim, total_steps):
    """The learning rate: a number (plateau and constant schedules; reduce-on-plateau lowers it in place) or a
    keras schedule over `total_steps` optimiser steps (cosine)."""
    import keras

    if optim.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(optim.lr, decay_steps=max(1, total_steps),
                                                      alpha=optim.cosine_alpha)
    return optim.lr


def make_optimizer(optim, total_steps):
    """A fresh keras optimiser for config.optim (adam | adamw | sgd, clipnorm) with its schedule."""
    import keras

    lr = make_schedule(optim, total_steps)
    kw = {"clipnorm": optim.clipnorm} if optim.clipnorm else {}
    if optim.optimizer == "adam":
        return keras.optimizers.Adam(lr, **kw)
    if optim.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=optim.weight_decay, **kw)
    return keras.optimizers.SGD(lr, momentum=optim.momentum, nesterov=optim.nesterov, **kw)


def is_backbone(layer):
    """A layer of the pretrained backbone: it has weights and is none of the added layers (LKA blocks, attention
    gates, the patient branch, the head: `cxrkeras.models.parts`)."""
    from cxrkeras.models.parts import is_added

    return bool(layer.weights) and not is_added(layer)


def set_backbone_trainable(model, trainable):
    """Freeze/unfreeze the backbone: every layer with weights except the added ones (LKA, gates, patient, head)."""
    for layer in model.layers:
        if is_backbone(layer):
            layer.trainable = trainable


def count_params(variables):
    return int(sum(math.prod(v.shape) for v in variables))
