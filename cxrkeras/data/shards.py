"""Writing the shards of a records folder: the plan (which rows go to which shard file), per-shard receipts that
make re-runs idempotent and resumable, cleaning stale files, the folder lock and the pool of encoding workers."""

import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import socket
import tempfile

import numpy as np

from cxrkeras.constants import SPLITS
from cxrkeras.data import images as imglib
from cxrkeras.data.workers import EncoderPool
from cxrkeras.errors import DataError
from cxrkeras.fileio import read_json_or, replacing, write_json
from cxrkeras.hashing import sha256_file

RECEIPTS = ".receipts"  # one JSON per finished shard: what makes re-runs idempotent and resumable
BUILD_FILE = "build.json"  # in RECEIPTS: what the shards being written are built from (before any manifest exists)
LOCK_NAME = ".lock"  # flock'ed while a build-records writes the folder
SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$")
MIN_TASKS_PER_WORKER = 100  # below this, starting a process costs more than the images it would encode


def shard_name(split_name, i, n):
    return f"{split_name}-{i:05d}-of-{n:05d}.tfrecord"


def check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DataError(f"output folder {out!r} is not writable ({exc.strerror or exc}); "
                        f"choose another --out or fix its permissions") from exc


@contextlib.contextmanager
def folder_lock(out, holder="build-records", hint="wait for it to finish (then re-run to confirm), or choose another "
                                                   "--out"):
    """Hold an exclusive lock on `out` for one build: a second build-records into it is refused at once (the kernel
    drops the lock when the process ends, however it ends, so it never goes stale). `holder` and `hint` word the
    refusal for other commands that lock a folder (reproduce)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = os.path.join(out, LOCK_NAME)
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = "".join(c for c in f.read(200) if c.isprintable()).strip()
            raise DataError(f"{out} is being written by another {holder} ({who or 'another process'}): {hint}") \
                from None
        before = os.fstat(f.fileno())
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
        f.flush()
        if before.st_size:  # keep the file's time: a build that changes nothing leaves every mtime as it was
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        yield
    finally:
        f.close()


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _encode_task(task):
    """Worker: (path, size, channels, encoding) → (bytes, h, w, c, source (h, w), None) or
    (None, 0, 0, 0, None, reason). Pure PIL/numpy, no TF."""
    path, image_size, channels, encoding = task
    try:
        source = imglib.read_image(path, channels)
        return imglib.encode_resized(source, image_size, encoding) + (source.shape[:2], None)
    except imglib.ImageError as exc:
        return None, 0, 0, 0, None, exc.reason
    except Exception as exc:  # a decoder bug must not kill the whole build: report the file and go on
        return None, 0, 0, 0, None, f"cannot be decoded ({imglib.describe_error(exc)})"


def plan_shards(table, assign, shard_size, seed, fingerprint, paths, sizes, images_root):
    """{split: [(file, row indices, plan hash)]}: deterministic, so a re-run finds the same shards."""
    plan = {}
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(assign == s)
        idx = idx[np.argsort(np.array([table.image_id[i] for i in idx], dtype=object), kind="stable")]
        rng = np.random.default_rng([seed, s])
        idx = idx[rng.permutation(len(idx))]  # mix patients and labels across shards
        n = -(-len(idx) // shard_size)
        shards = []
        for i, chunk in enumerate(np.array_split(idx, n) if n else []):
            fname = shard_name(name, i, n)
            items = [
                [table.image_id[j],
                 os.path.relpath(paths[j], images_root) if paths[j] else None, int(sizes[j])]
                for j in chunk
            ]
            shards.append((fname, chunk, sha256_text(json.dumps([fingerprint, fname, items]))))
        plan[name] = shards
    return plan


def load_receipt(out, fname, plan_hash):
    path = os.path.join(out, RECEIPTS, fname + ".json")
    shard = os.path.join(out, fname)
    receipt = read_json_or(path)
    if not isinstance(receipt, dict) or receipt.get("plan") != plan_hash or not os.path.isfile(shard) or os.path.getsize(shard) != receipt.get("bytes"):
        return None
    # re-hash: a damaged shard of the right size must be rewritten, not kept (~1 GB/s, seconds for all of NIH)
    return receipt if sha256_file(shard) == receipt.get("sha256") else None


def clean_folder(out, planned_files):
    """Remove stale temporaries and shards of an older plan (they would be mistaken for records)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(out), "*.tmp-*")) + \
            glob.glob(os.path.join(glob.escape(out), RECEIPTS, "*.tmp-*")):
        os.remove(path)
    from cxrkeras.data.dadam import FIGURE, PROVENANCE, SHARD_RE as AUGMENT_RE

    for fname in os.listdir(out):  # augmentation shards are made again after the build, from its records
        if (SHARD_RE.match(fname) or AUGMENT_RE.match(fname)) and fname not in planned_files:
            os.remove(os.path.join(out, fname))
            removed.append(fname)
    for fname in (PROVENANCE, FIGURE):
        if os.path.isfile(os.path.join(out, fname)):
            os.remove(os.path.join(out, fname))
    receipts = os.path.join(out, RECEIPTS)
    if os.path.isdir(receipts):
        for fname in os.listdir(receipts):
            if fname.endswith(".json") and fname != BUILD_FILE and fname[:-5] not in planned_files:
                os.remove(os.path.join(receipts, fname))
    return removed


