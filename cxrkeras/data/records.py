"""`build_records`: labels CSV + images → patient-wise split, parallel sharded TFRecords and a verifiable manifest."""

import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from cxrkeras import __version__
from cxrkeras.data import images as imglib
from cxrkeras.data import sources, split
from cxrkeras.data.manifest import MANIFEST_NAME
from cxrkeras.data.workers import AHEAD, CHUNK, EncoderPool, WorkerDied, available_memory, stop_on_sigterm
from cxrkeras.errors import ConfigError, DataError, Interrupted
from cxrkeras.hashing import sha256_file
from cxrkeras.labels import NO_FINDING
from cxrkeras.training.rundir import read_json, write_json

RECORD_FORMAT = 1  # bump when the bytes written for the same inputs change
RECEIPTS = ".receipts"  # one JSON per finished shard: what makes re-runs idempotent and resumable
BUILD_FILE = "build.json"  # in RECEIPTS: what the shards being written are built from (before any manifest exists)
LOCK_NAME = ".lock"  # flock'ed while a build-records writes the folder
INDEX_NAME = "index.csv"
SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$")
_MAX_LISTED = 10
_MAX_IN_MANIFEST = 100  # examples kept in the manifest's lists of upsampled images and unreadable values
MIN_TASKS_PER_WORKER = 100  # below this, starting a process costs more than the images it would encode
# Bounds of the options (the largest chest X-rays are ~4300 px a side; NIH's are 1024)
MAX_IMAGE_SIZE = 4096
MAX_SHARD_SIZE = 100_000
MAX_WORKERS = 256
# Peak memory of one encoding worker, measured (PIL decode + Lanczos resize + PNG encode of a 1024 px source):
# ~30 MB for the interpreter and about 3.5 bytes per output pixel and channel at 2048-4096 px (4096 px RGB:
# +169 MB). Counted with margin, plus a 16-bit DICOM source of up to 2048 x 2048 decoded through float64.
_WORKER_BASE_BYTES = 64 << 20
_WORKER_BYTES_PER_VALUE = 4
_SOURCE_ALLOWANCE_BYTES = 2048 * 2048 * 10
# the options that decide the records' bytes (with the CSV, the split lists and the salt): part of the fingerprint
FINGERPRINT_OPTIONS = ("format", "split_fractions", "seed", "image_size", "channels", "shard_size", "labels",
                       "path_column", "labels_column", "patient_column")


@dataclass
class BuildReport:
    manifest: dict
    out: str
    shards_written: int
    shards_kept: int
    manifest_written: bool
    seconds: float
    workers: int = 1


def shard_name(split_name, i, n):
    return f"{split_name}-{i:05d}-of-{n:05d}.tfrecord"


def default_out(csv_path, fmt, image_size):
    """tfrecords/nih-<size> for the NIH CSV, tfrecords/<csv stem>-<size> for other CSVs (relative to the cwd)."""
    if fmt == "nih":
        name = "nih"
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.splitext(os.path.basename(csv_path))[0]).strip("-") or "records"
    return os.path.join("tfrecords", f"{name}-{image_size}")


def _check_writable(out):
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise DataError(f"output folder {out!r} is not writable ({exc.strerror or exc}); "
                        f"choose another --out or fix its permissions") from exc


@contextlib.contextmanager
def _folder_lock(out):
    """Hold an exclusive lock on `out` for one build: a second build-records into it is refused at once (the kernel
    drops the lock when the process ends, however it ends, so it never goes stale)."""
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
            holder = "".join(c for c in f.read(200) if c.isprintable()).strip()
            raise DataError(f"{out} is being written by another build-records ({holder or 'another process'}): "
                            f"wait for it to finish (then re-run to confirm), or choose another --out") from None
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


def worker_memory(image_size, channels):
    """Estimated peak bytes of one encoding worker plus its share of encoded images waiting in the parent."""
    values = int(image_size) ** 2 * int(channels)
    waiting = CHUNK * AHEAD * values  # encoded images of this worker waiting in the parent (PNG <= raw size)
    return _WORKER_BASE_BYTES + _SOURCE_ALLOWANCE_BYTES + _WORKER_BYTES_PER_VALUE * values + waiting


