"""A Keras U-Net for lung masks (Ronneberger et al. 2015, with batch norm and 'same' padding): `build_unet`, and
`MaskOutput`, its 1x1 sigmoid output layer that carries the model's metadata (as MultiLabelDense does)."""

import keras

from cxrkeras.errors import ConfigError, CxrError

MAX_DEPTH, MAX_WIDTH = 6, 256  # bounds a user can set: 6 poolings, 256 filters at the first level
OUTPUT = "mask"


@keras.saving.register_keras_serializable(package="cxrkeras")
class MaskOutput(keras.layers.Conv2D):
    """Conv2D(1, 1x1, sigmoid) storing the U-Net's depth, width and Preprocessor config, so that `cxrkeras segment`
    and the Grad-CAM fusion rebuild the input chain of a reloaded .keras file."""

    def __init__(self, filters=1, kernel_size=1, depth=None, width=None, preprocessor=None, activation="sigmoid",
                 **kwargs):
        super().__init__(filters, kernel_size, activation=activation, **kwargs)
        self.depth = depth
        self.width = width
        self.preprocessor = dict(preprocessor) if preprocessor else None

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, width=self.width,
                      preprocessor=dict(self.preprocessor) if self.preprocessor else None)
        return config


def _conv_block(x, filters, name):
    for i in (1, 2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def apply_unet(x, depth=4, width=16):
    """Encoder of `depth` poolings (filters width * 2**level), bottleneck, decoder with transposed-conv upsampling
    and skip concatenations; returns the last decoder features (full resolution, `width` channels)."""
    skips = []
    for level in range(depth):
        x = _conv_block(x, width * 2 ** level, f"enc{level + 1}")
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"enc{level + 1}_pool")(x)
    x = _conv_block(x, width * 2 ** depth, "bottleneck")
    for level in reversed(range(depth)):
        x = keras.layers.Conv2DTranspose(width * 2 ** level, 2, strides=2, name=f"dec{level + 1}_up")(x)
        x = keras.layers.Concatenate(name=f"dec{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, width * 2 ** level, f"dec{level + 1}")
    return x


def build_unet(image_size=256, depth=4, width=16, preprocessor=None):
    """A U-Net on (image_size, image_size, 3) model input (the Preprocessor's output) giving (.., 1) mask
    probabilities. image_size must be a multiple of 2**depth."""
    for key, value, maximum in (("depth", depth, MAX_DEPTH), ("width", width, MAX_WIDTH)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise ConfigError(f"U-Net {key} must be an integer in [1, {maximum}], got {value!r}")
    if image_size % 2 ** depth:
        raise ConfigError(f"U-Net image size {image_size} must be a multiple of 2**depth = {2 ** depth}")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = apply_unet(inputs, depth, width)
    outputs = MaskOutput(1, 1, depth=depth, width=width, preprocessor=preprocessor, dtype="float32", name=OUTPUT)(x)
    return keras.Model(inputs, outputs, name="unet")


def unet_info(model):
    """dict(depth, width, preprocessor, image_size) of a U-Net made by build_unet (also after a .keras reload)."""
    try:
        head = model.get_layer(OUTPUT)
    except (ValueError, AttributeError):
        head = None
    if not isinstance(head, MaskOutput):
        raise CxrError(f"model {getattr(model, 'name', model)!r} is not a cxrkeras U-Net (no MaskOutput layer named "
                       f"{OUTPUT!r}): train one with `cxrkeras train-segmentation`")
    return dict(depth=head.depth, width=head.width, preprocessor=head.preprocessor,
                image_size=int(model.inputs[0].shape[1]))
