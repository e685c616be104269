"""Training-step throughput of the paper's LKA variants vs their no-LKA baselines, beside their FLOP ratios.

Usage: .venv/bin/python tools/bench_models.py [--batch 4] [--steps 3] [--size 224] [--variants a,b,...]
Measured side by side in one run; the time ratio (LKA overhead in time) is compared with the FLOP ratio.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAIRS = (("densenet121", ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full")),
         ("vgg16-bn", ("vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")))


def measure(variant, batch, steps, size):
    """(images/s over `steps` timed training steps after one warm-up step, GFLOPs) of one variant."""
    import keras
    import numpy as np

    from cxrkeras.models import build_model, gflops

    keras.backend.clear_session()
    model = build_model(variant, input_shape=(size, size, 3))
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(batch, 14)).astype("float32")
    model.train_on_batch(x, y)  # trace + first-run kernel setup, not timed
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return batch * steps / (time.perf_counter() - start), gflops(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--variants", default=None, help="comma-separated LKA variants (default: the paper's six)")
    args = parser.parse_args()
    wanted = set(args.variants.split(",")) if args.variants else None
    import tensorflow as tf

    print(f"training step, batch {args.batch}, {args.steps} timed steps, {args.size}x{args.size}, float32, "
          f"CPU ({os.cpu_count()} cores, TF {tf.__version__}); ratios vs the no-LKA baseline above each group")
    print(f"{'variant':24s} {'GFLOPs':>7s} {'FLOP ratio':>10s} {'img/s':>7s} {'time ratio':>10s}", flush=True)
    for baseline, variants in PAIRS:
        variants = [v for v in variants if wanted is None or v in wanted]
        if not variants:
            continue
        base_ips, base_gflops = measure(baseline, args.batch, args.steps, args.size)
        print(f"{baseline:24s} {base_gflops:7.2f} {1.0:10.3f} {base_ips:7.2f} {1.0:10.3f}", flush=True)
        for variant in variants:
            ips, gf = measure(variant, args.batch, args.steps, args.size)
            print(f"{variant:24s} {gf:7.2f} {gf / base_gflops:10.3f} {ips:7.2f} {base_ips / ips:10.3f}", flush=True)


if __name__ == "__main__":
    main()