def _check_options(image_size, channels, shard_size, workers, dry_run=False):
    """Bounds of the size options and the memory the workers would need; returns the number of workers to use
    (0 for a dry run, which reads no image)."""
    if not 8 <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ConfigError(f"--image-size {image_size}: must be 8 to {MAX_IMAGE_SIZE} pixels (each image is resized "
                          f"once to SIZE x SIZE; NIH's originals are 1024, 256 is the usual choice)")
    if channels not in (1, 3):
        raise ConfigError(f"--channels {channels}: choose 1 (grayscale) or 3 (RGB)")
    if not 1 <= int(shard_size) <= MAX_SHARD_SIZE:
        raise ConfigError(f"--shard-size {shard_size}: must be 1 to {MAX_SHARD_SIZE} records per shard")
    if workers is not None and not 1 <= int(workers) <= MAX_WORKERS:
        raise ConfigError(f"--workers {workers}: must be 1 to {MAX_WORKERS} processes")
    if dry_run:
        return 0
    wanted = int(workers or os.cpu_count() or 1)
    per_worker = worker_memory(image_size, channels)
    free = available_memory()
    if free is None or wanted * per_worker <= free:
        return wanted
    fits = int(free // per_worker)
    if workers is None and fits >= 1:
        return fits  # the default (all cores) lowered to what the memory allows
    gib = 1 << 30
    hint = f"use --workers {fits}" if fits >= 1 else "a smaller --image-size"
    raise ConfigError(f"--image-size {image_size} with {wanted} worker(s) needs about {wanted * per_worker / gib:.1f} "
                      f"GiB ({per_worker / gib:.2f} GiB per worker) but only {free / gib:.1f} GiB of memory is "
                      f"available: {hint}, or free memory")


def _sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split_stats(table, mask):
    idx = np.flatnonzero(mask)
    y = table.y[idx]
    return {
        "images": int(len(idx)),
        "patients": int(len({table.patient_id[i] for i in idx})),
        "no_finding": int((y.sum(axis=1) == 0).sum()) if len(idx) else 0,
        "positives": {label: int(y[:, j].sum()) for j, label in enumerate(table.labels)},
    }


def _encode_task(task):
    """Worker: (path, size, channels) → (png, h, w, c, source (h, w), None) or (None, 0, 0, 0, None, reason).
    Pure PIL/numpy, no TF."""
    path, image_size, channels = task
    try:
        source = imglib.read_image(path, channels)
        return imglib.encode_resized(source, image_size) + (source.shape[:2], None)
    except imglib.ImageError as exc:
        return None, 0, 0, 0, None, exc.reason
    except Exception as exc:  # a decoder bug must not kill the whole build: report the file and go on
        return None, 0, 0, 0, None, f"cannot be decoded ({imglib.describe_error(exc)})"


def _resolve_inputs(csv_path, images):
    if images is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "images")
        images = guess if os.path.isdir(guess) else os.path.dirname(os.path.abspath(csv_path))
    return images


def _read_inputs(csv_path, images, fmt, labels, path_column, labels_column, patient_column, id_salt):
    """(table, image index or None, whether patient ids are hashed DICOM PatientIDs); the index is only built
    here when it is needed for patient ids."""
    columns = sources.read_header(csv_path)
    if fmt == "auto":
        fmt = sources.detect_format(columns)
    index = None
    dicom_patient = None
    if fmt == "dicom" and patient_column not in columns:
        index = sources.ImageIndex(images, by_name=False)
        dicom_patient = sources.dicom_patient_reader(index.locate, id_salt)
    table = sources.read_table(csv_path, fmt, labels, path_column, labels_column, patient_column, dicom_patient)
    return table, index, dicom_patient is not None


