"""Dice and IoU of binary masks (per image, then summarised per split), and the BCE + Dice training loss."""

import numpy as np


def dice_iou(pred, truth):
    """Per-image (dice [N], iou [N]) of boolean masks (N, H, W); an image where both are empty scores 1."""
    pred = np.asarray(pred, bool).reshape(len(pred), -1)
    truth = np.asarray(truth, bool).reshape(len(truth), -1)
    inter = np.logical_and(pred, truth).sum(axis=1).astype(np.float64)
    total = pred.sum(axis=1) + truth.sum(axis=1)
    union = np.logical_or(pred, truth).sum(axis=1)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dice, iou


def summarise(dice, iou):
    """{n, dice_mean, dice_median, dice_min, iou_mean, iou_median} of one split (empty split: n 0 only)."""
    if len(dice) == 0:
        return dict(n=0)
    return dict(n=int(len(dice)), dice_mean=float(np.mean(dice)), dice_median=float(np.median(dice)),
                dice_min=float(np.min(dice)), iou_mean=float(np.mean(iou)), iou_median=float(np.median(iou)))


def bce_dice_loss(y_true, y_pred, smooth=1.0):
    """Binary cross-entropy + (1 - soft Dice of each image), averaged over the batch."""
    import keras
    from keras import ops

    bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    axes = (1, 2, 3)
    inter = ops.sum(y_true * y_pred, axis=axes)
    dice = (2.0 * inter + smooth) / (ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes) + smooth)
    return bce + 1.0 - dice
