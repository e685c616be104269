"""EfficientNet-B2 features with keras.applications' layer names (its ImageNet weights load by name), and the
sequence head of the lightweight pneumothorax classifier: the feature map as H*W tokens -> LSTM -> self-attention.

As keras.applications' EfficientNet, less its input layers (Rescaling 1/255, Normalization and, for ImageNet
weights, a second Rescaling): their composition is (x / 255 - ImageNet mean) / ImageNet std, the "torch"
normalisation the project's one Preprocessor already applies, so the model does not normalise a second time.
"""

import math

import keras

from cxrkeras.models.batchnorm import apply_batch_norm

# keras.applications.efficientnet.DEFAULT_BLOCKS_ARGS: (kernel, repeats, filters_in, filters_out, expand, stride)
BLOCKS = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))
SE_RATIO = 0.25
B2 = dict(width=1.1, depth=1.2)  # EfficientNet-B2's width and depth coefficients (default size 260)
DROP_CONNECT = 0.2  # keras.applications' drop_connect_rate
KERAS_BN = dict(epsilon=1e-3, momentum=0.99)  # keras.applications' EfficientNet: BatchNormalization's defaults
MIN_INPUT_SIZE = 32  # five stride-2 stages
FEATURE_LAYER = "top_activation"  # the last convolutional feature map (Grad-CAM's default layer)
_INIT = {"class_name": "VarianceScaling", "config": {"scale": 2.0, "mode": "fan_out",
                                                    "distribution": "truncated_normal"}}


def round_filters(filters, width, divisor=8):
    """keras.applications' round_filters: scale, round to a multiple of 8, never more than 10% down."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


def _pad(x, kernel):
    """keras.applications' imagenet_utils.correct_pad for channels-last inputs."""
    size = x.shape[1:3]
    adjust = (1 - size[0] % 2, 1 - size[1] % 2)
    c = kernel // 2
    return ((c - adjust[0], c), (c - adjust[1], c))


def apply_mbconv(x, filters_in, filters_out, kernel, stride, expand, drop_rate, name, bn=KERAS_BN):
    """keras.applications' EfficientNet `block`: expand 1x1 -> depthwise -> squeeze-excite -> project 1x1 (+ skip)."""
    inputs = x
    filters = filters_in * expand
    if expand != 1:
        x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False, kernel_initializer=_INIT,
                                name=f"{name}expand_conv")(x)
        x = apply_batch_norm(x, bn, f"{name}expand_bn")
        x = keras.layers.Activation("swish", name=f"{name}expand_activation")(x)
    if stride == 2:
        x = keras.layers.ZeroPadding2D(padding=_pad(x, kernel), name=f"{name}dwconv_pad")(x)
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="valid" if stride == 2 else "same",
                                     use_bias=False, depthwise_initializer=_INIT, name=f"{name}dwconv")(x)
    x = keras.layers.Activation("swish", name=f"{name}activation")(apply_batch_norm(x, bn, f"{name}bn"))
    se = keras.layers.GlobalAveragePooling2D(name=f"{name}se_squeeze")(x)
    se = keras.layers.Reshape((1, 1, filters), name=f"{name}se_reshape")(se)
    se = keras.layers.Conv2D(max(1, int(filters_in * SE_RATIO)), 1, padding="same", activation="swish",
                             kernel_initializer=_INIT, name=f"{name}se_reduce")(se)
    se = keras.layers.Conv2D(filters, 1, padding="same", activation="sigmoid", kernel_initializer=_INIT,
                             name=f"{name}se_expand")(se)
    x = keras.layers.multiply([x, se], name=f"{name}se_excite")
    x = keras.layers.Conv2D(filters_out, 1, padding="same", use_bias=False, kernel_initializer=_INIT,
                            name=f"{name}project_conv")(x)
    x = apply_batch_norm(x, bn, f"{name}project_bn")
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = keras.layers.add([x, inputs], name=f"{name}add")
    return x


def apply_efficientnet_features(x, width_multiplier=1.0, bn=KERAS_BN, width=B2["width"], depth=B2["depth"]):
    """EfficientNet (B2 by default) features up to top_activation; returns (tensor, feature_layer_name).
    width_multiplier scales B2's width coefficient (thin test models)."""
    width = width * width_multiplier
    x = keras.layers.ZeroPadding2D(padding=_pad(x, 3), name="stem_conv_pad")(x)
    x = keras.layers.Conv2D(round_filters(32, width), 3, strides=2, padding="valid", use_bias=False,
                            kernel_initializer=_INIT, name="stem_conv")(x)
    x = keras.layers.Activation("swish", name="stem_activation")(apply_batch_norm(x, bn, "stem_bn"))
    repeats = [int(math.ceil(depth * r)) for _, r, *_ in BLOCKS]
    total, b = float(sum(repeats)), 0
    for i, ((kernel, _, f_in, f_out, expand, stride), n) in enumerate(zip(BLOCKS, repeats)):
        f_in, f_out = round_filters(f_in, width), round_filters(f_out, width)
        for j in range(n):
            x = apply_mbconv(x, f_in if j == 0 else f_out, f_out, kernel, stride if j == 0 else 1, expand,
                             DROP_CONNECT * b / total, f"block{i + 1}{chr(j + 97)}_", bn=bn)
            b += 1
    x = keras.layers.Conv2D(round_filters(1280, width), 1, padding="same", use_bias=False, kernel_initializer=_INIT,
                            name="top_conv")(x)
    x = keras.layers.Activation("swish", name=FEATURE_LAYER)(apply_batch_norm(x, bn, "top_bn"))
    return x, FEATURE_LAYER


from cxrkeras.models.parts import SEQUENCE_PREFIX  # noqa: E402  (the head's layers: none is in a weight file)


def apply_sequence_attention(x, lstm_units=256, heads=4, key_dim=64, name=SEQUENCE_PREFIX):
    """A (B, H, W, C) map as H*W tokens -> LSTM (return sequences) -> multi-head self-attention -> mean over tokens:
    (B, lstm_units)."""
    h, w, c = (int(v) for v in x.shape[1:])
    x = keras.layers.Reshape((h * w, c), name=f"{name}tokens")(x)
    x = keras.layers.LSTM(lstm_units, return_sequences=True, name=f"{name}lstm")(x)
    x = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=key_dim, name=f"{name}mha")(x, x)
    return keras.layers.GlobalAveragePooling1D(name=f"{name}pool")(x)
