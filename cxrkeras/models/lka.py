"""Large Kernel Attention (LKA): the paper's element-wise attention block, and the VAN "spatial attention" form."""

import keras
from keras import ops

from cxrkeras.errors import ConfigError

FORMS = ("lka", "van")


BAND_BYTES = 2 << 20  # rows of one image per band of the kernel gradient: about 2 MiB (maps over twice that only)
MAX_BANDS = 16


def taps_inside(size, kernel_size, dilation):
    """Taps of a centred kernel (odd `kernel_size`, `dilation`) on each side of the centre that can reach a pixel of a
    map `size` long: the outer taps of a 7x7 kernel at dilation 3 (offsets +-9) multiply only zero padding on a map
    of 9 pixels or fewer, so they are dropped from the computation (their output and input-gradient terms are zero
    and so is their kernel gradient)."""
    radius = (kernel_size - 1) // 2
    return radius if size is None else min(radius, (int(size) - 1) // dilation)


def band_rows(height, width, channels, band=True):
    """Rows per band of the kernel gradient: `band` rows (an int), the whole map (False), or (True) about
    BAND_BYTES of one float32 image per band, at most MAX_BANDS bands, where the map holds over 2 x BAND_BYTES
    (on smaller maps the extra convolutions cost more than they save: tools/bench_models.py --ops)."""
    if band is False:
        return height
    if band is not True:
        return max(1, int(band))
    row_bytes = 4 * width * channels
    if height * row_bytes <= 2 * BAND_BYTES:
        return height
    return max(BAND_BYTES // row_bytes, -(-height // MAX_BANDS), 1)


def depthwise_same(x, kernel, dilation=1, crop=True, band=False):
    """Depthwise convolution, stride 1, "same" padding, odd kernel (k, k, C, 1), channels last: the value of
    `ops.depthwise_conv`, computed faster on CPU (Keras ops only, so any backend).

    - Kernel gradient. TensorFlow's CPU kernel for the depthwise filter gradient (DepthwiseConv2dNativeBackpropFilter)
      runs at ~0.1-1 GMAC/s on the LKA's shapes (95 ms of a 7x7 map x 1024 channels at batch 4, where the forward
      takes 3 ms). The same sum, dW[i, j, c] = sum over b, h, w of x_padded[b, h + i*d, w + j*d, c] * g[b, h, w, c],
      is a forward depthwise convolution of the padded input with the upstream gradient as the filter and stride d:
      the images of the batch stacked one above the other (a free reshape; the gradient's rows zero-padded so no
      product pairs two images). `band` (see `band_rows`; off by default, so the models do not band) cuts the rows
      into bands, one convolution a band, summed: on 2 loaded cores it took 30-35 % off the LKA block's wall time
      at 224x224x64 (the bands run in parallel) but no CPU time; on a lightly loaded run the block was 2 % slower
      (its depthwise ops 20-26 %; tools/bench_models.py --ops).
    - The input gradient is the forward convolution of the upstream gradient with the flipped kernel.
    - `crop`: taps that can only multiply zero padding (a map smaller than the dilated kernel's reach, e.g. the 7x7
      dilation-3 kernel on 7x7 maps: its outer ring) are left out, exactly: same output and gradients, the dropped
      taps' kernel gradient is zero as theirs is."""
    k = int(kernel.shape[0])
    radius = (k - 1) // 2
    height, width = x.shape[1], x.shape[2]
    if crop:
        keep_h, keep_w = taps_inside(height, k, dilation), taps_inside(width, k, dilation)
        if (keep_h, keep_w) != (radius, radius):
            inner = kernel[radius - keep_h:radius + keep_h + 1, radius - keep_w:radius + keep_w + 1]
            return _depthwise_same(x, inner, dilation, band)
    return _depthwise_same(x, kernel, dilation, band)


def _depthwise_same(x, kernel, dilation, band):
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])

    @ops.custom_gradient
    def conv(x, kernel):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            dx = ops.depthwise_conv(upstream, ops.flip(ops.flip(kernel, 0), 1), 1, "same", dilation_rate=dilation)
            return dx, _kernel_gradient(x, upstream, kh, kw, dilation, band)

        return ops.depthwise_conv(x, kernel, 1, "same", dilation_rate=dilation), grad

    return conv(x, kernel)


def _kernel_gradient(x, upstream, kh, kw, dilation, band):
    """dW (kh, kw, C, 1) of a stride-1 "same" depthwise convolution of x (B, H, W, C) whose output's gradient is
    `upstream`."""
    height, width, channels = x.shape[1], x.shape[2], int(x.shape[3])
    pad_h, pad_w = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    padded = ops.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
    if height is None or width is None:  # a map size known only when run: one band
        width = ops.shape(x)[2]
        bands = [(0, None)]
    else:
        rows = band_rows(height, width, channels, band)
        bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]
    dw = None
    for top, bottom in bands:
        end = None if bottom is None else bottom + 2 * pad_h
        # band images stacked: (B, n + 2 pad_h, Wp, C) -> (1, B (n + 2 pad_h), Wp, C); the gradient's band padded
        # below by 2 pad_h zero rows and stacked the same way, minus the last image's zero rows: a filter of
        # B (n + 2 pad_h) - 2 pad_h rows, whose kh outputs at stride d pair each image only with itself
        images = ops.reshape(padded[:, top:end], [1, -1, width + 2 * pad_w, channels])
        taps = ops.pad(upstream[:, top:bottom], [[0, 0], [0, 2 * pad_h], [0, 0], [0, 0]])
        taps = ops.reshape(taps, [-1, width, channels, 1])
        if pad_h:
            taps = taps[:-2 * pad_h]
        part = ops.depthwise_conv(images, taps, dilation, "valid")  # (1, kh, kw, C)
        dw = part if dw is None else dw + part
    return ops.expand_dims(ops.squeeze(dw, 0), -1)


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

    def _depthwise(self, layer, x, bias=True):
        """`layer(x)` (a DepthwiseConv2D of this block: its own kernel and, with `bias`, its bias) through
        `depthwise_same`."""
        kernel = ops.cast(layer.kernel, x.dtype)
        y = depthwise_same(x, kernel, int(layer.dilation_rate[0]))
        return ops.add(y, ops.cast(layer.bias, x.dtype)) if bias and layer.use_bias else y

    def _attention(self, x):
        """x * conv1(conv_spatial(conv0(x))), computed with the sub-layers' weights (their names, so files load by
        name): the depthwise convolutions through `depthwise_same` (equal to the layers' own call, faster kernel
        gradient; tests/test_models_torch.py), and conv_spatial's bias carried through the 1x1 convolution,
        conv1(s + b) = W s + (W b + b1), so one full-size bias add (and its gradient's sum) fewer."""
        s = self._depthwise(self.conv_spatial, self._depthwise(self.conv0, x), bias=False)
        kernel = ops.cast(self.conv1.kernel, x.dtype)
        attn = ops.conv(s, kernel, 1, "same")
        bias = ops.cast(self.conv1.bias, x.dtype) if self.conv1.use_bias else None
        if self.conv_spatial.use_bias:
            carried = ops.matmul(ops.expand_dims(ops.cast(self.conv_spatial.bias, x.dtype), 0), kernel[0, 0])[0]
            bias = carried if bias is None else carried + bias
        if bias is not None:
            attn = ops.add(attn, bias)
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
