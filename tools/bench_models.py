"""Training-step throughput of the paper's LKA variants vs their no-LKA baselines, and of the lightweight
EfficientNet-B2 + LSTM + attention model vs ResNet-50, beside their FLOP ratios, and where the LKA's time goes
(per-op cost of its operations on CPU, at the shapes each variant runs them).

Usage: .venv/bin/python tools/bench_models.py [--paper] [--quick] [--batch 4] [--steps 6] [--size 224]
       [--variants a,b,...] [--before plain,keras] [--ops] [--op-sizes 224,112] [--jit]
`--paper`: the paper's setting, sized for ~10 minutes on 2 busy cores: 224 px, the six LKA variants and their
baselines (densenet121, vgg16-bn), batch 2, median of 5 interleaved steps, then the per-op table at 224 and
112 px for every variant that misses the target (time ratio <= FLOP ratio x 1.05).
Each backbone's models are built and warmed up together, then timed in interleaved rounds (one step of each model
per round, each round starting one model further on; the median step time is reported), so load from other
processes hits all of them alike. The CPU column is the process's user + system time per image (median over the
steps): less sensitive to other processes' load.
`--before plain,keras` also runs each LKA variant in earlier formulations of the LKA (same values and weights; see
BEFORE): "plain", as before tap cropping / the carried bias; "keras", through the Keras sub-layers' own call
(TensorFlow's depthwise filter-gradient kernel). `--ops`: the per-op table for every LKA variant run
(forward + backward time of each LKA op at that variant's LKA shapes, against the time its multiply-adds take at
the baseline network's own training speed, measured in the same table). `--jit` compiles the train steps with XLA
(its CPU depthwise convolutions are far slower).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAIRS = (("densenet121", ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full")),
         ("vgg16-bn", ("vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")),
         ("resnet50", ("efficientnetb2-lstm-mha",)))
PAPER_VARIANTS = PAIRS[0][1] + PAIRS[1][1]
# earlier formulations of the LKA, for side-by-side rows: label suffix -> what it runs
BEFORE = {"plain": ("(plain dw)", "depthwise_same without tap cropping or kernel-gradient bands, conv_spatial's "
                                  "bias added before conv1"),
          "keras": ("(Keras dw)", "the Keras DepthwiseConv2D / Conv2D sub-layers' own call (TensorFlow's filter-"
                                  "gradient kernel)")}
TOLERANCE = 1.05  # the target: time ratio <= FLOP ratio x 1.05
_SHAPES, _RATES = {}, {}  # {(variant, size): LKA layers}, {(baseline, size, batch): (MAC/s, step s)} seen so far


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _before_attention(layer, form):
    """x -> the LKA block's attention product as `form` ("plain" or "keras", see BEFORE) computes it."""
    from keras import ops

    from cxrkeras.models.lka import depthwise_same

    def plain(sub, x):
        y = depthwise_same(x, ops.cast(sub.kernel, x.dtype), int(sub.dilation_rate[0]), crop=False, band=False)
        return y + ops.cast(sub.bias, x.dtype)

    dw = plain if form == "plain" else (lambda sub, x: sub(x))
    return lambda x: x * layer.conv1(dw(layer.conv_spatial, dw(layer.conv0, x)))


def _use_before(model, form):
    """Make the model's LKA blocks compute as `form` (an earlier formulation, same values and weights)."""
    from cxrkeras.models.lka import LargeKernelAttention

    for layer in model._flatten_layers():
        if isinstance(layer, LargeKernelAttention):
            layer._attention = _before_attention(layer, form)


def _batch(batch, size):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(batch, 14)).astype("float32")
    return x, y


def _compiled(name, size, jit=False, before=None):
    import keras

    from cxrkeras.models import build_model

    model = build_model(name, input_shape=(size, size, 3))
    if before:
        _use_before(model, before)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit)
    return model


