"""cxrkeras side by side with what a PyTorch user would run, in one process on one machine: the input pipeline vs a
`torch.utils.data.DataLoader` with PIL, the training step vs the paper's PyTorch modules, and build-records at scale.

Usage: .venv/bin/python tools/bench_vs_torch.py [--quick] [--sections pipeline,build,step] [--variants a,b]
       [--images ../shared/data/nih-512px] [--seconds 8] [--copies 10] [--steps 3] [--jit all|none|<variants>]
Needs torch (the dev extra: torch==2.13.0, CPU). The PyTorch networks are the paper's modules written in plain
PyTorch for the equivalence tests (tests/torch_reference.py; no torchvision).

Input pipeline (training mode, batch 32, 224 px; the same augmentation everywhere: random square crop of 0.8-1.0
of the side + zoom to 224, rotation within +-10 degrees, horizontal flip, gray -> 3 channels, ImageNet mean/std):
  - cxrkeras `build_dataset` on 256 px records, PNG and raw (`build-records --encoding raw`);
  - `DataLoader(num_workers=<cores>, pin_memory=False)` with PIL + torch ops over (a) 1024 px PNG files, the NIH
    originals' size: here the 512 px NIH files upscaled 2x (bicubic), as only 512 px files are bundled, and
    (b) the same images as PNG files pre-resized to the records' 256 px;
  every loader sees each image --copies times per epoch (default 10: 4,210 images, records listed 10 times, the
  DataLoaders' file lists repeated; NIH's training split has ~78,000), plus raw records at 421 per epoch, where the
  shuffle buffer refilling at each epoch start shows; images/s and CPU us per image (process + workers);
  - where the time of the raw-record pipeline goes: the read + parse + decode_raw alone, the augmentation warp
    and the normalisation alone (wall and CPU us per image, on the same machine), against build_dataset's CPU
    time per image: the difference is the pipeline's own work (record checks, shuffle, batching, tf.data).
build-records at scale: images/s of building 256 px records from the 1024 px PNG files with 1 and 2 workers, PNG
and raw, shard bytes, and the projected wall time for NIH's 112,120 images on 2 and 16 cores (measured per-image
cost x count; the whole build timed, start-up included).
Training step (Adam, BCE, fp32, batch 8, 224 px, the same thread count): each paper variant in cxrkeras with and
without `jit_compile` (XLA) and in PyTorch, interleaved rounds (one step of each per round, median reported).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIZE, BATCH, STORED, STEP_BATCH = 224, 32, 256, 8
NIH_IMAGES = 112_120
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VARIANTS = ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full",
            "vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")
TESTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests")


def load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# --- inputs ---------------------------------------------------------------------------------------------------

def make_inputs(src, tmp, limit):
    """(csv, 1024 px folder, 256 px folder, image names): the NIH 512 px files upscaled to 1024 px PNG (bicubic,
    gray, PNG's default compression as NIH's files), and the same images pre-resized to 256 px by build-records'
    own resize (cxrkeras.data.images.resize), as PNG files."""
    from PIL import Image

    from cxrkeras.data import images as imglib

    with open(os.path.join(src, "Data_Entry_2017.csv")) as f:
        lines = f.read().splitlines()
    rows = lines[1:1 + limit] if limit else lines[1:]
    big, small = os.path.join(tmp, "nih-1024", "images"), os.path.join(tmp, "nih-256")
    os.makedirs(big)
    os.makedirs(small)
    names = []
    for row in rows:
        name = row.split(",")[0]
        with Image.open(os.path.join(src, "images", name)) as img:
            gray = img.convert("L")
        gray.resize((1024, 1024), Image.Resampling.BICUBIC).save(os.path.join(big, name))
        Image.fromarray(imglib.resize(np.asarray(gray), (STORED, STORED))).save(os.path.join(small, name))
        names.append(name)
    csv_path = os.path.join(tmp, "nih-1024", "Data_Entry_2017.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join([lines[0]] + rows) + "\n")
    return csv_path, big, small, names


def build(csv_path, images, out, encoding, workers):
    """(seconds, shard bytes, workers used) of build-records into `out` (one train split, 256 px)."""
    from cxrkeras.data.records import build_records

    start = time.perf_counter()
    report = build_records(csv_path, images, out, split_fractions=(1.0, 0.0, 0.0), image_size=STORED,
                           shard_size=64, workers=workers, progress=False, encoding=encoding)
    seconds = time.perf_counter() - start
    size = sum(s["bytes"] for s in report.manifest["splits"]["train"]["shards"])
    return seconds, size, max(1, report.workers)


def encode_cost(paths, encoding, seconds):
    """Core-seconds per image of build-records' own per-image work (read the source, resize, encode: the function
    its workers run), on one core, over at least `seconds`."""
    from cxrkeras.data import shards

    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 4:
        shards._encode_task((paths[n % len(paths)], (STORED, STORED), 1, encoding))
        n += 1
    return (time.perf_counter() - t0) / n


# --- input pipelines ------------------------------------------------------------------------------------------

def cpu_seconds():
    """User + system CPU seconds of this process (all threads) and of its live child processes (DataLoader
    workers), from /proc (Linux); getrusage alone would miss children that have not exited."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # fields[1]: ppid; [11], [12]: utime, stime in clock ticks
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(batches, seconds):
    """(images/s, images, CPU us per image) over at least `seconds` after two warm-up batches; CPU: this process
    and its children, user + system (load-independent where wall time is not)."""
    next(batches)
    next(batches)
    n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - t0 < seconds:
        n += int(next(batches)[0].shape[0])
    return n / (time.perf_counter() - t0), n, (cpu_seconds() - c0) / n * 1e6


