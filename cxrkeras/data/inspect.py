"""`inspect_records`: print a records folder's manifest as tables and verify every shard against it."""

import os
from dataclasses import dataclass, field

from cxrkeras.constants import SPLITS
from cxrkeras.data import manifest as mf
from cxrkeras.hashing import sha256_file
from cxrkeras.labels import NIH_LABELS

_MAX_LISTED = 10


@dataclass
class InspectResult:
    manifest: dict
    problems: list = field(default_factory=list)
    records: int = 0
    shards: int = 0


def _pct(n, d):
    return f"{100.0 * n / d:5.1f}%" if d else "    -"


def format_manifest(manifest):
    from cxrkeras.data.datasets import manifest_names

    """Splits × labels table (positives and prevalence), plus images, patients, No Finding, shards, overlap."""
    splits = [s for s in SPLITS if s in manifest["splits"]] + \
        [s for s in manifest["splits"] if s not in SPLITS]
    infos = {s: manifest["splits"][s] for s in splits}
    whole = manifest.get("whole")
    cols = splits + (["all"] if whole else [])
    data = dict(infos, **({"all": whole} if whole else {}))
    total_images = sum(infos[s]["images"] for s in splits)
    # with a subset of the labels (--labels), the rows stage 1 drops are those with none of the chosen labels
    none_row = "No Finding" if tuple(manifest["labels"]) == NIH_LABELS else "none of the labels"
    width = max([len(lbl) for lbl in manifest["labels"]] + [14, len(none_row) + 1])
    head = f"{'':<{width}}" + "".join(f"{c:>17}" for c in cols)
    lines = [head, "-" * len(head)]

    def row(name, cell):
        lines.append(f"{name:<{width}}" + "".join(f"{cell(c):>17}" for c in cols))

    row("images", lambda c: f"{data[c]['images']} {_pct(data[c]['images'], total_images)}")
    row("patients", lambda c: f"{data[c]['patients']}")
    row(none_row, lambda c: f"{data[c]['no_finding']} {_pct(data[c]['no_finding'], data[c]['images'])}")
    for label in manifest["labels"]:
        row(label, lambda c: f"{data[c]['positives'].get(label, 0)} "
                             f"{_pct(data[c]['positives'].get(label, 0), data[c]['images'])}")
    names = manifest_names(manifest)
    if len(names) > 1:  # records pooled from several source datasets: images of each
        for name in names:
            row(f"dataset {name}"[:width], lambda c: f"{(data[c].get('datasets') or {}).get(name, 0)} "
                f"{_pct((data[c].get('datasets') or {}).get(name, 0), data[c]['images'])}")
    if not manifest.get("dry_run"):
        row("shards", lambda c: "" if c == "all" else f"{len(data[c].get('shards', []))}")
        listed = [shard for s in splits for shard in infos[s].get("shards", [])]
        size = sum(int(shard.get("bytes") or 0) for shard in listed)
        lines.append(f"records: encoding {mf.records_encoding(manifest)}, {_megabytes(size)} in "
                     f"{len(listed)} shard(s) ({_megabytes(size / max(1, total_images) * 1000)} per 1,000 images)")
    overlap = manifest.get("patient_overlap", {})
    pairs = ", ".join(f"{k} {v}" for k, v in overlap.get("pairs", {}).items())
    lines.append(f"shared patients: {pairs or 'not recorded'}")
    skipped = manifest.get("skipped") or []
    if skipped:
        lines.append(f"skipped inputs: {len(skipped)} (see manifest.json 'skipped'), e.g. "
                     + "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:3]))
    if manifest.get("unlabelled_images"):
        lines.append(f"image files with no CSV row: {manifest['unlabelled_images']}")
    if manifest.get("subset"):
        lines += subset_lines(manifest["subset"])
    for warning in manifest.get("warnings") or []:
        lines.append(f"warning: {warning}")
    if manifest.get("dry_run"):
        lines.append("dry run: statistics only, no shards written")
    return "\n".join(lines)


def _megabytes(n):
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def subset_lines(subset):
    """The --subset report: targets, available and reached images per label (rarest first)."""
    of = subset["of"]
    lines = [f"subset {subset['spec']} (seed {subset['seed']}): {subset['images']:,} of {of['images']:,} images, "
             f"{subset['patients']:,} of {of['patients']:,} patients (whole patients)"]
    width = max(len(k) for k in subset["targets"])
    lines.append(f"  {'label':<{width}}  {'target':>8}  {'available':>9}  {'reached':>8}")
    for label in subset["order"] + [k for k in subset["targets"] if k not in subset["order"]]:
        target = subset["targets"][label]
        note = "  (all taken)" if label in subset.get("all_taken", []) else ""
        lines.append(f"  {label:<{width}}  {'-' if target is None else f'{target:,}':>8}  "
                     f"{subset['available'][label]:>9,}  {subset['reached'][label]:>8,}{note}")
    return lines


def _read_shard(path, num_labels, encoding="png"):
    """(count, [(image id, patient id, split, labels, dataset index)], image shape of the first record) of one
    shard."""
    import tensorflow as tf

    from cxrkeras.data import features

    spec = features.feature_spec(num_labels)
    keep = {k: spec[k] for k in (features.IMAGE_ID, features.PATIENT_ID, features.SPLIT, features.LABELS,
                                 features.IMAGE_HEIGHT, features.IMAGE_WIDTH, features.IMAGE_CHANNELS,
                                 features.DATASET)}
    rows, first_image = [], None
    for serialized in tf.data.TFRecordDataset(path).batch(1024):
        ex = tf.io.parse_example(serialized, keep)
        if first_image is None and int(tf.size(serialized)):
            one = tf.io.parse_single_example(serialized[0], spec)
            first_image = list(features.decode_pixels(one, None, encoding).shape.as_list())
        for iid, pid, sp, y, d in zip(ex[features.IMAGE_ID].numpy(), ex[features.PATIENT_ID].numpy(),
                                      ex[features.SPLIT].numpy(), ex[features.LABELS].numpy(),
                                      ex[features.DATASET].numpy()):
            rows.append((iid.decode(), pid.decode(), sp.decode(), y, int(d)))
    return len(rows), rows, first_image


def inspect_records(records_dir):
    """Re-hash every shard, count and parse its records, re-check stats and patient disjointness from the records.

    Returns an InspectResult; `problems` is empty when the folder matches its manifest."""
    import tensorflow as tf

    manifest = mf.load_manifest(records_dir)
    result = InspectResult(manifest)
    problems = result.problems
    if manifest.get("dry_run"):
        return result
    labels = manifest["labels"]
    from cxrkeras.data.datasets import manifest_names

    dataset_names = manifest_names(manifest)
    expected_shape = list(manifest.get("image_size", [])) + [manifest.get("channels")]
    listed_files = set()
    patients_of = {}
    seen_ids = {}
    for split_name, info in manifest["splits"].items():
        positives = [0] * len(labels)
        no_finding = images = 0
        per_dataset = [0] * len(dataset_names)
        patients = set()
        for shard in info.get("shards", []):
            listed_files.add(shard["file"])
            path = os.path.join(records_dir, shard["file"])
            result.shards += 1
            if not os.path.isfile(path):
                problems.append(f"{shard['file']}: listed in the manifest but missing; re-run build-records")
                continue
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 {digest[:12]}… differs from the manifest's "
                                f"{shard['sha256'][:12]}…; the file changed after it was built (re-run build-records)")
            try:
                count, rows, shape = _read_shard(path, len(labels), mf.records_encoding(manifest))
            except (tf.errors.OpError, ValueError) as exc:
                problems.append(f"{shard['file']}: cannot be read as TFRecords ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200]}); re-run build-records")
                continue
            result.records += count
            if count != shard["records"]:
                problems.append(f"{shard['file']}: {count} records, manifest says {shard['records']}")
            if shape and expected_shape[0] is not None and shape != expected_shape:
                problems.append(f"{shard['file']}: first image is {shape}, manifest says {expected_shape}")
            for iid, pid, sp, y, d in rows:
                if not 0 <= d < len(dataset_names):
                    problems.append(f"{shard['file']}: record {iid} has meta/dataset {d}, but the manifest names "
                                    f"{len(dataset_names)} dataset(s)")
                else:
                    per_dataset[d] += 1
                if sp and sp != split_name:
                    problems.append(f"{shard['file']}: record {iid} says split {sp!r}, stored under {split_name!r}")
                if iid in seen_ids:
                    problems.append(f"image {iid} is stored twice: {seen_ids[iid]} and {shard['file']}")
                seen_ids[iid] = shard["file"]
                patients_of.setdefault(pid, set()).add(split_name)
                patients.add(pid)
                images += 1
                no_finding += int(not any(y))
                for j, v in enumerate(y):
                    positives[j] += int(v)
        for key, got in (("images", images), ("patients", len(patients)), ("no_finding", no_finding)):
            if info.get(key) != got:
                problems.append(f"split {split_name}: records give {key} = {got}, manifest says {info.get(key)}")
        counted = dict(zip(dataset_names, per_dataset))
        if "datasets" in info and info["datasets"] != counted:
            problems.append(f"split {split_name}: records give images per dataset {counted}, manifest says "
                            f"{info['datasets']}")
        for label, got in zip(labels, positives):
            if info["positives"].get(label, 0) != got:
                problems.append(f"split {split_name}: records give {got} positives of {label}, "
                                f"manifest says {info['positives'].get(label, 0)}")
    shared = {pid: sorted(s) for pid, s in patients_of.items() if len(s) > 1}
    if shared:
        examples = ", ".join(f"{pid} ({'/'.join(s)})" for pid, s in list(shared.items())[:_MAX_LISTED])
        problems.append(f"{len(shared)} patient(s) appear in more than one split: {examples}")
    stray = sorted(f for f in os.listdir(records_dir) if f.endswith(".tfrecord") and f not in listed_files)
    if stray:
        problems.append(f"shard files not in the manifest: {', '.join(stray[:_MAX_LISTED])}; "
                        f"re-run build-records (it removes them) or delete them")
    return result
