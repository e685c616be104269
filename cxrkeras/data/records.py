"""`build_records`: labels CSV + images → patient-wise split, parallel sharded TFRecords and a verifiable manifest.

The options, the fingerprint and the manifest's content are decided here; shards.py writes the shards (plan,
receipts, worker pool, folder lock) and manifest.py writes the manifest and index.csv.
"""

import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from cxrkeras import __version__
from cxrkeras.constants import ENCODINGS, SPLITS
from cxrkeras.data import images as imglib
from cxrkeras.data import manifest as mf
from cxrkeras.data import shards, sources, split
from cxrkeras.data.datasets import DEFAULT_NAME as DEFAULT_DATASET
from cxrkeras.data.dicom import dicom_patient_reader
from cxrkeras.data.image_index import OUTSIDE_ROOT, ImageIndex
from cxrkeras.data.workers import AHEAD, CHUNK, WorkerDied, available_memory, stop_on_sigterm
from cxrkeras.errors import ConfigError, DataError, Interrupted
from cxrkeras.fileio import read_json_or, utc_now, write_json
from cxrkeras.hashing import sha256_file
from cxrkeras.labels import NO_FINDING

RECORD_FORMAT = 1  # bump when the bytes written for the same inputs change
_MAX_LISTED = 10
_MAX_IN_MANIFEST = 100  # examples kept in the manifest's lists of upsampled images and unreadable values
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


def default_out(csv_path, fmt, image_size):
    """tfrecords/nih-<size> for the NIH CSV, tfrecords/<csv stem>-<size> for other CSVs (relative to the cwd)."""
    if fmt == "nih":
        name = "nih"
    else:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.splitext(os.path.basename(csv_path))[0]).strip("-") or "records"
    return os.path.join("tfrecords", f"{name}-{image_size}")


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


def _resolve_inputs(csv_path, images):
    if images is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "images")
        images = guess if os.path.isdir(guess) else os.path.dirname(os.path.abspath(csv_path))
    return images


def _read_inputs(csv_path, images, fmt, labels, path_column, labels_column, patient_column, id_salt,
                 dataset_name=None):
    """(table, image index or None, whether patient ids are hashed DICOM PatientIDs); the index is only built
    here when it is needed for patient ids."""
    columns = sources.read_header(csv_path)
    if fmt == "auto":
        fmt = sources.detect_format(columns)
    index = None
    dicom_patient = None
    if fmt == "dicom" and patient_column not in columns:
        index = ImageIndex(images, by_name=False)
        dicom_patient = dicom_patient_reader(index.locate, id_salt)
    table = sources.read_table(csv_path, fmt, labels, path_column, labels_column, patient_column, dicom_patient,
                               dataset_name)
    return table, index, dicom_patient is not None


def _assign(table, split_lists, fractions, seed):
    """Split index per row (-1: in no list) and a dict of list bookkeeping for the manifest."""
    names = SPLITS
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


def build_records(csv, images=None, out=None, *, split_lists=(), split_fractions=(0.7, 0.1, 0.2), seed=0,
                  image_size=256, channels=1, shard_size=1000, workers=None, dry_run=False, strict=False,
                  format="auto", labels=None, path_column="path", labels_column="labels",
                  patient_column="patient_id", id_salt="", progress=True, overwrite=False, subset=None, augment=None,
                  encoding="png", dataset_name=None, log=print):
    """Build (or finish, or confirm) a records folder; returns a BuildReport whose `.manifest` is what was saved.

    `subset`: a class-targeted subset of the CSV, e.g. "per-label=2000,no-finding=10000" (cxrkeras.data.subset:
    whole patients, rarest labels first, seeded by `seed`); the manifest's "subset" records targets and reached.
    `encoding`: "png" (lossless, the default) or "raw" (the uint8 pixels uncompressed: about 2x the bytes on
    X-rays, no decode when read, faster to write); recorded in the manifest ("encoding") and its fingerprint.
    `dataset_name`: the source dataset of every row of a CSV without a 'Dataset' column (default "NIH
    ChestX-ray14"); with the column each row names its own (cxrkeras.data.datasets; the manifest's "datasets").

    Same inputs twice → nothing is rewritten; an interrupted run re-run writes only the missing shards.
    Records of another CSV or other options in `out` are refused unless `overwrite`; so is a second build of
    the same folder running at the same time.
    `dry_run` computes the split from the CSV alone and writes a statistics-only manifest.
    `augment`: a `cxrkeras.data.dadam.DadamOptions`: extra training shards of DADAM box-patch images, made again
    after every build from the training records (the manifest's "augment" says how); `log` prints its summary.
    """
    started = time.perf_counter()
    fractions = split.parse_fractions(split_fractions)
    workers = _check_options(image_size, channels, shard_size, workers, dry_run)
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding {encoding!r}: choose one of {', '.join(ENCODINGS)}")
    if split_lists and len(split_lists) not in (2, 3):
        raise ConfigError(f"--split-lists takes 2 files (train_val, test) or 3 (train, val, test); got {len(split_lists)}")
    label_list = labels if isinstance(labels, (tuple, list)) or labels is None else sources.read_label_list(labels)
    label_list = tuple(label_list) if label_list else None
    images = _resolve_inputs(csv, images)
    if augment is not None:
        if dry_run:
            raise ConfigError("--augment needs the images: it cannot run with --dry-run")
        if not os.path.isfile(augment.boxes):
            raise DataError(f"box file {augment.boxes!r} not found (NIH's BBox_List_2017.csv)")

    table, index, hashed_ids = _read_inputs(csv, images, format, label_list, path_column, labels_column,
                                            patient_column, id_salt, dataset_name)
    subset_info = None
    if subset:
        from cxrkeras.data.subset import parse_subset, select_subset

        mask, subset_info = select_subset(table, parse_subset(subset, table.labels), int(seed))
        table = table.select(mask)
    out = out or default_out(csv, table.format, image_size)
    csv_sha = sha256_file(csv)
    shards.check_writable(out)
    with shards.folder_lock(out):
        report = _build(csv, images, out, table, index, hashed_ids, csv_sha, split_lists, fractions, int(seed),
                        int(image_size), int(channels), int(shard_size), workers, dry_run, strict, path_column,
                        labels_column, patient_column, id_salt, progress, overwrite, started, subset_info, encoding)
        if augment is not None:
            from cxrkeras.data.dadam import augment_records

            report.manifest = augment_records(out, report.manifest, augment, int(shard_size), progress, log)
            report.manifest_written = True
            report.seconds = time.perf_counter() - started
        return report