class PILDataset:
    """What a PyTorch user writes (torchvision's RandomResizedCrop/RandomRotation/RandomHorizontalFlip/Normalize,
    in PIL + torch ops since torchvision's wheels do not import with the CPU torch): one image per item."""

    def __init__(self, paths, seed=0):
        self.paths, self.seed = list(paths), seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        rng = np.random.default_rng([self.seed, i, int(torch.initial_seed() % (1 << 31))])
        img = Image.open(self.paths[i]).convert("L")
        w, h = img.size
        img = img.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
        side = int(rng.uniform(0.8, 1.0) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, np.uint8).copy()).float().div_(255.0).expand(3, SIZE, SIZE)
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        return (x - mean) / std, torch.zeros(14)


def torch_loader(paths, workers):
    import torch

    loader = torch.utils.data.DataLoader(PILDataset(paths), batch_size=BATCH, shuffle=True, num_workers=workers,
                                         pin_memory=False, drop_last=True, persistent_workers=workers > 0)

    def forever():
        while True:
            yield from loader

    return forever()


def ours(records):
    from cxrkeras.data.pipeline import build_dataset

    return iter(build_dataset(records, "train", batch_size=BATCH, training=True, image_size=SIZE, seed=0,
                              repeat=True))


def copied(records, out, copies):
    """A records folder whose train split lists every shard of `records` `copies` times (hard links, else copies;
    the manifest's counts multiplied): an epoch `copies` times longer, as NIH's 78,000 training images make it,
    so that the shuffle buffer (2,048) refilling at each epoch start does not dominate a 421-image epoch."""
    os.makedirs(out)
    with open(os.path.join(records, "manifest.json")) as f:
        manifest = json.load(f)
    info = manifest["splits"]["train"]
    shards = []
    for c in range(copies):
        for shard in info["shards"]:
            name = f"copy{c}-{shard['file']}"
            try:
                os.link(os.path.join(records, shard["file"]), os.path.join(out, name))
            except OSError:
                shutil.copy(os.path.join(records, shard["file"]), os.path.join(out, name))
            shards.append(dict(shard, file=name))
    info["shards"] = shards
    for key in ("images", "patients", "no_finding"):
        info[key] = info[key] * copies
    info["positives"] = {k: v * copies for k, v in info["positives"].items()}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return out


