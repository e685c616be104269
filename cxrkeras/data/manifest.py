"""A records folder's `manifest.json`: reading it (every consumer) and writing it (`cxrkeras build-records`).

Schema (keys every reader may rely on):
  tool_version: str; created: ISO time; options: dict of resolved build options
  csv: {path, sha256}; labels: [str] (the multi-hot order); image_size: [height, width]; channels: int
  encoding: "png" | "raw" (how image/encoded holds the pixels; absent in folders built before it: png)
  datasets: {names: [source dataset of meta/dataset index 0, 1, ...], column: the CSV column or null} (absent in
    folders built before it: one dataset, cxrkeras.data.datasets.manifest_names)
  splits: {split_name: {images, patients, no_finding, positives: {label: int}, datasets: {name: int},
                        shards: [{file, records, sha256}]}}
  patient_overlap: {pairs: {"train/val": 0, ...}, ok: bool}
  skipped: [{image, row, reason}]; unlabelled_images: int (image files with no CSV row)
  dry_run: bool (true: statistics only, no shards)
Also written by build-records (informative): record_format, fingerprint (sha256 of everything that decides the
bytes), csv.rows, csv.format, split_method, split_lists ({files: [{path, sha256}], csv_rows_in_no_list,
listed_images_without_csv_row} or null), whole (the splits' stats summed), shard "bytes", skipped[].split,
unlabelled_examples, no_finding_label, warnings ([str]: empty splits, labels with no positive in a split, inputs
to look at), upsampled ({count, images: [{image, row, size}]}: sources smaller than the records), unreadable_values
({column: {count, rows}}: CSV values stored as -1).
Beside it: index.csv (split, shard, image_id, patient_id + every input CSV column, one row per record),
.receipts/ (one JSON per finished shard, used to resume and to skip up-to-date shards; build.json: the fingerprint
and options of the build writing the folder) and .lock (flock'ed by that build).
"""

import json
import os

from cxrkeras.constants import ENCODINGS, VERIFY_MODES
from cxrkeras.errors import DataError
from cxrkeras.fileio import json_text, read_json, read_json_or, write_json

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.csv"


