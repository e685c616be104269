"""`build_records`: labels CSV + images → patient-wise split, parallel sharded TFRecords and a verifiable manifest."""

import datetime
import glob
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from cxrkeras import __version__
from cxrkeras.data import images as imglib
from cxrkeras.data import sources, split
from cxrkeras.data.manifest import MANIFEST_NAME
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.hashing import sha256_file
from cxrkeras.labels import NO_FINDING

RECORD_FORMAT = 1  # bump when the bytes written for the same inputs change
RECEIPTS = ".receipts"  # one JSON per finished shard: what makes re-runs idempotent and resumable
INDEX_NAME = "index.csv"
SHARD_RE = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$")
_MAX_LISTED = 10
MIN_TASKS_PER_WORKER = 100  # below this, starting a process costs more than the images it would encode


@dataclass
class BuildReport:
    manifest: dict
    out: str
    shards_written: int
    shards_kept: int
    manifest_written: bool
    seconds: float


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


def _write_json(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


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
    """Worker: (path, size, channels) → (png, h, w, c, None) or (None, 0, 0, 0, reason). Pure PIL/numpy, no TF."""
    path, image_size, channels = task
    try:
        return imglib.load_encoded(path, image_size, channels) + (None,)
    except imglib.ImageError as exc:
        return None, 0, 0, 0, exc.reason
    except Exception as exc:  # a decoder bug must not kill the whole build: report the file and go on
        return None, 0, 0, 0, f"cannot be decoded ({type(exc).__name__}: {exc})"


def _resolve_inputs(csv_path, images):
    if images is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "images")
        images = guess if os.path.isdir(guess) else os.path.dirname(os.path.abspath(csv_path))
    return images


