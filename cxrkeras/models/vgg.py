"""VGG16 features (plain, keras.applications layer names, or with batch norm as in the paper) with LKA blocks."""

import keras

from cxrkeras.models.batchnorm import apply_batch_norm
from cxrkeras.models.placement import AFTER, apply_lka, resolve_placement

VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
NAMED_PLACEMENTS = {"last3": (3, 4, 5), "full": (1, 2, 3, 4, 5)}
MIN_INPUT_SIZE = 32  # five 2x2 max-pools
TORCH_BN = dict(epsilon=1e-5, momentum=0.9)  # torchvision's vgg16_bn (PyTorch momentum 0.1 = Keras 0.9)


def apply_conv(x, filters, batch_norm, name, bn=TORCH_BN):
    """3x3 conv + ReLU; with batch_norm, conv(bias) -> BN -> ReLU as torchvision's vgg16_bn."""
    if not batch_norm:
        return keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=name)(x)
    x = keras.layers.Conv2D(filters, 3, padding="same", name=name)(x)
    x = apply_batch_norm(x, bn, f"{name}_bn")
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def apply_vgg_block(x, filters, num_convs, batch_norm, name, bn=TORCH_BN):
    for i in range(num_convs):
        x = apply_conv(x, filters, batch_norm, name=f"{name}_conv{i + 1}", bn=bn)
    return x


def apply_vgg_features(x, lka_blocks="none", lka_form="lka", batch_norm=True, width_multiplier=1.0, bn=TORCH_BN):
    """VGG16 features; returns (tensor, feature_layer_name).

    As the paper's modules: block b (a slice of torchvision's `vgg16_bn().features`: conv+BN+ReLU) -> its LKA ->
    its max-pool; "after" sits after block5_pool, i.e. after the whole feature extractor.
    """
    positions = resolve_placement(lka_blocks, len(VGG16_BLOCKS), NAMED_PLACEMENTS, "VGG16")
    last_conv = last_lka = None
    for b, (filters, num_convs) in enumerate(VGG16_BLOCKS, start=1):
        x = apply_vgg_block(x, max(1, round(filters * width_multiplier)), num_convs, batch_norm, name=f"block{b}",
                            bn=bn)
        last_conv = f"block{b}_conv{num_convs}" + ("_relu" if batch_norm else "")
        if b in positions:
            last_lka = f"block{b}_lka"
            x = apply_lka(x, lka_form, name=last_lka)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)
    if AFTER in positions:
        last_lka = "lka_after"
        x = apply_lka(x, lka_form, name=last_lka)
    return x, last_lka or last_conv
