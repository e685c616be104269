"""Benchmark `build_records`: images/s with 1 and 2 workers (side by side, interleaved) and the --dry-run time.

Usage: .venv/bin/python tools/bench_build_records.py [--images-root ../shared/data/nih-512px]
       [--labels ../shared/data/nih-labels/all_labels.csv] [--repeats 2] [--image-size 256]
Prints one table; the ratio column is images/s relative to 1 worker measured in the same run.
"""

import argparse
import os
import resource
import shutil
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, os.pardir, os.pardir, "shared", "data"))


def _timed_build(csv_path, images, workers, image_size):
    from cxrkeras.data.records import build_records

    out = tempfile.mkdtemp(prefix="bench-records-")
    try:
        cpu0 = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        start = time.perf_counter()
        report = build_records(csv_path, images, out, image_size=image_size, shard_size=100, workers=workers,
                               progress=False)
        seconds = time.perf_counter() - start
        cpu = time.process_time() + resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - cpu0
        images_written = sum(s["images"] for s in report.manifest["splits"].values())
        return images_written, seconds, cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-root", default=os.path.join(SHARED, "nih-512px"))
    parser.add_argument("--labels", default=os.path.join(SHARED, "nih-labels", "all_labels.csv"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args()

    import tensorflow as tf  # noqa: F401  imported once up front so no timing includes it

    from cxrkeras.data.records import build_records

    csv_path = os.path.join(args.images_root, "Data_Entry_2017.csv")
    images = os.path.join(args.images_root, "images")
    load_before = os.getloadavg()[0]
    best = {}
    for _ in range(args.repeats):  # interleaved, best of N: other processes on the machine disturb both alike
        for workers in (1, 2):
            result = _timed_build(csv_path, images, workers, args.image_size)
            best[workers] = min(best.get(workers, result), result, key=lambda t: t[1])

    dry_out = tempfile.mkdtemp(prefix="bench-dry-")
    try:
        start = time.perf_counter()
        report = build_records(args.labels, None, dry_out, dry_run=True, progress=False)
        dry_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(dry_out, ignore_errors=True)
    dry_rows = report.manifest["csv"]["rows"]

    base = best[1][0] / best[1][1]
    print(f"build_records benchmark ({os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after: other processes share the CPUs; {args.image_size}px PNG, "
          f"best of {args.repeats})")
    print(f"{'case':<34}{'items':>8}{'seconds':>10}{'items/s':>10}{'ratio':>8}{'CPU ms/item':>13}")
    for workers in (1, 2):
        n, seconds, cpu = best[workers]
        print(f"{f'nih-512px, {workers} worker(s)':<34}{n:>8}{seconds:>10.2f}{n / seconds:>10.1f}"
              f"{(n / seconds) / base:>8.2f}{1000 * cpu / n:>13.1f}")
    print(f"{'--dry-run all_labels.csv (rows)':<34}{dry_rows:>8}{dry_seconds:>10.2f}{dry_rows / dry_seconds:>10.0f}")


if __name__ == "__main__":
    main()
