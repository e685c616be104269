"""Where the LKA's CPU time goes on VGG16's large maps: candidate formulations of its operations side by side with
`depthwise_same` (forward + backward, kernel gradient included), and the machine's streaming and fused-loop rates.

Usage: .venv/bin/python tools/bench_lka_forms.py [--maps 224x64,112x128] [--batch 2] [--rounds 7] [--no-torch]
One process, interleaved rounds (one call of each row per round, two untimed calls first), median wall and CPU
(process user + system) time per call; float32; each candidate's max |difference| to the current form, relative to
the largest value of the current one. Rows per map (B x H x W x C) and op (the 5x5 and the 7x7 dilation-3 "same"
depthwise convolutions):
  - `depthwise_same` (the models' form) forward + backward (dL/dx, dL/dW), and its parts: the forward (the input
    gradient is the same convolution with the flipped kernel) and the kernel gradient (one forward depthwise
    convolution of the stacked padded input with the upstream gradient as filter);
  - XLA shifted sum: the sum over taps of a shifted slice of the padded input times the tap's weights, one
    jit-compiled cluster each for the forward, the input gradient and the kernel gradient (per-tap sums);
  - TensorFlow's own depthwise filter-gradient kernel (DepthwiseConv2dNativeBackpropFilter; undilated op only);
  - the kernel gradient with the map cut into tiles moved into the channels (small filters), and, for the dilated
    op, on the SpaceToBatch phases (stride 1 instead of the dilation);
  - PyTorch's grouped convolution (channels-last, the same thread count), what a PyTorch user would run.
Then the LKA's tail (1x1 convolution + bias, the gating product x * attn) forward + backward as the models compute
it, and with its elementwise parts fused by XLA (custom gradient); and two reference rates: a streaming elementwise
pass (x * y over the map: two reads, one write) and an XLA-fused loop of 25 multiply-adds per element.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

OPS = (("dw 5x5", 5, 1), ("dw 7x7 dil 3", 7, 3))


def _shifted_sum(padded, kernel, height, width, dilation):
    """sum over taps (i, j) of padded[:, i d : i d + H, j d : j d + W, :] * kernel[i, j, :, 0]."""
    k = int(kernel.shape[0])
    out = None
    for i in range(k):
        for j in range(k):
            term = padded[:, i * dilation:i * dilation + height, j * dilation:j * dilation + width] * kernel[i, j, :, 0]
            out = term if out is None else out + term
    return out


def xla_shifted(k, dilation, height, width):
    """(forward + backward op, forward, kernel gradient) of the shifted-sum form, each part one XLA cluster."""
    import tensorflow as tf

    p = dilation * (k - 1) // 2
    pads = [[0, 0], [p, p], [p, p], [0, 0]]

    @tf.function(jit_compile=True)
    def forward(x, kernel):
        return _shifted_sum(tf.pad(x, pads), kernel, height, width, dilation)

    @tf.function(jit_compile=True)
    def input_grad(g, kernel):
        return _shifted_sum(tf.pad(g, pads), tf.reverse(kernel, [0, 1]), height, width, dilation)

    @tf.function(jit_compile=True)
    def kernel_grad(x, g):
        xp = tf.pad(x, pads)
        taps = [tf.reduce_sum(xp[:, i * dilation:i * dilation + height, j * dilation:j * dilation + width] * g,
                              axis=[0, 1, 2]) for i in range(k) for j in range(k)]
        return tf.reshape(tf.stack(taps), [k, k, -1, 1])

    @tf.custom_gradient
    def op(x, kernel):
        return forward(x, kernel), lambda g: (input_grad(g, kernel), kernel_grad(x, g))

    return op, forward, kernel_grad


def kernel_grad_tiles(x, g, k, dilation, tile):
    """dW of the "same" depthwise convolution with the map cut into tile x tile pieces moved into the channels
    (each piece with its halo), so one depthwise convolution's filter per channel is one small tile."""
    import numpy as np
    import tensorflow as tf

    p = dilation * (k - 1) // 2
    batch, h, w, c = (int(v) for v in x.shape)
    nh, nw = h // tile, w // tile
    xp = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
    rows = np.arange(nh)[:, None] * tile + np.arange(tile + 2 * p)[None, :]
    cols = np.arange(nw)[:, None] * tile + np.arange(tile + 2 * p)[None, :]
    pieces = tf.gather(tf.gather(xp, rows, axis=1), cols, axis=3)  # (B, nh, tile + 2p, nw, tile + 2p, C)
    pieces = tf.reshape(tf.transpose(pieces, [2, 4, 0, 1, 3, 5]), [1, tile + 2 * p, tile + 2 * p, -1])
    taps = tf.transpose(tf.reshape(g, [batch, nh, tile, nw, tile, c]), [2, 4, 0, 1, 3, 5])
    out = tf.nn.depthwise_conv2d(pieces, tf.reshape(taps, [tile, tile, -1, 1]), [1, dilation, dilation, 1], "VALID")
    return tf.reduce_sum(tf.reshape(out, [k, k, -1, c]), 2)[..., None]