def where_time_goes(records, seconds):
    """{part: (wall us, CPU us) per image} of the raw pipeline's parts, each run alone (under this machine's load):
    the read + parse + decode_raw as a plain parallel tf.data map, the warp, the normalisation."""
    import tensorflow as tf

    from cxrkeras.data import augment, features
    from cxrkeras.data import manifest as mf
    from cxrkeras.data.normalize import to_model_input

    m = mf.load_manifest(records)
    paths = mf.shard_paths(m, records, "train")
    spec = features.feature_spec(len(m["labels"]))
    read = (tf.data.Dataset.from_tensor_slices(paths).interleave(tf.data.TFRecordDataset, cycle_length=8,
                                                                 num_parallel_calls=tf.data.AUTOTUNE).repeat()
            .map(lambda r: features.decode_pixels(tf.io.parse_single_example(r, spec), 1, "raw"),
                 num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE))
    rate, _, cpu = measure(iter(read.map(lambda x: (x,))), seconds)
    out = {"read + parse + decode_raw (plain parallel tf.data map)": (1e6 / rate, cpu)}
    images = tf.cast(next(iter(read)), tf.float32)
    t = augment.augment_transforms(BATCH, STORED, STORED, SIZE, tf.constant([1, 2], tf.int64))
    warp = tf.function(lambda x, t: augment.warp_in_range(x, t, SIZE, "reflect"), jit_compile=True)
    norm = tf.function(lambda x: to_model_input(x, "torch"), jit_compile=True)
    warped = warp(images, t)
    for name, fn in (("augmentation warp (XLA, batches of 32)", lambda: warp(images, t)),
                     ("3 channels + normalisation (XLA)", lambda: norm(warped))):
        fn()
        n, t0, c0 = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - t0 < seconds / 2:
            fn()  # eager calls return when the result is computed
            n += BATCH
        out[name] = ((time.perf_counter() - t0) / n * 1e6, (cpu_seconds() - c0) / n * 1e6)
    return out


def pipeline_section(args, tmp, csv_path, big, small, names, records):
    cores = os.cpu_count() or 1
    k = max(1, args.copies)
    longer = {enc: copied(path, os.path.join(tmp, f"records-{enc}-x{k}"), k) for enc, path in records.items()}
    print(f"\n## Input pipeline: training mode, batch {BATCH}, {SIZE}x{SIZE}, {len(names)} NIH images "
          f"(512 px files; 1024 px = upscaled 2x) x {k} per epoch, {cores} cores; load average before: {load()}")
    rows = [
        ("cxrkeras build_dataset, PNG records (256 px)", lambda: ours(longer["png"])),
        ("cxrkeras build_dataset, raw records (256 px)", lambda: ours(longer["raw"])),
        (f"  the same, {len(names)} images per epoch (x1)", lambda: ours(records["raw"])),
        (f"DataLoader(num_workers={cores}) + PIL, 1024 px PNG files (a)",
         lambda: torch_loader([os.path.join(big, n) for n in names] * k, cores)),
        (f"DataLoader(num_workers={cores}) + PIL, 256 px PNG files (b)",
         lambda: torch_loader([os.path.join(small, n) for n in names] * k, cores)),
    ]
    results = {name: measure(make(), args.seconds) for name, make in rows}
    rate_a, rate_b = results[rows[3][0]][0], results[rows[4][0]][0]
    print(f"{'loader':<58} {'images/s':>9} {'images':>7} {'vs (a)':>7} {'vs (b)':>7} {'CPU us/image':>12}")
    for name, (rate, n, cpu) in results.items():
        print(f"{name:<58} {rate:>9.1f} {n:>7d} {rate / rate_a:>6.1f}x {rate / rate_b:>6.1f}x {cpu:>12.0f}")
    print(f"CPU us/image: user + system seconds of the process and its DataLoader workers per image (the load-"
          f"independent cost; {cores} cores give at most {cores} x 1e6 / that images/s); load average after: {load()}")
    parts = where_time_goes(longer["raw"], args.seconds)
    print("\nwhere the raw-record pipeline's time goes (per image; each part alone):")
    print(f"  {'part':<56} {'wall us':>8} {'CPU us':>8}")
    for name, (wall, cpu) in parts.items():
        print(f"  {name:<56} {wall:8.0f} {cpu:8.0f}")
    whole = results[rows[1][0]][2]
    cpu_parts = sum(cpu for _, cpu in parts.values())
    print(f"  {'sum of the parts':<56} {sum(w for w, _ in parts.values()):8.0f} {cpu_parts:8.0f}")
    print(f"  {'build_dataset, raw records (the row above)':<56} {'':>8} {whole:8.0f}")
    print(f"  {'  its own work beyond the parts (checks, shuffle, batching, tf.data)':<56} {'':>8} "
          f"{whole - cpu_parts:8.0f}")
    print(f"  ceiling on {cores} cores: {cores * 1e6 / cpu_parts:,.0f} images/s from the parts' CPU time, "
          f"{cores * 1e6 / whole:,.0f} from build_dataset's; the warp + normalisation alone allow "
          f"{cores * 1e6 / (cpu_parts - parts[next(iter(parts))][1]):,.0f}")


