"""Large Kernel Attention (LKA): the paper's element-wise attention block, and the VAN "spatial attention" form."""

import keras
from keras import ops

from cxrkeras.errors import ConfigError

FORMS = ("lka", "van")


def depthwise_same(x, kernel, dilation=1):
    """Depthwise convolution, stride 1, "same" padding, odd kernel (k, k, C, 1), channels last: the value of
    `ops.depthwise_conv`, with a faster kernel gradient (Keras ops only, so any backend).

    TensorFlow's CPU kernel for the depthwise filter gradient (DepthwiseConv2dNativeBackpropFilter) runs at
    ~0.1-1 GMAC/s on the LKA's shapes: 95 ms of a 7x7 map x 1024 channels at batch 4, where the forward takes 3 ms.
    The same sum, dW[i, j, c] = sum over b, h, w of x_padded[b, h + i*d, w + j*d, c] * g[b, h, w, c], is one forward
    depthwise convolution of the padded input (batch folded into the channels) with the upstream gradient as the
    filter and stride d: 2-16x faster there (tools/bench_models.py --ops). The input gradient is the forward
    convolution of the upstream gradient with the flipped kernel (stride 1, symmetric padding)."""
    k = int(kernel.shape[0])
    pad = dilation * (k - 1) // 2

    @ops.custom_gradient
    def conv(x, kernel):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dx = ops.depthwise_conv(upstream, ops.flip(ops.flip(kernel, 0), 1), 1, "same", dilation_rate=dilation)
            height, width = ops.shape(upstream)[1], ops.shape(upstream)[2]
            channels = int(kernel.shape[2])
            padded = ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            # (B, Hp, Wp, C) -> (1, Hp, Wp, B*C), and the upstream (B, H, W, C) -> a filter (H, W, B*C, 1)
            images = ops.expand_dims(ops.reshape(ops.transpose(padded, [1, 2, 0, 3]),
                                                 [height + 2 * pad, width + 2 * pad, -1]), 0)
            taps = ops.expand_dims(ops.reshape(ops.transpose(upstream, [1, 2, 0, 3]), [height, width, -1]), -1)
            dw = ops.depthwise_conv(images, taps, dilation, "valid")  # (1, k, k, B*C)
            dw = ops.sum(ops.reshape(dw, [k, k, -1, channels]), axis=2)
            return dx, ops.expand_dims(dw, -1)

        return ops.depthwise_conv(x, kernel, 1, "same", dilation_rate=dilation), grad

    return conv(x, kernel)


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

    def _depthwise(self, layer, x):
        """`layer(x)` (a DepthwiseConv2D of this block: its own kernel and bias) through `depthwise_same`."""
        kernel = ops.cast(layer.kernel, x.dtype)
        y = depthwise_same(x, kernel, int(layer.dilation_rate[0]))
        return ops.add(y, ops.cast(layer.bias, x.dtype)) if layer.use_bias else y

    def _attention(self, x):
        # the sub-layers hold the weights (and their names, so files load by name); their convolutions run through
        # depthwise_same, which equals the layers' own call (tests/test_layers.py) with a faster kernel gradient
        attn = self.conv1(self._depthwise(self.conv_spatial, self._depthwise(self.conv0, x)))
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
