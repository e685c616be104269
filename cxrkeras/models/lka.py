"""Large Kernel Attention (LKA): the paper's element-wise attention block, and the VAN "spatial attention" form."""

import keras

from cxrkeras.errors import ConfigError

FORMS = ("lka", "van")


@keras.saving.register_keras_serializable(package="cxrkeras")
class LargeKernelAttention(keras.layers.Layer):
    """attn = PW1x1(DW7x7_dil3(DW5x5(x))); output = x * attn (form "lka": the paper's, no sigmoid, no residual).

    form "van" wraps it as in the Visual Attention Network: 1x1 -> GELU -> LKA -> 1x1, plus the input (shortcut).
    The channel count is taken from the input; "same" padding keeps the spatial size (the paper's padding 2 and 9).
    """

    def __init__(self, form="lka", kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        if form not in FORMS:
            raise ConfigError(f"LargeKernelAttention form must be one of {FORMS}, got {form!r}")
        self.form = form
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = False

    def build(self, input_shape):
        dim = int(input_shape[-1])
        init = self.kernel_initializer
        # dtype policy is passed on so the sub-layers compute in float16 under mixed_float16 like this layer.
        common = dict(dtype=self.dtype_policy)
        self.conv0 = keras.layers.DepthwiseConv2D(5, padding="same", depthwise_initializer=init,
                                                  name="conv0", **common)
        self.conv_spatial = keras.layers.DepthwiseConv2D(7, padding="same", dilation_rate=3,
                                                         depthwise_initializer=init, name="conv_spatial", **common)
        self.conv1 = keras.layers.Conv2D(dim, 1, kernel_initializer=init, name="conv1", **common)
        self.conv0.build(input_shape)
        self.conv_spatial.build(input_shape)
        self.conv1.build(input_shape)
        if self.form == "van":
            self.proj_1 = keras.layers.Conv2D(dim, 1, kernel_initializer=init, name="proj_1", **common)
            self.proj_2 = keras.layers.Conv2D(dim, 1, kernel_initializer=init, name="proj_2", **common)
            self.proj_1.build(input_shape)
            self.proj_2.build(input_shape)
        super().build(input_shape)

    def _attention(self, x):
        attn = self.conv1(self.conv_spatial(self.conv0(x)))
        return x * attn

    def call(self, inputs):
        if self.form == "lka":
            return self._attention(inputs)
        x = keras.activations.gelu(self.proj_1(inputs))
        return self.proj_2(self._attention(x)) + inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def multiply_adds(self, input_shape, elementwise=True):
        """Multiply-adds for one image of shape (H, W, C): convolutions, plus (`elementwise`) the gating product
        (and VAN's shortcut add); fvcore, the paper's counter, counts the convolutions only."""
        h, w, c = (int(v) for v in input_shape[-3:])
        n = h * w * c
        macs = n * 25 + n * 49 + n * c  # dw 5x5, dw 7x7 (dilation adds no work), 1x1
        if self.form == "van":
            macs += 2 * n * c  # proj_1, proj_2
        if elementwise:
            macs += n * (2 if self.form == "van" else 1)  # x * attn (+ the shortcut add)
        return macs

    def get_config(self):
        config = super().get_config()
        config.update(form=self.form, kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config


def lka_param_count(dim, form="lka"):
    """Trainable parameters of one LKA block on `dim` channels (the paper's d(25+1) + d(49+1) + d*d + d)."""
    n = dim * 26 + dim * 50 + dim * dim + dim
    if form == "van":
        n += 2 * (dim * dim + dim)
    return n