def time_group(names, batch, steps, size, jit=False, before=()):
    """{label: (median images/s, median CPU ms per image, GFLOPs)} over `steps` interleaved rounds; one untimed
    warm-up step each. Every LKA variant also runs as "<name> <suffix>" in each form of `before` (BEFORE)."""
    import keras

    from cxrkeras.models import gflops

    keras.backend.clear_session()
    x, y = _batch(batch, size)
    models = {}
    for name in names:
        forms = [(name, None)] + [(f"{name} {BEFORE[f][0]}", f) for f in before if "lka" in name]
        for label, form in forms:
            model = _compiled(name, size, jit, before=form)
            model.train_on_batch(x, y)  # trace + first-run kernel setup, not timed
            models[label] = model
    wall = {label: [] for label in models}
    cpu = {label: [] for label in models}
    labels = list(models)
    for round_ in range(steps):  # each round starts one model further on, so no model always runs first
        for label in labels[round_ % len(labels):] + labels[:round_ % len(labels)]:
            model = models[label]
            start, start_cpu = time.perf_counter(), time.process_time()
            model.train_on_batch(x, y)
            wall[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    for label, model in models.items():  # the per-op table reuses these (same size and batch)
        if label in names:
            _SHAPES[label, size] = _lka_layers(model)
    _RATES[names[0], size, batch] = _rate(models[names[0]], batch, statistics.median(wall[names[0]]))
    return {label: (batch / statistics.median(wall[label]), 1e3 * statistics.median(cpu[label]) / batch,
                    gflops(models[label])) for label in models}


def _timed(fns, args, reps, min_seconds=0.5, max_reps=25):
    """[median seconds of fn(*args)] for each tf.function in `fns` (returning tensors), called in interleaved rounds
    after two untimed calls each: at least `reps` rounds, more (up to `max_reps`) until `min_seconds` have passed,
    so that millisecond ops get a stable median."""
    for fn in fns:
        for _ in range(2):
            [t.numpy() for t in fn(*args)]
    ts = [[] for _ in fns]
    while len(ts[0]) < reps or sum(ts[0]) < min_seconds and len(ts[0]) < max_reps:
        for fn, times in zip(fns, ts):
            start = time.perf_counter()
            [t.numpy() for t in fn(*args)]
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in ts]


def _lka_layers(model):
    from cxrkeras.models.lka import LargeKernelAttention

    return [(layer.name, tuple(int(v) for v in layer.input.shape[1:])) for layer in model.layers
            if isinstance(layer, LargeKernelAttention)]


def lka_shapes(name, size):
    """[(layer name, (H, W, C))] of the variant's LKA blocks at `size` px."""
    import keras

    from cxrkeras.models import build_model

    if (name, size) not in _SHAPES:
        keras.backend.clear_session()
        _SHAPES[name, size] = _lka_layers(build_model(name, input_shape=(size, size, 3)))
    return _SHAPES[name, size]


def _grad_step(fn):
    """tf.function(*args) -> the gradients of fn(*args) with respect to every argument, for a fixed upstream
    gradient (the first argument itself: same shape), so that no loss op is timed with the op."""
    import tensorflow as tf

    @tf.function(autograph=False)  # plain Python closures: nothing for AutoGraph to convert
    def step(*args):
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        return tape.gradient(y, list(args), output_gradients=args[0])

    return step


def _lka_op_steps():
    """{op: (forward + backward step(x, w) as the models run it, the same in the "plain" form or None, multiply-adds
    of one image of shape (H, W, C))}."""
    from keras import ops

    from cxrkeras.models.lka import depthwise_same

    def dw(d, **options):
        return _grad_step(lambda x, w: depthwise_same(x, w, d, **options))

    return {
        "dw 5x5": (dw(1), dw(1, crop=False, band=False), lambda h, w, c: h * w * c * 25),
        "dw 7x7 dil 3": (dw(3), dw(3, crop=False, band=False), lambda h, w, c: h * w * c * 49),
        "1x1": (_grad_step(lambda x, w: ops.conv(x, w, 1, "same")), None, lambda h, w, c: h * w * c * c),
        "x * attn": (_grad_step(lambda x, w: x * w), None, lambda h, w, c: h * w * c),
    }


def _block_macs(h, w, c):
    from cxrkeras.models.lka import LargeKernelAttention

    return LargeKernelAttention().multiply_adds((h, w, c))


def _block_steps(channels):
    """(now, plain): step(x) -> the gradients of x and of the weights of one LKA block (the models' layer) on x, as
    the models run it and in the "plain" form (BEFORE)."""
    import tensorflow as tf

    from cxrkeras.models.lka import LargeKernelAttention

    layer = LargeKernelAttention(name=f"lka_{channels}")
    layer.build((None, None, None, channels))
    plain = _before_attention(layer, "plain")
    weights = list(layer.trainable_weights)

    def run(fn):
        @tf.function(autograph=False)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return tape.gradient(y, [x, *weights], output_gradients=x)
        return step

    return run(layer), run(plain)


