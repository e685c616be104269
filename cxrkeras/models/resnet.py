"""ResNet-50 features with keras.applications' layer names (its ImageNet weights load by name): the baseline of the
attention study. As keras.applications' ResNet50 (v1): the stride sits on each stage's first 1x1 convolution and
every convolution has a bias (torchvision's ResNet-50 v1.5 strides the 3x3 convolution instead)."""

import keras

from cxrkeras.models.batchnorm import apply_batch_norm
from cxrkeras.models.placement import AFTER, apply_lka, resolve_placement

RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck filters, blocks) of conv2_x ... conv5_x
NAMED_PLACEMENTS = {"last2": (3, 4), "full": (1, 2, 3, 4)}
MIN_INPUT_SIZE = 32  # stride-2 stem + max-pool + three stride-2 stages: 32 px leaves a 1x1 map
KERAS_BN = dict(epsilon=1.001e-5, momentum=0.99)  # keras.applications' ResNet50


def apply_bottleneck(x, filters, stride, conv_shortcut, name, bn=KERAS_BN):
    """keras.applications' `residual_block_v1`: 1x1 (stride) -> 3x3 -> 1x1 (4x filters), plus the shortcut."""
    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = apply_batch_norm(shortcut, bn, f"{name}_0_bn")
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(apply_batch_norm(x, bn, f"{name}_1_bn"))
    x = keras.layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(apply_batch_norm(x, bn, f"{name}_2_bn"))
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = apply_batch_norm(x, bn, f"{name}_3_bn")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def apply_resnet50_features(x, lka_blocks="none", lka_form="lka", width_multiplier=1.0, bn=KERAS_BN):
    """ResNet-50 features up to conv5_block3_out; returns (tensor, feature_layer_name). LKA block b sits after
    stage b (conv{b+1}_x), "after" after the last stage."""
    positions = resolve_placement(lka_blocks, len(RESNET50_STAGES), NAMED_PLACEMENTS, "ResNet50")
    width = lambda n: max(1, round(n * width_multiplier))  # noqa: E731
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = keras.layers.Conv2D(width(64), 7, strides=2, name="conv1_conv")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(apply_batch_norm(x, bn, "conv1_bn"))
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    feature_layer = None
    for stage, (filters, blocks) in enumerate(RESNET50_STAGES, start=1):
        for i in range(1, blocks + 1):
            name = f"conv{stage + 1}_block{i}"
            stride = (1 if stage == 1 else 2) if i == 1 else 1
            x = apply_bottleneck(x, width(filters), stride, i == 1, name, bn=bn)
        feature_layer = f"conv{stage + 1}_block{blocks}_out"
        if stage in positions:
            feature_layer = f"conv{stage + 1}_lka"
            x = apply_lka(x, lka_form, name=feature_layer)
    if AFTER in positions:
        feature_layer = "lka_after"
        x = apply_lka(x, lka_form, name=feature_layer)
    return x, feature_layer