def _read_inputs(csv_path, images, fmt, labels, path_column, labels_column, patient_column, id_salt):
    """(table, image index or None); the index is only built when it is needed for patient ids."""
    columns = sources.read_header(csv_path)
    if fmt == "auto":
        fmt = sources.detect_format(columns)
    index = None
    dicom_patient = None
    if fmt == "dicom" and patient_column not in columns:
        index = sources.ImageIndex(images, by_name=False)
        dicom_patient = sources.dicom_patient_reader(index.resolve, id_salt)
    table = sources.read_table(csv_path, fmt, labels, path_column, labels_column, patient_column, dicom_patient)
    return table, index


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
    info = {
        "files": [{"path": os.path.abspath(p), "sha256": sha256_file(p)} for p in split_lists],
        "csv_rows_in_no_list": int((assign < 0).sum()),
        "listed_images_without_csv_row": len(listed - in_csv),
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
            if fname.endswith(".json") and fname[:-5] not in planned_files:
                os.remove(os.path.join(receipts, fname))
    return removed


def _write_shards(out, todo, table, assign_names, paths, image_size, channels, workers, strict, progress):
    """Write the shards of `todo` [(file, rows, plan)], each to a temp name then renamed; returns receipts."""
    import tensorflow as tf
    from tqdm import tqdm

    from cxrkeras.data import features

    os.makedirs(os.path.join(out, RECEIPTS), exist_ok=True)
    tasks = [(paths[j], (image_size, image_size), channels) for _, rows, _ in todo for j in rows]
    receipts = {}
    pool = None
    workers = min(workers, max(1, len(tasks) // MIN_TASKS_PER_WORKER))
    if workers > 1:
        # spawn: workers import only PIL/numpy (never TF), safe whatever threads the parent has started
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_encode_task, tasks, chunksize=4)
    else:
        results = map(_encode_task, tasks)
    bar = tqdm(total=len(tasks), unit="img", desc="build-records", disable=not progress, dynamic_ncols=True)
    tmp = None
    try:
        for fname, rows, plan_hash in todo:
            split_name = assign_names[fname]
            tmp = os.path.join(out, f"{fname}.tmp-{os.getpid()}")
            skipped, count = [], 0
            with tf.io.TFRecordWriter(tmp) as writer:
                for j in rows:
                    png, h, w, c, reason = next(results)
                    bar.update(1)
                    if reason is not None:
                        where = paths[j] or table.path[j]
                        if strict:
                            raise DataError(f"{where} (CSV line {int(table.rows[j])}): {reason}; "
                                            f"fix or remove the file, or run without --strict to skip it")
                        skipped.append({"image": table.image_id[j], "row": int(table.rows[j]), "reason": reason,
                                        "split": split_name})
                        continue
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
                       "skipped": skipped}
            _write_json(os.path.join(out, RECEIPTS, fname + ".json"), receipt)
            receipts[fname] = receipt
    finally:
        bar.close()
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if pool is not None:
            pool.terminate()
            pool.join()
    return receipts


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
                  patient_column="patient_id", id_salt="", progress=True):
    """Build (or finish, or confirm) a records folder; returns a BuildReport whose `.manifest` is what was saved.

    Same inputs twice → nothing is rewritten; an interrupted run re-run writes only the missing shards.
    `dry_run` computes the split from the CSV alone and writes a statistics-only manifest.
    """
    started = time.perf_counter()
    fractions = split.parse_fractions(split_fractions)
    if int(image_size) < 8:
        raise ConfigError(f"--image-size {image_size}: must be at least 8 pixels")
    if channels not in (1, 3):
        raise ConfigError(f"--channels {channels}: choose 1 (grayscale) or 3 (RGB)")
    if int(shard_size) < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be a positive number of records")
    if split_lists and len(split_lists) not in (2, 3):
        raise ConfigError(f"--split-lists takes 2 files (train_val, test) or 3 (train, val, test); got {len(split_lists)}")
    workers = int(workers or os.cpu_count() or 1)
    label_list = labels if isinstance(labels, (tuple, list)) or labels is None else sources.read_label_list(labels)
    label_list = tuple(label_list) if label_list else None
    images = _resolve_inputs(csv, images)

    table, index = _read_inputs(csv, images, format, label_list, path_column, labels_column, patient_column, id_salt)
    out = out or default_out(csv, table.format, image_size)
    csv_sha = sha256_file(csv)
    _check_writable(out)
    _refuse_foreign(out, csv, csv_sha, dry_run)

    assign, list_info = _assign(table, split_lists, fractions, seed)
    if not (assign >= 0).any():
        raise DataError(f"empty selection: none of the {len(table)} rows of {csv} is in the split lists "
                        f"{', '.join(split_lists)}; check that the lists name the CSV's images")
    options = {
        "csv": os.path.abspath(csv), "images": None if dry_run else os.path.abspath(images),
        "out": os.path.abspath(out), "format": table.format, "split_lists": [os.path.abspath(p) for p in split_lists],
        "split_fractions": list(fractions), "seed": int(seed), "image_size": int(image_size),
        "channels": int(channels), "shard_size": int(shard_size), "strict": bool(strict), "dry_run": bool(dry_run),
        "labels": list(table.labels), "path_column": path_column if table.format != "nih" else None,
        "labels_column": labels_column if table.format != "nih" else None,
        "patient_column": patient_column if table.format != "nih" else None,
        "id_salt_set": bool(id_salt),
    }
    fingerprint = _sha256_text(json.dumps({
        "record_format": RECORD_FORMAT, "csv_sha256": csv_sha,
        "lists": [f["sha256"] for f in list_info.get("files", [])],
        "salt": _sha256_text(id_salt), **{k: options[k] for k in (
            "format", "split_fractions", "seed", "image_size", "channels", "shard_size", "labels",
            "path_column", "labels_column", "patient_column")}}))
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
        "image_size": [int(image_size), int(image_size)], "channels": int(channels),
    }

    if dry_run:
        selected = assign >= 0
        manifest["splits"] = {n: {**_split_stats(table, assign == s), "shards": []} for s, n in enumerate(names)}
        manifest["whole"] = _split_stats(table, selected)
        manifest["patient_overlap"] = _overlap(assign, table.patient_id)
        manifest.update(skipped=[], unlabelled_images=None, dry_run=True)
        manifest["warnings"] = _warnings(manifest, fractions)
        path = os.path.join(out, MANIFEST_NAME)
        same = _same_manifest(path, manifest)
        if not same:
            _write_json(path, manifest)
        return BuildReport(manifest, out, 0, 0, not same, time.perf_counter() - started)

    if index is None:
        index = sources.ImageIndex(images, by_name=(table.format == "nih"))
    all_paths = [index.resolve(p) for p in table.path]
    unlabelled = index.unlabelled(p for p in all_paths if p)  # rows outside the split lists still have a row
    paths = [p if assign[j] >= 0 else None for j, p in enumerate(all_paths)]
    sizes = np.array([imglib.file_size(p) if p else -1 for p in paths], dtype=np.int64)
    missing = [j for j in np.flatnonzero(assign >= 0) if paths[j] is None]
    if missing and strict:
        listed = ", ".join(f"{table.path[j]} (line {int(table.rows[j])})" for j in missing[:_MAX_LISTED])
        raise DataError(f"{len(missing)} image file(s) named in {csv} are not under {images}: {listed}; "
                        f"add them, fix --images, or run without --strict to skip them")

    plan = _plan_shards(table, assign, int(shard_size), int(seed), fingerprint, paths, sizes, os.path.abspath(images))
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
        # any stale manifest must not describe a half-written folder
        if os.path.exists(os.path.join(out, MANIFEST_NAME)):
            os.remove(os.path.join(out, MANIFEST_NAME))
        receipts.update(_write_shards(out, todo, table, split_of, paths, int(image_size), int(channels),
                                      workers, strict, progress))

    skipped_rows = {}
    for r in receipts.values():
        for item in r["skipped"]:
            skipped_rows[item["row"]] = item
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
    manifest["unlabelled_images"] = len(unlabelled)
    manifest["unlabelled_examples"] = [os.path.relpath(p, images) for p in unlabelled[:_MAX_LISTED]]
    manifest["dry_run"] = False
    manifest["warnings"] = _warnings(manifest, fractions)
    if not written.any():
        raise DataError(f"no image could be written: all {int((assign >= 0).sum())} selected images were skipped "
                        f"(first: {manifest['skipped'][0]['image']}: {manifest['skipped'][0]['reason']}); "
                        f"check --images {images}")
    path = os.path.join(out, MANIFEST_NAME)
    same = not todo and _same_manifest(path, manifest) and os.path.isfile(os.path.join(out, INDEX_NAME))
    if not same:
        split_name_of_row = [names[a] if a >= 0 else "" for a in assign]
        _write_index(out, table, split_name_of_row, shard_of_row, written)
        _write_json(path, manifest)
    return BuildReport(manifest, out, len(todo), kept, not same, time.perf_counter() - started)


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


def _overlap(assign, patient_ids):
    pairs = split.patient_overlap(assign, patient_ids)
    return {"pairs": pairs, "ok": not any(pairs.values())}


def _refuse_foreign(out, csv, csv_sha, dry_run):
    """Never overwrite records of another CSV, nor real records with a dry-run manifest."""
    path = os.path.join(out, MANIFEST_NAME)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return
    old_sha = (old.get("csv") or {}).get("sha256")
    if old_sha and old_sha != csv_sha:
        raise DataError(f"{out} already holds records built from another CSV ({old['csv'].get('path')}); "
                        f"choose another --out for {csv}, or delete {out}")
    if dry_run and not old.get("dry_run", False):
        raise DataError(f"{out} holds built records: a dry run would replace their manifest; "
                        f"give the dry run another --out")