def _op_weight(op, x, rng):
    import numpy as np
    import tensorflow as tf

    c = int(x.shape[-1])
    shape = {"dw 5x5": (5, 5, c, 1), "dw 7x7 dil 3": (7, 7, c, 1), "1x1": (1, 1, c, c), "x * attn": x.shape}[op]
    return tf.constant(rng.normal(size=shape).astype("float32") * 0.1)


def _rate(model, batch, step_seconds):
    """(multiply-adds per second of a training step: 3 x forward multiply-adds / step time, step time)."""
    from cxrkeras.models import count_multiply_adds

    return 3 * batch * count_multiply_adds(model) / step_seconds, step_seconds


def _baseline_rate(baseline, batch, size, steps=3):
    """`_rate` of the baseline's training step (median of `steps`), from the main table where it ran there."""
    import keras

    if (baseline, size, batch) not in _RATES:
        keras.backend.clear_session()
        x, y = _batch(batch, size)
        model = _compiled(baseline, size)
        model.train_on_batch(x, y)
        ts = []
        for _ in range(steps):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            ts.append(time.perf_counter() - start)
        _RATES[baseline, size, batch] = _rate(model, batch, statistics.median(ts))
    return _RATES[baseline, size, batch]


def op_table(variants, sizes, batch, reps=3, ratios=None):
    """Per LKA block of each variant at each size: forward + backward ms of each op, its GMAC/s, the ms its
    multiply-adds take at the baseline's own training rate ("at base rate") and the excess; then per variant the
    LKA's total excess against the step time the target allows it."""
    import numpy as np
    import tensorflow as tf

    steps = _lka_op_steps()
    baseline_of = {v: base for base, vs in PAIRS for v in vs}
    rng = np.random.default_rng(0)
    print(f"\nLKA ops, forward + backward (dL/dx, dL/dW), batch {batch}, float32, median of >= {reps} interleaved "
          f"calls (load {_load()}); MMAC: forward multiply-adds per image; GMAC/s = 3 x forward multiply-adds / time; "
          "'at base rate': the time those multiply-adds take at the baseline's own training rate (same batch and "
          "size); excess = ms - at base rate; 'plain ms': the same op in the plain form (BEFORE), same run",
          flush=True)
    print(f"{'variant':24s} {'px':>4s} {'layer':>12s} {'map':>12s} {'op':>13s} {'MMAC':>7s} {'ms':>8s} "
          f"{'GMAC/s':>7s} {'at base rate':>12s} {'excess ms':>9s} {'plain ms':>8s}")
    cache = {}
    for size in sizes:
        for name in variants:
            base = baseline_of[name]
            rate, base_step = _baseline_rate(base, batch, size)
            total_excess = 0.0
            for layer, (h, w, c) in lka_shapes(name, size):
                for op, macs_of in (*((op, m) for op, (_, _, m) in steps.items()), ("LKA block", _block_macs)):
                    key = (h, w, c, op)
                    if key not in cache:
                        x = tf.constant(rng.normal(size=(batch, h, w, c)).astype("float32"))
                        if op == "LKA block":
                            cache[key] = _timed(_block_steps(c), (x,), reps)
                        else:
                            now, plain, _ = steps[op]
                            cache[key] = _timed([f for f in (now, plain) if f], (x, _op_weight(op, x, rng)), reps)
                    seconds, *plain_seconds = cache[key]
                    macs = 3 * batch * macs_of(h, w, c)
                    fair = macs / rate
                    if op == "LKA block":  # the block's own time counts; the ops above are its parts
                        total_excess += seconds - fair
                    plain = f"{plain_seconds[0] * 1e3:8.1f}" if plain_seconds else f"{'-':>8s}"
                    print(f"{name:24s} {size:4d} {layer:>12s} {f'{h}x{w}x{c}':>12s} {op:>13s} "
                          f"{macs / 3 / batch / 1e6:7.1f} {seconds * 1e3:8.1f} {macs / seconds / 1e9:7.1f} "
                          f"{fair * 1e3:12.1f} {(seconds - fair) * 1e3:9.1f} {plain}", flush=True)
            line = (f"{name:24s} {size:4d} LKA blocks' excess {total_excess * 1e3:.1f} ms per step; baseline "
                    f"{base} {base_step * 1e3:.0f} ms per step ({rate / 1e9:.1f} GMAC/s)")
            if ratios and name in ratios:  # step <= base x F x 1.05 leaves the LKA 0.05 x F x base beyond its FLOPs
                allowed = (TOLERANCE - 1) * ratios[name] * base_step
                line += f"; the target allows {allowed * 1e3:.1f} ms"
            print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 4; --paper: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed interleaved steps (default 6; --paper: 5)")
    parser.add_argument("--size", type=int, default=None, help="image size in px (default 224)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants (default: the paper's six and efficientnetb2-lstm-mha)")
    parser.add_argument("--before", default="",
                        help="comma-separated earlier LKA formulations to run beside each LKA variant: "
                             + "; ".join(f"{k}: {v[1]}" for k, v in BEFORE.items()))
    parser.add_argument("--ops", action="store_true", help="print the per-op table for every LKA variant run")
    parser.add_argument("--op-sizes", default=None,
                        help="comma-separated image sizes of the per-op table (default: --size; --paper: 224,112)")
    parser.add_argument("--jit", action="store_true", help="jit_compile the train steps (XLA)")
    parser.add_argument("--quick", action="store_true", help="DenseNet121 variants only, 112 px, 3 steps")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's six LKA variants and baselines at 224 px, batch 2, 5 steps, per-op table "
                             "at 224 and 112 px for the variants that miss the target")
    args = parser.parse_args()
    defaults = dict(batch=4, steps=6, size=224, op_sizes=None)
    if args.quick:
        defaults.update(size=112, steps=3)
        args.variants = args.variants or "densenet121-lka-after,densenet121-lka-last2,densenet121-lka-full"
    if args.paper:
        defaults.update(batch=2, steps=5, size=224, op_sizes="224,112")
        args.variants = args.variants or ",".join(PAPER_VARIANTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch < 1 or args.steps < 1 or args.size < 32:
        parser.error("--batch and --steps must be >= 1 and --size >= 32")
    known = {v for _, vs in PAIRS for v in vs}
    wanted = set(args.variants.split(",")) if args.variants else None
    if wanted and wanted - known:
        parser.error(f"unknown variants {sorted(wanted - known)}: choose from {sorted(known)}")
    op_sizes = [int(s) for s in (args.op_sizes or str(args.size)).split(",")]
    before = [f for f in args.before.split(",") if f]
    if set(before) - set(BEFORE):
        parser.error(f"--before: choose from {', '.join(BEFORE)}")
    import tensorflow as tf

    print(f"load average {_load()} (1, 5, 15 min)")
    print(f"training step (Adam, BCE), batch {args.batch}, median of {args.steps} interleaved steps, "
          f"{args.size}x{args.size}, float32, {'XLA' if args.jit else 'no XLA'}, CPU ({os.cpu_count()} cores, "
          f"TF {tf.__version__}); ratios vs the baseline above each group (time ratio = time per image / "
          f"baseline's); CPU ms/img: process user+sys time per image; target: time ratio <= FLOP ratio x "
          f"{TOLERANCE}" + "".join(f"; '{BEFORE[f][0]}': {BEFORE[f][1]}" for f in before))
    print(f"{'variant':36s} {'GFLOPs':>7s} {'FLOP ratio':>10s} {'img/s':>7s} {'time ratio':>10s} "
          f"{'CPU ms/img':>10s} {'CPU ratio':>9s} {'target met':>10s}", flush=True)
    ratios, missed = {}, []
    for baseline, variants in PAIRS:
        variants = [v for v in variants if wanted is None or v in wanted]
        if not variants:
            continue
        results = time_group([baseline, *variants], args.batch, args.steps, args.size, args.jit, before)
        base_ips, base_cpu, base_gflops = results[baseline]
        for label, (ips, cpu_ms, gf) in results.items():
            flop_ratio, time_ratio = gf / base_gflops, base_ips / ips
            met = "" if label == baseline else ("yes" if time_ratio <= flop_ratio * TOLERANCE else "NO")
            if label in variants:
                ratios[label] = flop_ratio
                if met == "NO" and "lka" in label:
                    missed.append(label)
            print(f"{label:36s} {gf:7.2f} {flop_ratio:10.3f} {ips:7.2f} {time_ratio:10.3f} {cpu_ms:10.0f} "
                  f"{cpu_ms / base_cpu:9.3f} {met:>10s}", flush=True)
    print(f"load average {_load()}")
    lka_run = [v for v in ratios if "lka" in v]
    op_variants = lka_run if args.ops else (missed if args.paper else [])
    if op_variants:
        op_table(op_variants, op_sizes, args.batch, ratios=ratios)
        print(f"load average {_load()}")


if __name__ == "__main__":
    main()
