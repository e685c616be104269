"""Training-step throughput of the paper's LKA variants vs their no-LKA baselines, and of the lightweight
EfficientNet-B2 + LSTM + attention model vs ResNet-50, beside their FLOP ratios.

Usage: .venv/bin/python tools/bench_models.py [--batch 4] [--steps 6] [--size 224] [--variants a,b,...]
Each backbone's models are built and warmed up together, then timed in interleaved rounds (one step of each model
per round; the median step time is reported), so load from other processes hits all of them alike.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAIRS = (("densenet121", ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full")),
         ("vgg16-bn", ("vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")),
         ("resnet50", ("efficientnetb2-lstm-mha",)))


def time_group(names, batch, steps, size):
    """{variant: (median images/s over `steps` interleaved rounds, GFLOPs)}; one untimed warm-up step each."""
    import keras
    import numpy as np

    from cxrkeras.models import build_model, gflops

    keras.backend.clear_session()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(batch, 14)).astype("float32")
    models = {}
    for name in names:
        model = build_model(name, input_shape=(size, size, 3))
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=False)
        model.train_on_batch(x, y)  # trace + first-run kernel setup, not timed
        models[name] = model
    times = {name: [] for name in names}
    for _ in range(steps):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    return {name: (batch / statistics.median(times[name]), gflops(models[name])) for name in names}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variants", default=None, help="comma-separated variants (default: the paper's six and efficientnetb2-lstm-mha)")
    args = parser.parse_args()
    wanted = set(args.variants.split(",")) if args.variants else None
    import tensorflow as tf

    print(f"training step (Adam, BCE), batch {args.batch}, median of {args.steps} interleaved steps, "
          f"{args.size}x{args.size}, float32, CPU ({os.cpu_count()} cores, TF {tf.__version__}); "
          "ratios vs the baseline above each group (time ratio = time per image / baseline's)")
    print(f"{'variant':24s} {'GFLOPs':>7s} {'FLOP ratio':>10s} {'img/s':>7s} {'time ratio':>10s}", flush=True)
    for baseline, variants in PAIRS:
        variants = [v for v in variants if wanted is None or v in wanted]
        if not variants:
            continue
        results = time_group([baseline, *variants], args.batch, args.steps, args.size)
        base_ips, base_gflops = results[baseline]
        for name, (ips, gf) in results.items():
            print(f"{name:24s} {gf:7.2f} {gf / base_gflops:10.3f} {ips:7.2f} {base_ips / ips:10.3f}", flush=True)


if __name__ == "__main__":
    main()