def build_section(args, tmp, csv_path, big, names):
    cores = os.cpu_count() or 1
    print(f"\n## build-records at scale: {len(names)} 1024 px PNG files -> 256 px records; load average before: "
          f"{load()}")
    paths = [os.path.join(big, n) for n in names]
    print(f"{'encoding':<9} {'ms/image':>9} {'img/s/core':>10} {'112,120: 2 cores':>17} {'16 cores':>9}   "
          f"{'whole build':>11} {'workers':>7} {'images/s':>9} {'shard MB':>9} {'KB/image':>9}")
    records = {}
    for encoding in ("png", "raw"):
        cost = encode_cost(paths, encoding, args.seconds)
        out = os.path.join(tmp, f"records-{encoding}")
        seconds, size, used = build(csv_path, os.path.dirname(big), out, encoding, cores)
        print(f"{encoding:<9} {cost * 1e3:>9.1f} {1 / cost:>10.1f} {NIH_IMAGES * cost / 2 / 60:>13.1f} min "
              f"{NIH_IMAGES * cost / 16 / 60:>5.1f} min   {seconds:>9.1f} s {used:>7} {len(names) / seconds:>9.1f} "
              f"{size / 1e6:>9.1f} {size / len(names) / 1e3:>9.1f}", flush=True)
        records[encoding] = out
    print("ms/image: build-records' per-image work (read + decode the 1024 px PNG, Lanczos resize, encode) on one "
          "core; projection = that x 112,120 / cores (perfect scaling; the parent's writing and hashing run beside "
          "the workers). whole build: build_records() on all cores, start-up and hashing included (it uses 1 worker "
          f"below {2 * 100} images); load average after: {load()}")
    return records


# --- training step --------------------------------------------------------------------------------------------