def _assign(table, split_lists, fractions, seed):
    """Split index per row (-1: in no list) and a dict of list bookkeeping for the manifest."""
    names = split.SPLIT_NAMES
    if not split_lists:
        return split.stratify_patients(table.patient_id, table.y, fractions, seed), {}
    lists = [sources.read_split_list(p) for p in split_lists]
    list_names = ("train_val", "test") if len(lists) == 2 else names
    assign = split.split_by_lists(table.image_id, table.patient_id, table.y, list_names, lists, fractions, seed)
    in_csv = {os.path.basename(i) for i in table.image_id}
    listed = {os.path.basename(n) for names_ in lists for n in names_}
    absent = sorted(listed - in_csv)
    info = {
        "files": [{"path": os.path.abspath(p), "sha256": sha256_file(p)} for p in split_lists],
        "csv_rows_in_no_list": int((assign < 0).sum()),
        "csv_rows_in_no_list_examples": [table.image_id[j] for j in np.flatnonzero(assign < 0)[:_MAX_LISTED]],
        "listed_images_without_csv_row": len(absent),
        "listed_images_without_csv_row_examples": absent[:_MAX_LISTED],
    }
    return assign, info


def _plan_shards(table, assign, shard_size, seed, fingerprint, paths, sizes, images_root):
    """{split: [(file, row indices, plan hash)]}: deterministic, so a re-run finds the same shards."""
    plan = {}
    for s, name in enumerate(split.SPLIT_NAMES):
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
            shards.append((fname, chunk, _sha256_text(json.dumps([fingerprint, fname, items]))))
        plan[name] = shards
    return plan


def _load_receipt(out, fname, plan_hash):
    path = os.path.join(out, RECEIPTS, fname + ".json")
    shard = os.path.join(out, fname)
    try:
        with open(path, encoding="utf-8") as f:
            receipt = json.load(f)
    except (OSError, ValueError):
        return None
    if receipt.get("plan") != plan_hash or not os.path.isfile(shard) or os.path.getsize(shard) != receipt.get("bytes"):
        return None
    # re-hash: a damaged shard of the right size must be rewritten, not kept (~1 GB/s, seconds for all of NIH)
    return receipt if sha256_file(shard) == receipt.get("sha256") else None


