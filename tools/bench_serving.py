"""Benchmark the exported SavedModel on this machine: batch-1 latency (median, p95) and batch-32 throughput.

Exports densenet121-lka-last2 (weights=None, 224x224, 14 labels) with cxrkeras.export, reloads it with
tf.saved_model.load and times, side by side in one run:
  * serving_default on PNG bytes of a 1024x1024 8-bit chest X-ray (NIH size: decode + resize in the graph),
  * predict_images on already preprocessed tensors,
  * the Keras model called directly (reference for the ratios).
Usage: python tools/bench_serving.py [--runs 30] [--batch-runs 5] [--variant densenet121-lka-last2]
"""

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

TARGET_MS = 150.0


def _png_1024():
    from PIL import Image

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, os.pardir, "cxrkeras", "sample_data", "nih-512px", "images", "00004296_000.png")
    img = Image.open(path).convert("L").resize((1024, 1024), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _interleaved(fns, runs, warmup=3):
    """Milliseconds per call of each function, calls taken in rotation."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            out[i].append((time.perf_counter() - t) * 1000.0)
    return out


def _p95(values):
    return float(np.percentile(values, 95))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="densenet121-lka-last2")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30, help="timed batch-1 calls per path")
    ap.add_argument("--batch-runs", type=int, default=5, help="timed batch-32 calls per path")
    args = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from cxrkeras.data.preprocessor import Preprocessor
    from cxrkeras.export.savedmodel import export
    from cxrkeras.models import build_model, get_variant

    size = args.image_size
    # a model trained on build-records' default 256 px grey records: serving resizes each upload as they were built
    pre = Preprocessor(image_size=size, preprocessing=get_variant(args.variant).preprocessing, stored_size=(256, 256),
                       channels=1)
    model = build_model(args.variant, weights=None, input_shape=(size, size, 3), preprocessor=pre)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = export(model, os.path.join(tmp, "bench"), verify=False, log=lambda *_: None)
        export_s = time.perf_counter() - t0
        loaded = tf.saved_model.load(result["path"])
        serve = loaded.signatures["serving_default"]
        images_fn = loaded.signatures["predict_images"]

        png = _png_1024()
        x1 = pre.from_bytes(tf.constant(png))[None]
        bytes1, bytes32 = tf.constant([png]), tf.constant([png] * 32)
        x32 = tf.repeat(x1, 32, axis=0)
        keras_fn = tf.function(lambda x: model(x, training=False))

        paths = (("SavedModel serving_default (1024 px PNG bytes)", lambda: serve(image_bytes=bytes1),
                  lambda: serve(image_bytes=bytes32)),
                 ("SavedModel predict_images (preprocessed)", lambda: images_fn(images=x1),
                  lambda: images_fn(images=x32)),
                 ("Keras model (tf.function, preprocessed)", lambda: keras_fn(x1), lambda: keras_fn(x32)))
        # calls rotate over the paths so that load from other processes hits all of them alike
        lat, thr = _interleaved([p[1] for p in paths], args.runs), _interleaved([p[2] for p in paths],
                                                                               args.batch_runs, warmup=1)
        rows = [(name, statistics.median(lat[i]), _p95(lat[i]), 32000.0 / statistics.median(thr[i]))
                for i, (name, _, _) in enumerate(paths)]

    ref = rows[-1][1]
    print(f"# bench_serving: {args.variant}, {size}x{size}, weights=None, {model.count_params():,} parameters; "
          f"preprocessing: {pre.describe()}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
          f"Python {sys.version.split()[0]}; export took {export_s:.1f} s; {args.runs} batch-1 calls, "
          f"{args.batch_runs} batch-32 calls per path")
    print()
    print("| path | batch 1 median (ms) | batch 1 p95 (ms) | batch-1 ratio vs Keras | batch 32 (images/s) |")
    print("|---|---|---|---|---|")
    for name, med, p95, ips in rows:
        print(f"| {name} | {med:.1f} | {p95:.1f} | {med / ref:.2f} | {ips:.1f} |")
    med = rows[0][1]
    print()
    print(f"target: median batch-1 latency of serving_default <= {TARGET_MS:.0f} ms: "
          f"{'MET' if med <= TARGET_MS else 'NOT MET'} ({med:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
