"""Multiply-add count of a model's graph for one image (the paper's "GFLOPs")."""

import math

import keras

from cxrkeras.models.lka import LargeKernelAttention


def _hwc(shape):
    return math.prod(int(v) for v in shape[1:])


def layer_multiply_adds(layer, include_bn=False):
    """Multiply-adds of one layer for one input image.

    Convention (as torchvision-era counters such as thop report "FLOPs" = MACs): convolutions, depthwise
    convolutions, dense layers and the LKA gating product count one per multiply-add; biases, activations, pooling
    and concatenation count nothing; batch norm counts nothing unless `include_bn` (it folds into the preceding
    convolution at inference), then one per element.
    """
    if isinstance(layer, LargeKernelAttention):
        return layer.multiply_adds(layer.input.shape[1:])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return _hwc(layer.output.shape) * kh * kw
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = int(layer.input.shape[-1]) // layer.groups
        return _hwc(layer.output.shape) * kh * kw * cin
    if isinstance(layer, keras.layers.Dense):
        return _hwc(layer.input.shape) * layer.units
    if include_bn and isinstance(layer, keras.layers.BatchNormalization):
        return _hwc(layer.output.shape)
    return 0


def count_multiply_adds(model, include_bn=False):
    """Total multiply-adds of a functional model per image (its input shape must be fully defined)."""
    return sum(layer_multiply_adds(layer, include_bn) for layer in model.layers)


def gflops(model, include_bn=False):
    return count_multiply_adds(model, include_bn) / 1e9


def trainable_params(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)