def kernel_grad_phases(x, g, k, dilation):
    """dW of the dilated "same" depthwise convolution on the SpaceToBatch phases (the layout TensorFlow's dilated
    forward uses): an undilated stride-1 kernel gradient of the phases stacked one above the other."""
    import tensorflow as tf

    p = dilation * (k - 1) // 2
    h = int(x.shape[1])
    extra, rest = (-(h + 2 * p)) % dilation, (-h) % dilation
    xs = tf.space_to_batch_nd(x, [dilation, dilation], [[p, p + extra], [p, p + extra]])
    gs = tf.space_to_batch_nd(g, [dilation, dilation], [[0, rest], [0, rest]])
    n, hp, wp, c = (int(v) for v in xs.shape)
    hg, wg = int(gs.shape[1]), int(gs.shape[2])
    images = tf.reshape(xs, [1, n * hp, wp, c])
    taps = tf.reshape(tf.pad(gs, [[0, 0], [0, hp - hg], [0, 0], [0, 0]]), [n * hp, wg, c, 1])[:n * hp - (hp - hg)]
    return tf.reshape(tf.nn.depthwise_conv2d(images, taps, [1, 1, 1, 1], "VALID"), [k, k, c, 1])


def tails():
    """(as the models compute it, elementwise parts fused by XLA): (x, s, W1, b1) -> x * (conv1x1(s, W1) + b1)."""
    import tensorflow as tf
    from keras import ops

    def now(x, s, w1, b1):
        return x * ops.add(ops.conv(s, w1, 1, "same"), b1)

    gate = tf.function(jit_compile=True)(lambda x, a, b: x * (a + b))
    gate_grad = tf.function(jit_compile=True)(lambda g, x, a, b: (g * (a + b), g * x))

    def fused(x, s, w1, b1):
        @tf.custom_gradient
        def f(x, s, w1, b1):
            a = tf.nn.conv2d(s, w1, 1, "SAME")

            def grad(g):
                gx, ga = gate_grad(g, x, a, b1)
                c = int(w1.shape[-1])
                ds = tf.nn.conv2d(ga, tf.transpose(w1, [0, 1, 3, 2]), 1, "SAME")
                dw1 = tf.matmul(tf.reshape(s, [-1, c]), tf.reshape(ga, [-1, c]), transpose_a=True)
                return gx, ds, tf.reshape(dw1, w1.shape), tf.reduce_sum(ga, [0, 1, 2])

            return gate(x, a, b1), grad

        return f(x, s, w1, b1)

    return now, fused


