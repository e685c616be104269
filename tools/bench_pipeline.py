"""Images/s of the tf.data records pipeline vs a PIL/NumPy generator and a Keras directory loader, in one run.

All three do the same work per image (training mode, 224x224): random crop + zoom (0.8-1.0 of the side),
rotation within ±10°, horizontal flip, gray -> 3 channels, ImageNet "torch" normalisation, batches of 32.
  (1) cxrkeras.data.build_dataset on records built from the PNGs (records at 256 px, built once, not timed)
  (2) the original PNG files through a plain Python generator: PIL open/rotate/crop/flip/resize + NumPy normalise
  (3) keras.utils.image_dataset_from_directory (decode + resize to 256 at load) + keras.layers augmentation
(1b-1d) the same pipeline with cache=True, with a file cache, and in eval mode, for reference.
Usage: python tools/bench_pipeline.py [--images ../shared/data/nih-512px] [--seconds 10]
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZE, BATCH, STORED = 224, 32, 256
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def build_records_dir(csv_path, images_dir, out):
    """Records of all images in one 'train' split, with build_records; (how, seconds)."""
    from cxrkeras.data.records import build_records

    t0 = time.perf_counter()
    build_records(csv_path, images_dir, out, split_fractions=(1.0, 0.0, 0.0), image_size=STORED, shard_size=64,
                  progress=False)
    return "cxrkeras.data.records.build_records", time.perf_counter() - t0


def measure(batches, seconds):
    """Images/s over at least `seconds` after one warm-up batch."""
    next(batches)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(batches)[0]
        n += int(x.shape[0])
    return n / (time.perf_counter() - t0), n


def pil_generator(paths, seed=0):
    """The straightforward loader: one image at a time in Python."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    while True:
        for start in range(0, len(paths) - BATCH + 1, BATCH):
            images = []
            for path in paths[start:start + BATCH]:
                img = Image.open(path).convert("L")
                w, h = img.size
                img = img.rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
                side = int(rng.uniform(0.8, 1.0) * min(w, h))
                left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                img = img.crop((left, top, left + side, top + side))
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img = img.resize((SIZE, SIZE), Image.BILINEAR)
                x = np.asarray(img, np.float32)[..., None].repeat(3, axis=-1) / 255.0
                images.append((x - MEAN) / STD)
            yield np.stack(images), None
        rng.shuffle(paths)


def keras_directory_dataset(folder, seed=0):
    import keras
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(folder, labels=None, color_mode="grayscale", batch_size=BATCH,
                                                  image_size=(STORED, STORED), shuffle=True, seed=seed, verbose=False)
    augment = keras.Sequential([
        keras.layers.RandomZoom((-0.2, 0.0), fill_mode="reflect", seed=seed),  # zoom in up to 1/0.8
        keras.layers.RandomRotation(10 / 360, fill_mode="reflect", seed=seed),
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomCrop(SIZE, SIZE, seed=seed),
    ])

    def apply(x):
        x = augment(x, training=True)
        x = tf.repeat(x, 3, axis=-1) / 255.0
        return (x - MEAN) / STD, 0

    return ds.repeat().map(apply, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data", "nih-512px")
    parser.add_argument("--images", default=os.path.normpath(default), help="folder with Data_Entry_2017.csv, images/")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per loader")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from cxrkeras.data.pipeline import build_dataset

    csv_path, images_dir = os.path.join(args.images, "Data_Entry_2017.csv"), os.path.join(args.images, "images")
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    try:
        records = os.path.join(tmp, "records")
        how, build_s = build_records_dir(csv_path, images_dir, records)
        ids = [m["image_id"].numpy() for _, _, m in build_dataset(records, "train", batch_size=BATCH,
                                                                      image_size=32, return_ids=True)]
        ids = [i.decode() for batch in ids for i in batch]
        paths = [os.path.join(images_dir, i) for i in ids]
        flat = os.path.join(tmp, "flat")  # the same image files, alone in a folder, for the directory loader
        os.makedirs(flat)
        for p in paths:
            os.symlink(os.path.abspath(p), os.path.join(flat, os.path.basename(p)))
        print(f"{len(paths)} images from {args.images}; records ({STORED} px PNG, {how}) built in {build_s:.1f} s; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; batch {BATCH}, {SIZE}x{SIZE}")

        def ours(cache, training=True):
            ds = build_dataset(records, "train", batch_size=BATCH, training=training, image_size=SIZE, seed=0,
                               repeat=True, cache=cache)
            return iter(ds)

        rows = [
            ("(1) cxrkeras build_dataset (records)", lambda: ours(False)),
            ("(1b) same, cache=True (decoded in RAM)", lambda: ours(True)),
            ("(1c) same, cache=<file> (decoded on disk)", lambda: ours(os.path.join(tmp, "cache"))),
            ("(1d) eval mode (no augmentation)", lambda: ours(False, training=False)),
            ("(2) PIL/NumPy generator (PNG files)", lambda: pil_generator(list(paths))),
            ("(3) keras image_dataset_from_directory", lambda: iter(keras_directory_dataset(flat))),
        ]
        results = {}
        for name, make in rows:
            results[name] = measure(make(), args.seconds)
        base = next(rate for name, (rate, _) in results.items() if name.startswith("(2)"))
        print(f"\n{'loader':<42} {'images/s':>9} {'images':>7} {'vs (2)':>7}")
        for name, (rate, n) in results.items():
            print(f"{name:<42} {rate:>9.1f} {n:>7d} {rate / base:>6.1f}x")
        print(f"load average after: {os.getloadavg()[0]:.1f}; TF {tf.__version__}. Timed after one warm-up batch; "
              f"cached rows include their first (decoding) epoch of {len(paths)} images.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