def load_manifest(records_dir):
    """The manifest of `records_dir`; a clear error when the folder is not a built records folder."""
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not os.path.isdir(records_dir):
        raise DataError(
            f"records folder {records_dir!r} does not exist: build it with "
            f"`cxrkeras build-records --csv ... --images ... --out {records_dir}`"
        )
    if not os.path.isfile(path):
        raise DataError(
            f"{records_dir!r} has no {MANIFEST_NAME}: it is not a records folder made by "
            f"`cxrkeras build-records` (run it with `--out {records_dir}`), or that run did not finish (re-run it)"
        )
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as JSON ({exc}); re-run `cxrkeras build-records`") from exc
    for key in ("labels", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: field {key!r} is missing; re-run `cxrkeras build-records`")
    if manifest.get("encoding", "png") not in ENCODINGS:
        raise DataError(f"{path}: encoding {manifest.get('encoding')!r} is not one of {', '.join(ENCODINGS)}; "
                        f"re-run `cxrkeras build-records` (a newer cxrkeras may have written it)")
    return manifest


def records_encoding(manifest):
    """How the records hold their pixels: "png" (also folders built before the encoding was recorded) or "raw"."""
    return manifest.get("encoding", "png")


def split_info(manifest, split, records_dir="<records>"):
    """The manifest entry of one split; a clear error naming the splits there are."""
    splits = manifest["splits"]
    if split not in splits:
        raise DataError(f"unknown split {split!r} in {records_dir}: choose one of {', '.join(sorted(splits))}")
    return splits[split]


def shard_paths(manifest, records_dir, split):
    """Absolute shard paths of `split`, in order; refuses a dry-run manifest (no shards)."""
    info = split_info(manifest, split, records_dir)
    if manifest.get("dry_run") or not info.get("shards"):
        raise DataError(
            f"{records_dir}: split {split!r} has no shards (dry-run manifest or empty split); "
            f"run `cxrkeras build-records` without --dry-run"
        )
    return [os.path.join(records_dir, shard["file"]) for shard in info["shards"]]


def verify_shards(manifest, records_dir, split, verify="sha256"):
    """Refuse shards of `split` that are not the files the manifest lists, before anything reads them: a missing
    file, a size other than the manifest's and (verify="sha256", ~1 GB/s) other bytes. verify="size" skips the
    hashing; the pipeline's in-graph check still compares every shard's record count with the manifest."""
    if verify not in VERIFY_MODES:
        raise DataError(f"unknown records verification {verify!r}: choose {' or '.join(VERIFY_MODES)}")
    from cxrkeras.hashing import sha256_file

    hint = (f"re-run `cxrkeras build-records` with the same options (it rewrites only the damaged shards); "
            f"`cxrkeras inspect-records {records_dir}` lists every mismatch")
    for path, shard in zip(shard_paths(manifest, records_dir, split), manifest["splits"][split]["shards"]):
        name = shard["file"]
        if not os.path.isfile(path):
            raise DataError(f"{records_dir}: shard {name} listed in manifest.json is missing; {hint}")
        size, listed = os.path.getsize(path), shard.get("bytes")
        if listed is not None and size != int(listed):
            raise DataError(f"{records_dir}: shard {name} has {size:,} bytes but manifest.json lists {int(listed):,}: "
                            f"it was changed or replaced after build-records wrote it; {hint}")
        if verify == "sha256" and shard.get("sha256"):
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                raise DataError(f"{records_dir}: shard {name} is not the file manifest.json lists (sha256 "
                                f"{digest[:12]}… instead of {shard['sha256'][:12]}…): it was changed or replaced "
                                f"after build-records wrote it; {hint}")


def stage_images(info, stage):
    """Images of one split (its manifest entry) that a training stage reads: stage 1 drops the 'No Finding' rows
    (the all-zero label rows, counted in `no_finding`), stage 2 reads them all."""
    return int(info["images"]) - (int(info.get("no_finding", 0)) if stage == 1 else 0)


def label_positives(manifest, split):
    """Positives per label of `split`, in manifest label order (for loss weighting and reports)."""
    info = split_info(manifest, split)
    return [int(info["positives"].get(label, 0)) for label in manifest["labels"]]


# --- writing (build-records) ---


def split_stats(table, mask):
    import numpy as np

    from cxrkeras.data.datasets import split_counts

    idx = np.flatnonzero(mask)
    y = table.y[idx]
    return {
        "images": int(len(idx)),
        "patients": int(len({table.patient_id[i] for i in idx})),
        "no_finding": int((y.sum(axis=1) == 0).sum()) if len(idx) else 0,
        "positives": {label: int(y[:, j].sum()) for j, label in enumerate(table.labels)},
        "datasets": split_counts(table.dataset, table.datasets, idx),
    }


def overlap(assign, patient_ids):
    from cxrkeras.data.split import patient_overlap

    pairs = patient_overlap(assign, patient_ids)
    return {"pairs": pairs, "ok": not any(pairs.values())}


def split_warnings(manifest, fractions):
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


def write_index(out, table, assign_of_row, shard_of_row, written):
    import csv

    import numpy as np

    from cxrkeras.fileio import replacing

    with replacing(os.path.join(out, INDEX_NAME)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "shard", "image_id", "patient_id"] + list(table.columns))
        for j in np.flatnonzero(written):
            w.writerow([assign_of_row[j], shard_of_row[j], table.image_id[j], table.patient_id[j]] + table.raw[j])


def same_manifest(path, manifest):
    """Whether the manifest file at `path` already says what `manifest` says, apart from its creation time."""
    old = read_json_or(path)
    if not isinstance(old, dict):
        return False
    old.pop("created", None)
    new = dict(manifest)
    new.pop("created", None)
    return json.loads(json_text(new)) == old


def write_manifest(out, manifest, unchanged=False):
    """Write `manifest` to out/manifest.json (atomically); returns whether it was written. unchanged: skip the write
    when the file already says the same (apart from its creation time), so a re-run changes no file."""
    path = os.path.join(out, MANIFEST_NAME)
    if unchanged and same_manifest(path, manifest):
        return False
    write_json(path, manifest)
    return True