def step_section(args):
    import keras
    import tensorflow as tf
    import torch

    sys.path.insert(0, os.path.abspath(TESTS_DIR))
    from torch_reference import REFERENCES

    from cxrkeras.models import build_model

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    # TensorFlow's CPU threads flush denormals to zero (FTZ/DAZ); PyTorch's do not by default, and the paper's modules
    # from random weights hit denormals in their first steps, which then run up to 10x slower (measured): flushed
    # here too, so both run at their steady-state speed
    torch.set_flush_denormal(True)
    size = args.step_size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEP_BATCH, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(STEP_BATCH, 14)).astype("float32")
    xt, yt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    thin = {"blocks": [2, 2, 2, 2]} if args.thin else {}  # --quick: DenseNet with 2 layers per dense block
    jit = set(variants) if args.jit == "all" else set() if args.jit == "none" else set(args.jit.split(","))
    print(f"\n## Training step: Adam, BCE, float32, batch {STEP_BATCH}, {size}x{size}{' (thin)' if thin else ''}, median of {args.steps} "
          f"interleaved rounds after {max(1, args.warmup)} untimed steps each; TF {tf.__version__} (inter/intra-op "
          f"threads: default, {cores} cores), torch {torch.__version__} ({torch.get_num_threads()} threads, denormals "
          f"flushed as TensorFlow's CPU threads do); load average before: {load()}")
    print(f"{'variant':<24} {'cxrkeras':>9} {'+ XLA':>9} {'PyTorch':>9} {'cxrkeras/PyTorch':>17} "
          f"{'XLA/PyTorch':>12}   (images/s)")
    for name in variants:
        keras.backend.clear_session()
        steps = {}
        for use_jit in (False, True) if name in jit else (False,):
            model = build_model(name, input_shape=(size, size, 3), **thin)
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=use_jit)
            for _ in range(max(1, args.warmup)):  # trace (+ XLA compile) and warm-up steps, not timed
                model.train_on_batch(x, y)
            steps["xla" if use_jit else "keras"] = lambda model=model: model.train_on_batch(x, y)
        net = REFERENCES[name][0](num_classes=14, **({"blocks": thin["blocks"]} if thin else {}))
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        loss_fn = torch.nn.BCEWithLogitsLoss()  # the modules end with the linear layer (logits)

        def torch_step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xt), yt)
            loss.backward()
            opt.step()

        for _ in range(max(1, args.warmup)):
            torch_step()
        steps["torch"] = torch_step
        times = {k: [] for k in steps}
        for _ in range(args.steps):
            for k, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        ips = {k: STEP_BATCH / statistics.median(v) for k, v in times.items()}
        xla = f"{ips['xla']:>9.2f}" if "xla" in ips else f"{'-':>9}"
        xla_ratio = f"{ips['xla'] / ips['torch']:>11.2f}x" if "xla" in ips else f"{'-':>12}"
        print(f"{name:<24} {ips['keras']:>9.2f} {xla} {ips['torch']:>9.2f} {ips['keras'] / ips['torch']:>16.2f}x "
              f"{xla_ratio}", flush=True)
    print(f"load average after: {load()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "shared", "data", "nih-512px")
    parser.add_argument("--images", default=os.path.normpath(default), help="folder with Data_Entry_2017.csv, images/")
    parser.add_argument("--sections", default="build,pipeline,step", help="any of build, pipeline, step")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per loader")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--copies", type=int, default=10,
                        help="input pipeline: each image N times per epoch, in every loader (default 10: 4,210 "
                             "images, so that epoch starts, where the shuffle buffer refills, do not dominate)")
    parser.add_argument("--variants", default=None, help=f"training-step variants (default: {','.join(VARIANTS)})")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per network")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed training steps per network and framework before the timed rounds (the first "
                             "steps build kernels and caches; PyTorch's also allocate its autograd buffers)")
    parser.add_argument("--step-size", type=int, default=SIZE, help="training-step image size")
    parser.add_argument("--jit", default="all", help="XLA rows: all, none or comma-separated variants")
    parser.add_argument("--thin", action="store_true", help="training step of thin DenseNets (2 layers per block)")
    parser.add_argument("--quick", action="store_true",
                        help="96 images, 3 s per loader, training step of a thin densenet121-lka-after (2 layers "
                             "per dense block) at 112 px, 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.seconds, args.steps, args.step_size = args.limit or 96, 3.0, 2, 112
        args.variants, args.thin = args.variants or "densenet121-lka-after", True
    sections = set(args.sections.split(","))
    import tensorflow as tf

    print(f"# bench_vs_torch: {os.cpu_count()} CPUs, TF {tf.__version__}, load average {load()} (1, 5, 15 min)")
    tmp = tempfile.mkdtemp(prefix="bench_vs_torch_")
    try:
        if sections & {"build", "pipeline"}:
            t0 = time.perf_counter()
            csv_path, big, small, names = make_inputs(args.images, tmp, args.limit)
            print(f"inputs: {len(names)} images of {args.images} as 1024 px and 256 px PNG files "
                  f"({time.perf_counter() - t0:.0f} s, not timed)")
            records = build_section(args, tmp, csv_path, big, names)
            if "pipeline" in sections:
                pipeline_section(args, tmp, csv_path, big, small, names, records)
        if "step" in sections:
            step_section(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