def _build(csv, images, out, table, index, hashed_ids, csv_sha, split_lists, fractions, seed, image_size, channels,
           shard_size, workers, dry_run, strict, path_column, labels_column, patient_column, id_salt, progress,
           overwrite, started, subset_info=None, encoding="png"):
    assign, list_info = _assign(table, split_lists, fractions, seed)
    if not (assign >= 0).any():
        raise DataError(f"empty selection: none of the {len(table)} rows of {csv} is in the split lists "
                        f"{', '.join(split_lists)}; check that the lists name the CSV's images")
    options = {
        "csv": os.path.abspath(csv), "images": None if dry_run else os.path.abspath(images),
        "out": os.path.abspath(out), "format": table.format, "split_lists": [os.path.abspath(p) for p in split_lists],
        "split_fractions": list(fractions), "seed": seed, "image_size": image_size,
        "channels": channels, "encoding": encoding, "shard_size": shard_size, "strict": bool(strict), "dry_run": bool(dry_run),
        "labels": list(table.labels), "path_column": path_column if table.format != "nih" else None,
        "labels_column": labels_column if table.format != "nih" else None,
        "patient_column": patient_column if table.format != "nih" else None,
        "id_salt_set": bool(id_salt),
        # the name of a CSV without a 'Dataset' column (none for the default: older folders match)
        **({"dataset_name": table.datasets[0]} if table.dataset_column is None and
           table.datasets[0] != DEFAULT_DATASET else {}),
        **({"subset": subset_info["spec"]} if subset_info else {}),
    }
    fingerprint = shards.sha256_text(json.dumps({
        "record_format": RECORD_FORMAT, "csv_sha256": csv_sha,
        "lists": [f["sha256"] for f in list_info.get("files", [])],
        "salt": shards.sha256_text(id_salt), **{k: options[k] for k in FINGERPRINT_OPTIONS},
        **({"subset": options["subset"]} if subset_info else {}),
        **({"dataset_name": options["dataset_name"]} if "dataset_name" in options else {}),
        **({"encoding": encoding} if encoding != "png" else {})}))  # none for defaults: older folders match
    build = {"fingerprint": fingerprint, "record_format": RECORD_FORMAT, "options": options,
             "csv": {"path": os.path.abspath(csv), "sha256": csv_sha},
             "split_lists": [f["sha256"] for f in list_info.get("files", [])]}
    _refuse_other_build(out, csv, build, dry_run, overwrite)
    names = SPLITS
    manifest = {
        "tool_version": __version__, "record_format": RECORD_FORMAT,
        "created": utc_now(),
        "options": options, "fingerprint": fingerprint,
        "csv": {"path": os.path.abspath(csv), "sha256": csv_sha, "rows": len(table), "format": table.format},
        "split_lists": list_info or None,
        "split_method": "lists" if split_lists and len(split_lists) == 3 else
                        "lists+stratified-val" if split_lists else "stratified-patient-greedy",
        "labels": list(table.labels), "no_finding_label": NO_FINDING,
        "image_size": [image_size, image_size], "channels": channels, "encoding": encoding,
        "datasets": {"names": list(table.datasets), "column": table.dataset_column},
        "unreadable_values": {column: {"count": len(rows), "rows": rows[:_MAX_IN_MANIFEST]}
                              for column, rows in table.unreadable.items()},
        **({"subset": subset_info} if subset_info else {}),
    }
    notes = _input_warnings(table, list_info, hashed_ids and not id_salt)

    if dry_run:
        selected = assign >= 0
        manifest["splits"] = {n: {**mf.split_stats(table, assign == s), "shards": []} for s, n in enumerate(names)}
        manifest["whole"] = mf.split_stats(table, selected)
        manifest["patient_overlap"] = mf.overlap(assign, table.patient_id)
        manifest.update(skipped=[], unlabelled_images=None, dry_run=True)
        manifest["warnings"] = mf.split_warnings(manifest, fractions) + notes
        written = mf.write_manifest(out, manifest, unchanged=True)
        return BuildReport(manifest, out, 0, 0, written, time.perf_counter() - started, 0)

    if index is None:
        index = ImageIndex(images, by_name=(table.format == "nih"))
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

    plan = shards.plan_shards(table, assign, shard_size, seed, fingerprint, paths, sizes, os.path.abspath(images))
    planned = {fname for entries in plan.values() for fname, _, _ in entries}
    shards.clean_folder(out, planned)
    receipts, todo, split_of = {}, [], {}
    for name, entries in plan.items():
        for fname, rows, plan_hash in entries:
            split_of[fname] = name
            receipt = shards.load_receipt(out, fname, plan_hash)
            if receipt is None:
                todo.append((fname, rows, plan_hash))
            else:
                receipts[fname] = receipt
    kept = len(receipts)
    if todo:
        # any stale manifest must not describe a half-written folder; build.json says what is being written
        if os.path.exists(os.path.join(out, mf.MANIFEST_NAME)):
            os.remove(os.path.join(out, mf.MANIFEST_NAME))
        os.makedirs(os.path.join(out, shards.RECEIPTS), exist_ok=True)
        write_json(os.path.join(out, shards.RECEIPTS, shards.BUILD_FILE), build)
        try:
            with stop_on_sigterm():
                workers = shards.write_shards(out, todo, table, split_of, paths, reasons, image_size, channels, workers,
                                        strict, progress, receipts, encoding)
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
        info = mf.split_stats(table, written & (assign == s))
        info["shards"] = []
        for fname, rows, _ in plan[name]:
            r = receipts[fname]
            info["shards"].append({"file": fname, "records": r["records"], "sha256": r["sha256"], "bytes": r["bytes"]})
            for j in rows:
                shard_of_row[j] = fname
        manifest["splits"][name] = info
    manifest["whole"] = mf.split_stats(table, written)
    manifest["patient_overlap"] = mf.overlap(np.where(written, assign, -1), table.patient_id)
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
    outside = [item for item in manifest["skipped"] if item["reason"] == OUTSIDE_ROOT]
    if outside:
        notes.append(f"{len(outside)} CSV path(s) lead outside --images and were not read, e.g. "
                     f"{outside[0]['image']} (CSV line {outside[0]['row']})")
    manifest["warnings"] = mf.split_warnings(manifest, fractions) + notes
    if not written.any():
        raise DataError(f"no image could be written: all {int((assign >= 0).sum())} selected images were skipped "
                        f"(first: {manifest['skipped'][0]['image']}: {manifest['skipped'][0]['reason']}); "
                        f"check --images {images}")
    same = not todo and mf.same_manifest(os.path.join(out, mf.MANIFEST_NAME), manifest) and \
        os.path.isfile(os.path.join(out, mf.INDEX_NAME))
    if not same:
        split_name_of_row = [names[a] if a >= 0 else "" for a in assign]
        mf.write_index(out, table, split_name_of_row, shard_of_row, written)
        mf.write_manifest(out, manifest)
    return BuildReport(manifest, out, len(todo), kept, not same, time.perf_counter() - started, workers)


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


def _previous_build(out):
    """What the records in `out` were built from: the manifest, else the build.json of an unfinished build."""
    for path in (os.path.join(out, mf.MANIFEST_NAME), os.path.join(out, shards.RECEIPTS, shards.BUILD_FILE)):
        found = read_json_or(path)
        if isinstance(found, dict):
            return found
    return None


def _option_differences(old, new):
    before, now = old.get("options") or {}, new["options"]
    diffs = [f"{key} {before.get(key)!r} -> {now[key]!r}" for key in FINGERPRINT_OPTIONS
             if key in before and before.get(key) != now[key]]
    if before.get("encoding", "png") != now.get("encoding", "png"):
        diffs.append(f"--encoding {before.get('encoding', 'png')} -> {now.get('encoding', 'png')}")
    if before.get("dataset_name", DEFAULT_DATASET) != now.get("dataset_name", DEFAULT_DATASET):
        diffs.append(f"--dataset-name {before.get('dataset_name', DEFAULT_DATASET)!r} -> "
                     f"{now.get('dataset_name', DEFAULT_DATASET)!r}")
    if before.get("subset") != now.get("subset"):
        diffs.append(f"--subset {before.get('subset')!r} -> {now.get('subset')!r}")
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
