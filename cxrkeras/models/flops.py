"""Operation counts of a model's graph for one image: our multiply-adds, and fvcore's count (the paper's "GFLOPs")."""

import math

import keras

from cxrkeras.models.lka import LargeKernelAttention

CONVENTIONS = ("macs", "fvcore")


def _hwc(shape):
    return math.prod(int(v) for v in shape[1:])


def layer_multiply_adds(layer, include_bn=False, convention="macs"):
    """Operations of one layer for one input image.

    "macs": convolutions, depthwise convolutions, dense layers, LSTM gates, multi-head attention (projections and
    both attention products), the attention gates' weighted sums (Dot) and the LKA gating product count one per
    multiply-add; biases, activations, pooling and concatenation count nothing; batch norm counts nothing unless
    `include_bn` (it folds into the preceding convolution at inference), then one per element.
    "fvcore": what fvcore's FlopCountAnalysis reports for the paper's PyTorch modules in eval mode, the paper's
    GFLOPs: convolutions, linear layers and matrix products (the gates' Dot) as multiply-adds, batch norm 2 per
    element, adaptive average pooling
    1 per input element; the LKA product (aten::mul), ReLU, max/avg pooling and concatenation are not counted.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    fvcore = convention == "fvcore"
    if isinstance(layer, LargeKernelAttention):
        return layer.multiply_adds(layer.input.shape[1:], elementwise=not fvcore)
    if isinstance(layer, keras.layers.LSTM):  # four gates' input and recurrent products at every step
        steps, features = (int(v) for v in layer.input.shape[1:])
        return steps * 4 * layer.units * (features + layer.units)
    if isinstance(layer, keras.layers.MultiHeadAttention):  # q/k/v/output projections and the two attention products
        return _attention_multiply_adds(layer)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return _hwc(layer.output.shape) * kh * kw
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        cin = int(layer.input.shape[-1]) // layer.groups
        return _hwc(layer.output.shape) * kh * kw * cin
    if isinstance(layer, keras.layers.Dense):
        return _hwc(layer.input.shape) * layer.units
    if isinstance(layer, keras.layers.Dot):  # the attention gates' weighted sum over the pixels (a batched matmul)
        axis = layer.axes if isinstance(layer.axes, int) else layer.axes[0]
        return _hwc(layer.output.shape) * int(layer.input[0].shape[axis])
    if isinstance(layer, keras.layers.BatchNormalization):
        return 2 * _hwc(layer.output.shape) if fvcore else (_hwc(layer.output.shape) if include_bn else 0)
    if fvcore and isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return _hwc(layer.input.shape)
    return 0


def _attention_multiply_adds(layer):
    query, value = layer.input if isinstance(layer.input, (list, tuple)) else (layer.input, layer.input)
    tq, dq = (int(v) for v in query.shape[1:])
    tv, dv = (int(v) for v in value.shape[1:])
    heads, key, val = layer.num_heads, layer.key_dim, layer.value_dim or layer.key_dim
    out = int(layer.output.shape[-1])
    projections = tq * dq * heads * key + tv * dv * heads * (key + val) + tq * heads * val * out
    return projections + heads * tq * tv * (key + val)


def count_multiply_adds(model, include_bn=False, convention="macs"):
    """Total operations of a functional model per image (its input shape must be fully defined)."""
    return sum(layer_multiply_adds(layer, include_bn, convention) for layer in model.layers)


def gflops(model, include_bn=False):
    """Multiply-adds / 1e9 (convolutions, dense layers and the LKA product)."""
    return count_multiply_adds(model, include_bn) / 1e9


def fvcore_flops(model):
    """fvcore's count / 1e9: the convention of the paper's GFLOPs column (see layer_multiply_adds)."""
    return count_multiply_adds(model, convention="fvcore") / 1e9


def trainable_params(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)
