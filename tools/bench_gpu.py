"""Training-step images/s per variant on a GPU: float32 / mixed float16 / mixed bfloat16, with and without XLA,
on synthetic input and on the real records pipeline (so an input-bound run shows), with the device and its peak
memory. Runs under KERAS_BACKEND=tensorflow (default) or jax (the models use Keras ops only).

Usage: .venv/bin/python tools/bench_gpu.py [--variants densenet121-lka-last2,...] [--batch 64] [--steps 20]
       [--precisions float32,mixed_float16,mixed_bfloat16] [--xla both|on|off] [--records DIR] [--tiny]
  --records: a records folder (`cxrkeras build-records --encoding raw` is the fastest to read); without it, raw
    records are built once from ../shared/data/nih-512px (421 NIH images at 256 px) into a temporary folder.
  --tiny: a check that the script works on any machine (CPU included): thin DenseNet121-LKA-last2 (1 layer per
    dense block), 64 px, batch 4, 2 steps, records from the bundled 64 px sample.
The real-pipeline rows read with `build_dataset(..., training=True)` (augmentation on the CPU, tf.data); under JAX
the batches go through NumPy. Images/s are medians over `--steps` timed steps after 2 warm-up steps.
Target (issue 19): >= 2,000 images/s for densenet121-lka-last2 at 224, real pipeline, on one A100/H100/H200-class
GPU (the paper: ~100 images/s on a T4-class GPU).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

DEFAULT_VARIANTS = ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full",
                    "vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def device_info():
    """(backend, device description, function returning peak bytes so far or None, reset function)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        stats = getattr(dev, "memory_stats", lambda: None)

        def peak():
            s = stats() or {}
            return s.get("peak_bytes_in_use")

        return backend, f"{dev.platform.upper()} {dev.device_kind} (jax {jax.__version__})", peak, lambda: None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        import platform

        return backend, f"CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}; TF " \
                        f"{tf.__version__})", lambda: None, lambda: None
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    details = tf.config.experimental.get_device_details(gpus[0])
    name = f"{details.get('device_name', 'GPU')} (compute capability {details.get('compute_capability')}; " \
           f"{len(gpus)} visible, the first used; TF {tf.__version__})"

    def peak():
        return tf.config.experimental.get_memory_info("GPU:0")["peak"]

    def reset():
        tf.config.experimental.reset_memory_stats("GPU:0")

    return backend, name, peak, reset


def real_batches(records, batch, size, backend):
    """An endless iterator of (images, labels) from the training pipeline (NumPy under JAX)."""
    from cxrkeras.data.pipeline import build_dataset

    ds = build_dataset(records, "train", stage=2, batch_size=batch, training=True, image_size=size, seed=0,
                       repeat=True, verify="size")
    return ds.as_numpy_iterator() if backend == "jax" else iter(ds)


def time_steps(model, next_batch, steps):
    """Median images/s of `steps` train steps after 2 warm-up steps (trace, compile)."""
    import keras

    for _ in range(2):
        model.train_on_batch(*next_batch())
    times, n = [], 0
    for _ in range(steps):
        x, y = next_batch()
        t0 = time.perf_counter()
        loss = model.train_on_batch(x, y)
        keras.ops.convert_to_numpy(loss)  # the step is done when its loss is on the host
        times.append(time.perf_counter() - t0)
        n = int(x.shape[0])
    return n / statistics.median(times)


def run_row(variant, precision, xla, source, args, records, peak, reset):
    import keras

    from cxrkeras.models import build_model

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model(variant, input_shape=(args.size, args.size, 3), **args.overrides)
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=xla)
        classes = int(model.output_shape[-1])
        if source == "synthetic":
            rng = np.random.default_rng(0)
            x = keras.ops.convert_to_tensor(rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32"))
            y = keras.ops.convert_to_tensor(rng.integers(0, 2, size=(args.batch, classes)).astype("float32"))

            def next_batch():
                return x, y
        else:
            it = real_batches(records, args.batch, args.size, keras.backend.backend())

            def next_batch():
                images, labels = next(it)
                return images, labels[:, :classes]
        reset()
        rate = time_steps(model, next_batch, args.steps)
        used = peak()
        return f"{rate:10.1f} {'-' if used is None else f'{used / 2**30:.2f}':>9}"
    except Exception as exc:  # a precision or XLA the device does not support: say so, go on
        return f"{'failed':>10} {'':>9}  {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def tiny_records(tmp):
    from cxrkeras.data.records import build_records

    sample = os.path.join(ROOT, "cxrkeras", "sample_data", "nih-64px")
    out = os.path.join(tmp, "records")
    build_records(os.path.join(sample, "Data_Entry_2017.csv"), os.path.join(sample, "images"), out, image_size=64,
                  shard_size=256, progress=False, encoding="raw")
    return out


def nih_records(tmp):
    from cxrkeras.data.records import build_records

    src = os.path.join(ROOT, os.pardir, "shared", "data", "nih-512px")
    out = os.path.join(tmp, "records")
    build_records(os.path.join(src, "Data_Entry_2017.csv"), os.path.join(src, "images"), out,
                  split_fractions=(1.0, 0.0, 0.0), image_size=256, shard_size=64, progress=False, encoding="raw")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--xla", default="both", choices=("both", "on", "off"))
    parser.add_argument("--inputs", default="synthetic,real", help="synthetic, real or both (comma-separated)")
    parser.add_argument("--records", default=None, help="records folder for the real-pipeline rows")
    parser.add_argument("--tiny", action="store_true", help="a quick check on any machine (see the usage)")
    args = parser.parse_args(argv)
    args.overrides = {}
    if args.tiny:
        args.variants, args.batch, args.size, args.steps = "densenet121-lka-last2", 4, 64, 2
        args.overrides = {"blocks": [1, 1, 1, 1]}
    backend, device, peak, reset = device_info()
    print(f"# bench_gpu: Keras backend {backend}; device {device}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"training step (Adam, BCE), batch {args.batch}, {args.size}x{args.size}"
          f"{', thin DenseNet (1 layer per dense block)' if args.tiny else ''}; median of {args.steps} steps")
    tmp = tempfile.mkdtemp(prefix="bench_gpu_")
    try:
        inputs = args.inputs.split(",")
        records = None
        if "real" in inputs:
            try:
                records = args.records or (tiny_records(tmp) if args.tiny else nih_records(tmp))
            except Exception as exc:  # no TensorFlow (a JAX-only machine) or no data: synthetic rows only
                print(f"real-pipeline rows skipped: {type(exc).__name__}: {exc}")
                inputs = [i for i in inputs if i != "real"]
        xlas = {"both": (False, True), "on": (True,), "off": (False,)}[args.xla]
        print(f"{'variant':<24} {'precision':<15} {'XLA':<4} {'input':<10} {'images/s':>10} {'peak GiB':>9}")
        for variant in args.variants.split(","):
            for precision in args.precisions.split(","):
                for xla in xlas:
                    for source in inputs:
                        cell = run_row(variant, precision, xla, source, args, records, peak, reset)
                        print(f"{variant:<24} {precision:<15} {'on' if xla else 'off':<4} {source:<10} {cell}",
                              flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