def _clean_folder(out, planned_files):
    """Remove stale temporaries and shards of an older plan (they would be mistaken for records)."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(out), "*.tmp-*")) + \
            glob.glob(os.path.join(glob.escape(out), RECEIPTS, "*.tmp-*")):
        os.remove(path)
    for fname in os.listdir(out):
        if SHARD_RE.match(fname) and fname not in planned_files:
            os.remove(os.path.join(out, fname))
            removed.append(fname)
    receipts = os.path.join(out, RECEIPTS)
    if os.path.isdir(receipts):
        for fname in os.listdir(receipts):
            if fname.endswith(".json") and fname != BUILD_FILE and fname[:-5] not in planned_files:
                os.remove(os.path.join(receipts, fname))
    return removed


def _write_shards(out, todo, table, assign_names, paths, reasons, image_size, channels, workers, strict, progress,
                  receipts):
    """Write the shards of `todo` [(file, rows, plan)], each to a temp name then renamed; each finished shard's
    receipt goes into `receipts` at once (so a caller that catches an error knows what was finished)."""
    import tensorflow as tf
    from tqdm import tqdm

    from cxrkeras.data import features

    os.makedirs(os.path.join(out, RECEIPTS), exist_ok=True)
    tasks = [(paths[j], (image_size, image_size), channels) for _, rows, _ in todo for j in rows if paths[j]]
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
    tmp = None
    try:
        for fname, rows, plan_hash in todo:
            split_name = assign_names[fname]
            tmp = os.path.join(out, f"{fname}.tmp-{os.getpid()}")
            skipped, upsampled, count = [], [], 0
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
                        skipped.append({"image": table.image_id[j], "row": int(table.rows[j]), "reason": reason,
                                        "split": split_name})
                        continue
                    if min(source) < image_size:
                        upsampled.append({"image": table.image_id[j], "row": int(table.rows[j]),
                                          "size": [int(source[0]), int(source[1])]})
                    ex = features.make_example(
                        png, h, w, c, table.y[j].tolist(), table.image_id[j], table.patient_id[j],
                        follow_up=int(table.follow_up[j]), age=int(table.age[j]), sex=table.sex[j],
                        view=table.view[j], split=split_name)
                    writer.write(ex.SerializeToString())
                    count += 1
            digest = sha256_file(tmp)
            size = os.path.getsize(tmp)
            os.replace(tmp, os.path.join(out, fname))
            tmp = None
            receipt = {"plan": plan_hash, "file": fname, "records": count, "bytes": size, "sha256": digest,
                       "skipped": skipped, "upsampled": upsampled}
            write_json(os.path.join(out, RECEIPTS, fname + ".json"), receipt)
            receipts[fname] = receipt
    finally:
        bar.close()
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if pool is not None:
            pool.close()
    return workers


def _write_index(out, table, assign_of_row, shard_of_row, written):
    import csv

    tmp = os.path.join(out, f"{INDEX_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "shard", "image_id", "patient_id"] + list(table.columns))
        for j in np.flatnonzero(written):
            w.writerow([assign_of_row[j], shard_of_row[j], table.image_id[j], table.patient_id[j]] + table.raw[j])
    os.replace(tmp, os.path.join(out, INDEX_NAME))


def _same_manifest(path, manifest):
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    old.pop("created", None)
    new = dict(manifest)
    new.pop("created", None)
    return json.loads(json.dumps(new)) == old


def build_records(csv, images=None, out=None, *, split_lists=(), split_fractions=(0.7, 0.1, 0.2), seed=0,
                  image_size=256, channels=1, shard_size=1000, workers=None, dry_run=False, strict=False,
                  format="auto", labels=None, path_column="path", labels_column="labels",
                  patient_column="patient_id", id_salt="", progress=True, overwrite=False):
    """Build (or finish, or confirm) a records folder; returns a BuildReport whose `.manifest` is what was saved.

    Same inputs twice → nothing is rewritten; an interrupted run re-run writes only the missing shards.
    Records of another CSV or other options in `out` are refused unless `overwrite`; so is a second build of
    the same folder running at the same time.
    `dry_run` computes the split from the CSV alone and writes a statistics-only manifest.
    """
    started = time.perf_counter()
    fractions = split.parse_fractions(split_fractions)
    workers = _check_options(image_size, channels, shard_size, workers, dry_run)
    if split_lists and len(split_lists) not in (2, 3):
        raise ConfigError(f"--split-lists takes 2 files (train_val, test) or 3 (train, val, test); got {len(split_lists)}")
    label_list = labels if isinstance(labels, (tuple, list)) or labels is None else sources.read_label_list(labels)
    label_list = tuple(label_list) if label_list else None
    images = _resolve_inputs(csv, images)

    table, index, hashed_ids = _read_inputs(csv, images, format, label_list, path_column, labels_column,
                                            patient_column, id_salt)
    out = out or default_out(csv, table.format, image_size)
    csv_sha = sha256_file(csv)
    _check_writable(out)
    with _folder_lock(out):
        return _build(csv, images, out, table, index, hashed_ids, csv_sha, split_lists, fractions, int(seed),
                      int(image_size), int(channels), int(shard_size), workers, dry_run, strict, path_column,
                      labels_column, patient_column, id_salt, progress, overwrite, started)


def _build(csv, images, out, table, index, hashed_ids, csv_sha, split_lists, fractions, seed, image_size, channels,
           shard_size, workers, dry_run, strict, path_column, labels_column, patient_column, id_salt, progress,
           overwrite, started):
    assign, list_info = _assign(table, split_lists, fractions, seed)
    if not (assign >= 0).any():
        raise DataError(f"empty selection: none of the {len(table)} rows of {csv} is in the split lists "
                        f"{', '.join(split_lists)}; check that the lists name the CSV's images")
    options = {
        "csv": os.path.abspath(csv), "images": None if dry_run else os.path.abspath(images),
        "out": os.path.abspath(out), "format": table.format, "split_lists": [os.path.abspath(p) for p in split_lists],
        "split_fractions": list(fractions), "seed": seed, "image_size": image_size,
        "channels": channels, "shard_size": shard_size, "strict": bool(strict), "dry_run": bool(dry_run),
        "labels": list(table.labels), "path_column": path_column if table.format != "nih" else None,
        "labels_column": labels_column if table.format != "nih" else None,
        "patient_column": patient_column if table.format != "nih" else None,
        "id_salt_set": bool(id_salt),
    }
    fingerprint = _sha256_text(json.dumps({
        "record_format": RECORD_FORMAT, "csv_sha256": csv_sha,
        "lists": [f["sha256"] for f in list_info.get("files", [])],
        "salt": _sha256_text(id_salt), **{k: options[k] for k in FINGERPRINT_OPTIONS}}))
    build = {"fingerprint": fingerprint, "record_format": RECORD_FORMAT, "options": options,
             "csv": {"path": os.path.abspath(csv), "sha256": csv_sha},
             "split_lists": [f["sha256"] for f in list_info.get("files", [])]}
    _refuse_other_build(out, csv, build, dry_run, overwrite)
    names = split.SPLIT_NAMES
    manifest = {
        "tool_version": __version__, "record_format": RECORD_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": options, "fingerprint": fingerprint,
        "csv": {"path": os.path.abspath(csv), "sha256": csv_sha, "rows": len(table), "format": table.format},
        "split_lists": list_info or None,
        "split_method": "lists" if split_lists and len(split_lists) == 3 else
                        "lists+stratified-val" if split_lists else "stratified-patient-greedy",
        "labels": list(table.labels), "no_finding_label": NO_FINDING,
        "image_size": [image_size, image_size], "channels": channels,
        "unreadable_values": {column: {"count": len(rows), "rows": rows[:_MAX_IN_MANIFEST]}
                              for column, rows in table.unreadable.items()},
    }
    notes = _input_warnings(table, list_info, hashed_ids and not id_salt)

    if dry_run:
        selected = assign >= 0
        manifest["splits"] = {n: {**_split_stats(table, assign == s), "shards": []} for s, n in enumerate(names)}
        manifest["whole"] = _split_stats(table, selected)
        manifest["patient_overlap"] = _overlap(assign, table.patient_id)
        manifest.update(skipped=[], unlabelled_images=None, dry_run=True)
        manifest["warnings"] = _warnings(manifest, fractions) + notes
        path = os.path.join(out, MANIFEST_NAME)
        same = _same_manifest(path, manifest)
        if not same:
            write_json(path, manifest)
        return BuildReport(manifest, out, 0, 0, not same, time.perf_counter() - started, 0)

    if index is None:
        index = sources.ImageIndex(images, by_name=(table.format == "nih"))
    located = [index.locate(p) for p in table.path]
    all_paths = [p for p, _ in located]
    unlabelled = index.unlabelled(p for p in all_paths if p)  # rows outside the split lists still have a row
    paths = [p if assign[j] >= 0 else None for j, p in enumerate(all_paths)]
    reasons = [reason for _, reason in located]
    sizes = np.array([imglib.file_size(p) if p else -1 for p in paths], dtype=np.int64)
    missing = [j for j in np.flatnonzero(assign >= 0) if paths[j] is None]
    if missing and strict:
        listed = ", ".join(f"{table.path[j]} (line {int(table.rows[j])}: {reasons[j]})" for j in missing[:_MAX_LISTED])
        raise DataError(f"{len(missing)} image file(s) named in {csv} cannot be read under {images}: {listed}; "
                        f"add them, fix --images, or run without --strict to skip them")
    if index.outside_dirs:
        notes.append(f"{len(index.outside_dirs)} folder link(s) under --images lead outside it and were not "
                     f"searched ({', '.join(index.outside_dirs[:3])}): give the real folder as --images")

    plan = _plan_shards(table, assign, shard_size, seed, fingerprint, paths, sizes, os.path.abspath(images))
    planned = {fname for shards in plan.values() for fname, _, _ in shards}
    _clean_folder(out, planned)
    receipts, todo, split_of = {}, [], {}
    for name, shards in plan.items():
        for fname, rows, plan_hash in shards:
            split_of[fname] = name
            receipt = _load_receipt(out, fname, plan_hash)
            if receipt is None:
                todo.append((fname, rows, plan_hash))
            else:
                receipts[fname] = receipt
    kept = len(receipts)
    if todo:
        # any stale manifest must not describe a half-written folder; build.json says what is being written
        if os.path.exists(os.path.join(out, MANIFEST_NAME)):
            os.remove(os.path.join(out, MANIFEST_NAME))
        os.makedirs(os.path.join(out, RECEIPTS), exist_ok=True)
        write_json(os.path.join(out, RECEIPTS, BUILD_FILE), build)
        try:
            with stop_on_sigterm():
                workers = _write_shards(out, todo, table, split_of, paths, reasons, image_size, channels, workers,
                                        strict, progress, receipts)
        except (Interrupted, WorkerDied) as exc:
            done = len(receipts)
            total = len(planned)
            resume = (f"{done} of {total} shards are complete and kept ({done - kept} written now): re-run the same "
                      f"command to resume; it writes only the missing shards")
            if isinstance(exc, Interrupted):
                raise Interrupted(f"build-records {exc}; {resume}", exc.signum) from None
            raise WorkerDied(f"build-records stopped: {exc}. {resume}; if memory is short, lower --workers or "
                             f"--image-size") from None
    else:
        workers = 0

    skipped_rows, upsampled = {}, {}
    for r in receipts.values():
        for item in r["skipped"]:
            skipped_rows[item["row"]] = item
        for item in r.get("upsampled", []):
            upsampled[item["row"]] = item
    written = assign >= 0
    skip_mask = np.isin(table.rows, np.array(list(skipped_rows), dtype=np.int64))
    written &= ~skip_mask
    shard_of_row = [""] * len(table)
    manifest["splits"] = {}
    for s, name in enumerate(names):
        info = _split_stats(table, written & (assign == s))
        info["shards"] = []
        for fname, rows, _ in plan[name]:
            r = receipts[fname]
            info["shards"].append({"file": fname, "records": r["records"], "sha256": r["sha256"], "bytes": r["bytes"]})
            for j in rows:
                shard_of_row[j] = fname
        manifest["splits"][name] = info
    manifest["whole"] = _split_stats(table, written)
    manifest["patient_overlap"] = _overlap(np.where(written, assign, -1), table.patient_id)
    manifest["skipped"] = sorted(skipped_rows.values(), key=lambda item: item["row"])
    upsampled = sorted(upsampled.values(), key=lambda item: item["row"])
    manifest["upsampled"] = {"count": len(upsampled), "images": upsampled[:_MAX_IN_MANIFEST]}
    manifest["unlabelled_images"] = len(unlabelled)
    manifest["unlabelled_examples"] = [os.path.relpath(p, images) for p in unlabelled[:_MAX_LISTED]]
    manifest["dry_run"] = False
    if upsampled:
        smallest = min(upsampled, key=lambda item: min(item["size"]))
        notes.append(f"{len(upsampled)} image(s) smaller than --image-size {image_size} were upsampled, the "
                     f"smallest {smallest['image']} ({smallest['size'][0]}x{smallest['size'][1]}, CSV line "
                     f"{smallest['row']}); see manifest.json 'upsampled'")
    outside = [item for item in manifest["skipped"] if item["reason"] == sources.OUTSIDE_ROOT]
    if outside:
        notes.append(f"{len(outside)} CSV path(s) lead outside --images and were not read, e.g. "
                     f"{outside[0]['image']} (CSV line {outside[0]['row']})")
    manifest["warnings"] = _warnings(manifest, fractions) + notes
    if not written.any():
        raise DataError(f"no image could be written: all {int((assign >= 0).sum())} selected images were skipped "
                        f"(first: {manifest['skipped'][0]['image']}: {manifest['skipped'][0]['reason']}); "
                        f"check --images {images}")
    path = os.path.join(out, MANIFEST_NAME)
    same = not todo and _same_manifest(path, manifest) and os.path.isfile(os.path.join(out, INDEX_NAME))
    if not same:
        split_name_of_row = [names[a] if a >= 0 else "" for a in assign]
        _write_index(out, table, split_name_of_row, shard_of_row, written)
        write_json(path, manifest)
    return BuildReport(manifest, out, len(todo), kept, not same, time.perf_counter() - started, workers)


def _warnings(manifest, fractions):
    """Empty splits and labels with no positive in a split: legal, but the user should know before training."""
    out = []
    whole = manifest["whole"]["positives"]
    for (name, info), fraction in zip(manifest["splits"].items(), fractions):
        if fraction > 0 and info["images"] == 0:
            out.append(f"split {name} is empty: too few patients for --split-fractions")
        elif info["images"]:
            absent = [label for label, n in info["positives"].items() if n == 0 and whole.get(label)]
            if absent:
                out.append(f"split {name} has no positive of: {', '.join(absent)}")
    return out


def _examples(items):
    return ", ".join(str(i) for i in items[:3]) + (", ..." if len(items) > 3 else "")


def _input_warnings(table, list_info, unsalted_dicom_ids):
    """Inputs that were accepted but that the user should look at: unreadable CSV values, split lists that do not
    cover the CSV (or name images it lacks), DICOM patient ids hashed without a secret salt."""
    out = []
    for column, rows in table.unreadable.items():
        out.append(f"column {column!r} cannot be read on {len(rows)} CSV line(s) ({_examples(rows)}): stored as "
                   f"-1 (unknown); see manifest.json 'unreadable_values'")
    if list_info.get("csv_rows_in_no_list"):
        out.append(f"{list_info['csv_rows_in_no_list']} CSV row(s) are in none of the split lists and were left out "
                   f"(e.g. {_examples(list_info['csv_rows_in_no_list_examples'])})")
    if list_info.get("listed_images_without_csv_row"):
        out.append(f"the split lists name {list_info['listed_images_without_csv_row']} image(s) that have no CSV row "
                   f"(e.g. {_examples(list_info['listed_images_without_csv_row_examples'])})")
    if unsalted_dicom_ids:
        out.append("patient ids are hashes of the DICOM PatientIDs without --id-salt: anyone holding a list of "
                   "MRNs can recompute them and re-identify patients; pass a secret --id-salt (kept nowhere) when "
                   "the records leave your site")
    return out


def _overlap(assign, patient_ids):
    pairs = split.patient_overlap(assign, patient_ids)
    return {"pairs": pairs, "ok": not any(pairs.values())}


def _previous_build(out):
    """What the records in `out` were built from: the manifest, else the build.json of an unfinished build."""
    for path in (os.path.join(out, MANIFEST_NAME), os.path.join(out, RECEIPTS, BUILD_FILE)):
        if os.path.isfile(path):
            try:
                return read_json(path)
            except (OSError, ValueError):
                continue
    return None


def _option_differences(old, new):
    before, now = old.get("options") or {}, new["options"]
    diffs = [f"{key} {before.get(key)!r} -> {now[key]!r}" for key in FINGERPRINT_OPTIONS
             if key in before and before.get(key) != now[key]]
    lists = old.get("split_lists")
    old_lists = [f["sha256"] for f in lists.get("files", [])] if isinstance(lists, dict) else (lists or [])
    if old_lists != new["split_lists"]:
        diffs.append("the split lists (or their contents)")
    if old.get("record_format", RECORD_FORMAT) != RECORD_FORMAT:
        diffs.append(f"record format {old.get('record_format')} -> {RECORD_FORMAT} (a newer cxrkeras)")
    return diffs or ["--id-salt"]


def _refuse_other_build(out, csv, build, dry_run, overwrite):
    """Never replace records of another CSV or of other options without --overwrite, nor real records with a
    dry-run manifest. A dry-run manifest holds no records: anything may replace it."""
    old = _previous_build(out)
    if not old or old.get("dry_run"):
        return
    if dry_run:
        raise DataError(f"{out} holds built records: a dry run would replace their manifest; "
                        f"give the dry run another --out")
    if overwrite:
        return
    old_sha = (old.get("csv") or {}).get("sha256")
    if old_sha and old_sha != build["csv"]["sha256"]:
        raise DataError(f"{out} already holds records built from another CSV ({old['csv'].get('path')}); "
                        f"choose another --out for {csv}, or pass --overwrite to replace them")
    if old.get("fingerprint") and old["fingerprint"] != build["fingerprint"]:
        raise DataError(f"{out} holds records built with other options ({'; '.join(_option_differences(old, build))}); "
                        f"pass --overwrite to replace them, or choose another --out")