def write_shards(out, todo, table, assign_names, paths, reasons, image_size, channels, workers, strict, progress,
                  receipts, encoding="png"):
    """Write the shards of `todo` [(file, rows, plan)], each to a temp name then renamed; each finished shard's
    receipt goes into `receipts` at once (so a caller that catches an error knows what was finished)."""
    import tensorflow as tf
    from tqdm import tqdm

    from cxrkeras.data import features

    os.makedirs(os.path.join(out, RECEIPTS), exist_ok=True)
    tasks = [(paths[j], (image_size, image_size), channels, encoding) for _, rows, _ in todo for j in rows if paths[j]]
    pool = None
    workers = min(workers, max(1, len(tasks) // MIN_TASKS_PER_WORKER))
    fn = _encode_task  # looked up now: a module-level function, so it can travel to the workers by name
    if workers > 1:
        pool = EncoderPool(workers)
        results = pool.imap(fn, tasks)
    else:
        results = (fn(task) for task in tasks)
    bar = tqdm(total=sum(len(rows) for _, rows, _ in todo), unit="img", desc="build-records", disable=not progress,
               dynamic_ncols=True)
    try:
        for fname, rows, plan_hash in todo:
            split_name = assign_names[fname]
            skipped, upsampled, count = [], [], 0
            with replacing(os.path.join(out, fname)) as tmp:  # complete shards only ever carry a shard's name
                with tf.io.TFRecordWriter(tmp) as writer:
                    for j in rows:
                        if paths[j]:
                            png, h, w, c, source, reason = next(results)
                        else:
                            png, h, w, c, source, reason = None, 0, 0, 0, None, reasons[j]
                        bar.update(1)
                        if reason is not None:
                            where = paths[j] or table.path[j]
                            if strict:
                                raise DataError(f"{where} (CSV line {int(table.rows[j])}): {reason}; "
                                                f"fix or remove the file, or run without --strict to skip it")
                            skipped.append({"image": table.image_id[j], "row": int(table.rows[j]),
                                            "reason": reason, "split": split_name})
                            continue
                        if min(source) < image_size:
                            upsampled.append({"image": table.image_id[j], "row": int(table.rows[j]),
                                              "size": [int(source[0]), int(source[1])]})
                        ex = features.make_example(
                            png, h, w, c, table.y[j].tolist(), table.image_id[j], table.patient_id[j],
                            follow_up=int(table.follow_up[j]), age=int(table.age[j]), sex=table.sex[j],
                            view=table.view[j], split=split_name, encoding=encoding,
                            dataset=int(table.dataset[j]))
                        writer.write(ex.SerializeToString())
                        count += 1
                digest, size = sha256_file(tmp), os.path.getsize(tmp)
            receipt = {"plan": plan_hash, "file": fname, "records": count, "bytes": size, "sha256": digest,
                       "skipped": skipped, "upsampled": upsampled}
            write_json(os.path.join(out, RECEIPTS, fname + ".json"), receipt)
            receipts[fname] = receipt
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    return workers