def torch_step(batch, h, c, k, dilation):
    """PyTorch's grouped convolution forward + backward (input and weight gradients), channels-last, or None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count())
    conv = torch.nn.Conv2d(c, c, k, padding=dilation * (k - 1) // 2, dilation=dilation, groups=c, bias=False)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    g = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last)

    def step():
        x.grad = conv.weight.grad = None
        conv(x).backward(g)

    return step


def rows_for_map(batch, h, c, rng, use_torch):
    """[(group, label, callable, args, forward multiply-adds of the work, the row it is compared with or None,
    whether its values must equal that row's)]."""
    import tensorflow as tf

    from bench_models import _grad_step
    from cxrkeras.models.lka import _kernel_gradient, depthwise_same

    x = tf.constant(rng.normal(size=(batch, h, h, c)).astype("float32"))
    g = tf.constant(rng.normal(size=(batch, h, h, c)).astype("float32"))
    n = batch * h * h * c
    rows = []
    for op, k, d in OPS:
        w = tf.constant((rng.normal(size=(k, k, c, 1)) * 0.1).astype("float32"))
        macs = n * k * k
        now = f"{op}: depthwise_same fwd+bwd"
        xla_op, xla_fwd, xla_dw = xla_shifted(k, d, h, h)
        fwd, dw = f"{op}:   its forward", f"{op}:   its kernel gradient"
        rows += [(op, now[len(op) + 2:], _grad_step(lambda x, w, d=d: depthwise_same(x, w, d)), (x, w), 3 * macs,
                  None, False),
                 (op, fwd[len(op) + 2:], tf.function(lambda x, w, d=d: depthwise_same(x, w, d)), (x, w), macs, None,
                  False),
                 (op, dw[len(op) + 2:], tf.function(lambda x, g, k=k, d=d: _kernel_gradient(x, g, k, k, d, False)),
                  (x, g), macs, None, False),
                 (op, "XLA shifted sum fwd+bwd", _grad_step(xla_op), (x, w), 3 * macs, now, True),
                 (op, "  XLA forward", xla_fwd, (x, w), macs, fwd, True),
                 (op, "  XLA kernel gradient (per-tap sums)", xla_dw, (x, g), macs, dw, True)]
        if d == 1:  # TensorFlow's filter-gradient kernel is the Keras layer's own backward
            rows.append((op, "TF filter-gradient kernel", tf.function(
                lambda x, g, k=k: tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                    input=x, filter_sizes=[k, k, c, 1], out_backprop=g, strides=[1, 1, 1, 1], padding="SAME")),
                (x, g), macs, dw, True))
        tile = next((t for t in (56, 28, 16) if h % t == 0), None)
        if tile:
            rows.append((op, f"  kernel gradient, {tile} px tiles in channels", tf.function(
                lambda x, g, k=k, d=d, t=tile: kernel_grad_tiles(x, g, k, d, t)), (x, g), macs, dw, True))
        if d > 1:
            rows.append((op, "  kernel gradient on SpaceToBatch phases", tf.function(
                lambda x, g, k=k, d=d: kernel_grad_phases(x, g, k, d)), (x, g), macs, dw, True))
        step = torch_step(batch, h, c, k, d) if use_torch else None
        if step is not None:
            rows.append((op, "PyTorch grouped conv fwd+bwd", step, (), 3 * macs, now, False))
    s = tf.constant(rng.normal(size=(batch, h, h, c)).astype("float32"))
    w1 = tf.constant((rng.normal(size=(1, 1, c, c)) * 0.1).astype("float32"))
    b1 = tf.constant(rng.normal(size=(c,)).astype("float32"))
    now, fused = tails()
    tail_macs = 3 * n * (c + 1)
    rows += [("tail", "1x1 + bias, x * attn fwd+bwd", _grad_step(now), (x, s, w1, b1), tail_macs, None, False),
             ("tail", "the same, elementwise fused by XLA", _grad_step(fused), (x, s, w1, b1), tail_macs,
              "tail: 1x1 + bias, x * attn fwd+bwd", True),
             ("rates", "stream: x * y (2 reads, 1 write)", tf.function(lambda x, y: x * y), (x, g), n, None, False),
             ("rates", "XLA fused loop, 25 multiply-adds/element",
              tf.function(jit_compile=True)(lambda x: sum(x * (0.01 * i) for i in range(1, 26))), (x,), 25 * n,
              None, False)]
    return rows


def _values(result):
    import numpy as np

    if result is None:
        return None
    items = result if isinstance(result, (list, tuple)) else [result]
    return [np.asarray(t) for t in items]


def run_rows(rows, rounds):
    """{label: (median wall s, median CPU s, max relative difference to its reference or None)}."""
    import numpy as np

    values, diffs = {}, {}
    for group, label, fn, args, _, ref, check in rows:
        key = f"{group}: {label}"
        values[key] = _values(fn(*args))
        fn(*args)
        if check:
            a, b = values[ref], values[key]
            diffs[key] = max(float(np.abs(u - v).max() / np.abs(u).max()) for u, v in zip(a, b))
    wall = {f"{r[0]}: {r[1]}": [] for r in rows}
    cpu = {key: [] for key in wall}
    for round_ in range(rounds):
        order = rows[round_ % len(rows):] + rows[:round_ % len(rows)]
        for group, label, fn, args, *_ in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(*args)
            wall[f"{group}: {label}"].append(time.perf_counter() - start)
            cpu[f"{group}: {label}"].append(time.process_time() - start_cpu)
    return {key: (statistics.median(wall[key]), statistics.median(cpu[key]), diffs.get(key)) for key in wall}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", default="224x64,112x128", help="comma-separated HxC (square maps)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
    args = parser.parse_args()
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be >= 1")
    try:
        maps = [tuple(int(v) for v in m.split("x")) for m in args.maps.split(",")]
    except ValueError:
        parser.error("--maps: e.g. 224x64,112x128")
    if any(len(m) != 2 or not (8 <= m[0] <= 512 and 1 <= m[1] <= 1024) for m in maps):
        parser.error("--maps: HxC with 8 <= H <= 512 and 1 <= C <= 1024")
    import numpy as np
    import tensorflow as tf

    from bench_models import _load

    print(f"load average {_load()} (1, 5, 15 min); CPU ({os.cpu_count()} cores, TF {tf.__version__}), float32, "
          f"batch {args.batch}, median of {args.rounds} interleaved rounds; CPU ms: process user + system time; "
          "GMAC/s: forward multiply-adds of the work (x 3 for fwd+bwd) per wall / per CPU second; 'vs now': the "
          "current form's CPU time / this row's; 'max diff': relative to the current form's values", flush=True)
    print(f"{'map':>14s} {'row':58s} {'wall ms':>8s} {'CPU ms':>8s} {'GMAC/s':>7s} {'/CPU s':>7s} {'vs now':>7s} "
          f"{'max diff':>9s}")
    rng = np.random.default_rng(0)
    for h, c in maps:
        rows = rows_for_map(args.batch, h, c, rng, not args.no_torch)
        result = run_rows(rows, args.rounds)
        for group, label, _, _, macs, ref, _ in rows:
            wall, cpu, diff = result[f"{group}: {label}"]
            vs = f"{result[ref][1] / cpu:7.2f}" if ref else f"{'':7s}"
            extra = f" ({3 * 4 * args.batch * h * h * c / wall / 1e9:.1f} GB/s)" if label.startswith("stream") else ""
            print(f"{f'{args.batch}x{h}x{h}x{c}':>14s} {f'{group}: {label}':58s} {wall * 1e3:8.1f} {cpu * 1e3:8.1f} "
                  f"{macs / wall / 1e9:7.1f} {macs / cpu / 1e9:7.1f} {vs} "
                  f"{'' if diff is None else f'{diff:9.1e}'}{extra}", flush=True)
    print(f"load average {_load()}")


if __name__ == "__main__":
    main()
