"""Training-step throughput of the paper's LKA variants vs their no-LKA baselines, and of the lightweight
EfficientNet-B2 + LSTM + attention model vs ResNet-50, beside their FLOP ratios, and where the LKA's time goes
(per-op cost of its depthwise convolutions on CPU).

Usage: .venv/bin/python tools/bench_models.py [--batch 4] [--steps 6] [--size 224] [--variants a,b,...] [--ops]
       [--quick] [--jit]
Each backbone's models are built and warmed up together, then timed in interleaved rounds (one step of each model
per round; the median step time is reported), so load from other processes hits all of them alike. Each LKA variant
runs twice: with the LKA's depthwise convolutions through `cxrkeras.models.lka.depthwise_same` (what the models
use) and through the Keras `DepthwiseConv2D` layers' own call (before, TensorFlow's filter-gradient kernel); both
compute the same values. `--ops` first prints forward + backward time and GMAC/s of each LKA op at the shapes
the variants run it on. `--jit` compiles the train steps with XLA (its CPU depthwise convolutions are far slower).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAIRS = (("densenet121", ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full")),
         ("vgg16-bn", ("vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")),
         ("resnet50", ("efficientnetb2-lstm-mha",)))
# (map size, channels) of the LKA blocks at 224 px: DenseNet121 blocks 1-4 (after = block 4's), VGG16 blocks 1-5
LKA_SHAPES = ((7, 1024), (14, 1024), (28, 512), (56, 256), (112, 128), (224, 64))
BEFORE = " (Keras dw)"


def _keras_depthwise(model):
    """Make the model's LKA blocks run their depthwise sub-layers' own call (the formulation before depthwise_same)."""
    from cxrkeras.models.lka import LargeKernelAttention

    for layer in model._flatten_layers():
        if isinstance(layer, LargeKernelAttention):
            layer._depthwise = lambda sub, x: sub(x)


def time_group(names, batch, steps, size, jit=False):
    """{label: (median images/s over `steps` interleaved rounds, GFLOPs)}; one untimed warm-up step each. Every
    LKA variant also runs as "<name> (Keras dw)"."""
    import keras
    import numpy as np

    from cxrkeras.models import build_model, gflops

    keras.backend.clear_session()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(batch, 14)).astype("float32")
    models = {}
    for name in names:
        for label in (name, name + BEFORE) if "lka" in name else (name,):
            model = build_model(name, input_shape=(size, size, 3))
            if label.endswith(BEFORE):
                _keras_depthwise(model)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit)
            model.train_on_batch(x, y)  # trace + first-run kernel setup, not timed
            models[label] = model
    times = {label: [] for label in models}
    for _ in range(steps):
        for label, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[label].append(time.perf_counter() - start)
    return {label: (batch / statistics.median(times[label]), gflops(models[label])) for label in models}


def op_table(batch, reps=3):
    """Forward + backward (input and kernel gradients) of each LKA op at each LKA shape: ms and GMAC/s."""
    import numpy as np
    import tensorflow as tf
    from keras import ops

    from cxrkeras.models.lka import depthwise_same

    def keras_dw(x, w, d):
        return ops.depthwise_conv(x, w, 1, "same", dilation_rate=d)

    def pointwise(x, w, d):
        return ops.conv(x, w, 1, "same")

    cases = (("dw 5x5", 5, 1), ("dw 7x7 dil 3", 7, 3), ("1x1", 1, 1))
    print(f"LKA ops, forward + backward (dL/dx and dL/dW), batch {batch}, float32, median of {reps}; "
          "GMAC/s = 3 x forward multiply-adds / time")
    print(f"{'map':>12s} {'op':>13s} {'Keras dw ms':>11s} {'GMAC/s':>7s} {'depthwise_same ms':>17s} {'GMAC/s':>7s}")
    rng = np.random.default_rng(0)
    for hw, c in LKA_SHAPES:
        x = tf.constant(rng.normal(size=(batch, hw, hw, c)).astype("float32"))
        for label, k, d in cases:
            w = tf.constant(rng.normal(size=(k, k, c, c if k == 1 else 1)).astype("float32") * 0.1)
            macs = 3 * batch * hw * hw * c * (c if k == 1 else k * k)
            cells = []
            for fn in ((pointwise,) * 2 if k == 1 else (keras_dw, depthwise_same)):
                @tf.function
                def step(x, w, fn=fn, d=d):
                    with tf.GradientTape() as tape:
                        tape.watch([x, w])
                        y = fn(x, w, d)
                        loss = tf.reduce_sum(y * y)
                    return tape.gradient(loss, [x, w])

                step(x, w)
                ts = []
                for _ in range(reps):
                    start = time.perf_counter()
                    [t.numpy() for t in step(x, w)]
                    ts.append(time.perf_counter() - start)
                t = statistics.median(ts)
                cells.append(f"{t * 1e3:11.1f} {macs / t / 1e9:7.1f}")
            print(f"{f'{hw}x{hw}x{c}':>12s} {label:>13s} {cells[0]} {cells[1]:>25s}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants (default: the paper's six and efficientnetb2-lstm-mha)")
    parser.add_argument("--ops", action="store_true", help="print the per-op table of the LKA first")
    parser.add_argument("--jit", action="store_true", help="jit_compile the train steps (XLA)")
    parser.add_argument("--quick", action="store_true", help="DenseNet121 variants only, 112 px, 3 steps")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps = 112, 3
        args.variants = args.variants or "densenet121-lka-after,densenet121-lka-last2,densenet121-lka-full"
    wanted = set(args.variants.split(",")) if args.variants else None
    import tensorflow as tf

    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} (1, 5, 15 min)")
    if args.ops:
        op_table(args.batch)
    print(f"training step (Adam, BCE), batch {args.batch}, median of {args.steps} interleaved steps, "
          f"{args.size}x{args.size}, float32, {'XLA' if args.jit else 'no XLA'}, CPU ({os.cpu_count()} cores, "
          f"TF {tf.__version__}); ratios vs the baseline above each group (time ratio = time per image / "
          f"baseline's); '{BEFORE.strip()}': the LKA through the Keras layers' own call")
    print(f"{'variant':36s} {'GFLOPs':>7s} {'FLOP ratio':>10s} {'img/s':>7s} {'time ratio':>10s}", flush=True)
    for baseline, variants in PAIRS:
        variants = [v for v in variants if wanted is None or v in wanted]
        if not variants:
            continue
        results = time_group([baseline, *variants], args.batch, args.steps, args.size, args.jit)
        base_ips, base_gflops = results[baseline]
        for name, (ips, gf) in results.items():
            print(f"{name:36s} {gf:7.2f} {gf / base_gflops:10.3f} {ips:7.2f} {base_ips / ips:10.3f}", flush=True)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
