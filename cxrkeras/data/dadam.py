"""DADAM, diseased-area patch augmentation from NIH's boxes: extra training shards of synthetic images made from the
training split only (`build-records --augment dadam --boxes BBox_List_2017.csv --n N`).

Each synthetic image takes the box patch of a tail-class training image (the donor) and either pastes it onto a
training image with no finding at the same relative position (mode "normal"; the box, given in NIH's 1024 px frame,
is scaled to the records' size, which donor and receiver share), adding the patch's label and, with the training
labels' co-occurrence rate P(m | label), a patch of its most correlated label m (Pearson r >= `correlation`) too,
so that the label correlation structure is kept; or blends it
(opacity `alpha`) onto a training image that has a tail class (mode "blend"), adding the label. Donors and
receivers are read from the training split's own records, so no validation or test image can be either. The
manifest's "augment" records the options, the boxes used and left out, the synthetic count per label, and
`dadam.csv` every patch's donor, receiver and box; `dadam_correlation.png` shows the training label correlations
before and after.
"""

import csv
import dataclasses
import math
import os
import re

import numpy as np

from cxrkeras.data import manifest as mf
from cxrkeras.data.boxes import box_mask, read_boxes
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.fileio import replacing
from cxrkeras.hashing import sha256_file

METHODS = ("dadam",)
SHARD_RE = re.compile(r"^train-dadam-\d{5}-of-\d{5}\.tfrecord$")
PROVENANCE = "dadam.csv"
FIGURE = "dadam_correlation.png"
ID_PREFIX = "dadam-"
MAX_IMAGES = 1_000_000
TRAIN = "train"


@dataclasses.dataclass
class DadamOptions:
    boxes: str  # NIH's BBox_List_2017.csv (or a file in its layout)
    n: int = 1000  # synthetic images to make
    tail_labels: tuple = None  # None: the labels with at most the median number of training positives
    alpha: float = 0.6  # opacity of a patch blended onto a diseased image
    normal_fraction: float = 0.5  # share of the images pasted onto a No Finding image (the rest are blends)
    correlation: float = 0.1  # mode normal: also paste the most correlated label's patch when r >= this (None: off)
    seed: int = 0

    def check(self, labels):
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_IMAGES:
            raise ConfigError(f"--n {self.n!r}: the number of synthetic images must be 1 to {MAX_IMAGES:,}")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"--dadam-alpha {self.alpha}: the patch opacity must be in (0, 1]")
        if not 0.0 <= float(self.normal_fraction) <= 1.0:
            raise ConfigError(f"--dadam-normal {self.normal_fraction}: a fraction in [0, 1]")
        if self.correlation is not None and not -1.0 <= float(self.correlation) <= 1.0:
            raise ConfigError(f"--dadam-correlation {self.correlation}: a Pearson r in [-1, 1]")
        unknown = [t for t in (self.tail_labels or ()) if t not in labels]
        if unknown:
            raise ConfigError(f"--tail-labels {', '.join(unknown)}: not labels of these records ({', '.join(labels)})")

    def to_manifest(self):
        return {"boxes": os.path.abspath(self.boxes), "boxes_sha256": sha256_file(self.boxes), "n": self.n,
                "tail_labels": list(self.tail_labels) if self.tail_labels else None, "alpha": float(self.alpha),
                "normal_fraction": float(self.normal_fraction),
                "correlation": None if self.correlation is None else float(self.correlation), "seed": self.seed}


def shard_name(i, n):
    return f"train-dadam-{i:05d}-of-{n:05d}.tfrecord"


# --- reading the training split's records ---


def _records(paths, num_labels, keep=None, encoding="png", decode=None):
    """Yield (index, fields) of every record of `paths` in order; the decoded image (uint8 [H, W, C]) only for the
    indices in `keep` (None: no image); `decode(parsed example)` makes it (default: the stored pixels)."""
    import tensorflow as tf

    from cxrkeras.data import features as ft

    spec = ft.feature_spec(num_labels)
    index = 0
    for path in paths:
        for raw in tf.data.TFRecordDataset(path):
            ex = tf.io.parse_single_example(raw, spec)
            fields = {"image_id": ex[ft.IMAGE_ID].numpy().decode("utf-8"),
                      "patient_id": ex[ft.PATIENT_ID].numpy().decode("utf-8"),
                      "labels": ex[ft.LABELS].numpy().astype(np.int64), "age": int(ex[ft.AGE].numpy()),
                      "sex": ex[ft.SEX].numpy().decode("utf-8"), "view": ex[ft.VIEW].numpy().decode("utf-8"),
                      "split": ex[ft.SPLIT].numpy().decode("utf-8"), "dataset": int(ex[ft.DATASET].numpy())}
            if keep is not None and index in keep:
                image = decode(ex) if decode else ft.decode_pixels(ex, None, encoding)  # the records' encoding
                fields["image"] = image.numpy()
            yield index, fields
            index += 1


def _split_of_images(out):
    """{image file name: split} of every record (index.csv), to say which boxes fall on validation/test images."""
    path = os.path.join(out, mf.INDEX_NAME)
    with open(path, newline="", encoding="utf-8") as f:
        return {os.path.basename(row["image_id"]): row["split"] for row in csv.DictReader(f)}


def label_correlation(y):
    """Pearson correlation of the label columns of multi-hot `y` (0 where a label is constant)."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(y, rowvar=False) if len(y) > 1 else np.zeros((y.shape[1], y.shape[1]))
    c = np.atleast_2d(np.nan_to_num(c, nan=0.0))
    np.fill_diagonal(c, 1.0)
    return c


def default_tail(positives, labels):
    """The rarest labels of the training split: those with at most the median number of positives (of the labels
    that have any)."""
    counts = np.array([positives[label] for label in labels], dtype=np.float64)
    present = counts[counts > 0]
    if not len(present):
        return []
    median = float(np.median(present))
    return [label for label, c in zip(labels, counts) if 0 < c <= median]


# --- the plan ---


def co_occurrence(y):
    """P(label m | label j) of multi-hot `y`, [j, m] (0 for a label without positives)."""
    y = np.asarray(y, dtype=np.float64)
    counts = y.sum(axis=0)
    return np.divide(y.T @ y, counts[:, None], out=np.zeros((y.shape[1], y.shape[1])), where=counts[:, None] > 0)


def draw_patch(rng, tail, donors_of):
    """(label, box): a tail label drawn uniformly, then one of its training boxes."""
    label = tail[int(rng.integers(len(tail)))]
    return label, donors_of[label][int(rng.integers(len(donors_of[label])))]


def partner_label(label, donors_of, correlation, labels, threshold):
    """The label most correlated with `label` (Pearson r >= threshold) among those with training boxes, or None
    (always None when `correlation` is None)."""
    if correlation is None:
        return None
    j = labels.index(label)
    partners = [(correlation[j, labels.index(m)], m) for m in sorted(donors_of) if m != label]
    partners = [(r, m) for r, m in partners if r >= threshold]
    return max(partners)[1] if partners else None


def draw_partner(rng, label, donors_of, correlation, given, labels, threshold):
    """[(partner, box)] or []: pasted onto a normal image, a patch of `label` brings a patch of its partner
    (`partner_label`) with probability P(partner | label) of the training labels, so that co-occurrence is kept."""
    partner = partner_label(label, donors_of, correlation, labels, threshold)
    if partner is None:
        return []
    if rng.random() < given[labels.index(label), labels.index(partner)]:
        return [(partner, donors_of[partner][int(rng.integers(len(donors_of[partner])))])]
    return []


def with_patch_labels(y, patches, labels):
    """A copy of multi-hot `y` with the patches' labels set."""
    y = np.array(y, copy=True)
    for name, _ in patches:
        y[labels.index(name)] = 1
    return y


def _plan(train, donors_of, tail, correlation, options, labels):
    """[{id, mode, receiver, patches: [(label, box)], labels}] for options.n images, seeded: a tail patch
    (`draw_patch`), the mode, a receiver of that mode and, pasted onto a normal image, its partner
    (`draw_partner`)."""
    rng = np.random.default_rng(options.seed)
    given = co_occurrence(np.stack([r["labels"] for r in train]))
    normal = [i for i, r in enumerate(train) if not r["labels"].any()]
    tail_idx = [labels.index(t) for t in tail]
    diseased = [i for i, r in enumerate(train) if r["labels"][tail_idx].any()]
    if not normal and not diseased:
        raise DataError("DADAM needs receivers in the training split: images with no finding or with a tail class; "
                        "there are none")
    plan = []
    for k in range(options.n):
        label, box = draw_patch(rng, tail, donors_of)
        mode = "normal" if rng.random() < options.normal_fraction else "blend"
        if mode == "normal" and not normal:
            mode = "blend"
        elif mode == "blend" and not diseased:
            mode = "normal"
        pool = normal if mode == "normal" else diseased
        receiver = pool[int(rng.integers(len(pool)))]
        for _ in range(8):  # an image is not its own receiver (when there is another)
            if receiver != box["donor"] or len(pool) == 1:
                break
            receiver = pool[int(rng.integers(len(pool)))]
        patches = [(label, box)]
        if mode == "normal":
            patches += draw_partner(rng, label, donors_of, correlation, given, labels, options.correlation)
        plan.append({"id": f"{ID_PREFIX}{k:07d}", "mode": mode, "receiver": receiver, "patches": patches,
                     "labels": with_patch_labels(train[receiver]["labels"], patches, labels)})
    return plan


def box_bounds(box, height, width):
    """(x0, y0, x1, y1): the pixel bounds of an (x, y, w, h) box of NIH's 1024 px frame scaled to the image size
    (`box_mask`'s pixels: a rectangle)."""
    mask = box_mask([box], height, width)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop(image, bounds):
    x0, y0, x1, y1 = bounds
    return image[y0:y1, x0:x1]


def compose(receiver, patches, mode, alpha):
    """The synthetic image: each (patch pixels, bounds) pasted (mode normal) or blended with opacity `alpha`
    (mode blend) onto `receiver` inside its bounds (`box_bounds`)."""
    out = receiver.astype(np.float64)
    for patch, (x0, y0, x1, y1) in patches:
        if mode == "normal":
            out[y0:y1, x0:x1] = patch
        else:
            out[y0:y1, x0:x1] = alpha * patch + (1.0 - alpha) * out[y0:y1, x0:x1]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --- the whole step ---


@dataclasses.dataclass
class Donors:
    """The training split's records as DADAM sees them: `train` (fields of every record of its own shards, the
    DADAM shards left out), the boxes that lie on them (`donors_of`: {label: [box + "donor": index in train]}), the
    boxes left out and why, and the tail labels that have a donor box."""

    paths: list
    train: list
    boxes: int
    bad_rows: list
    used: list
    left_out: dict
    donors_of: dict
    tail: list

    def labels_matrix(self):
        return np.stack([r["labels"] for r in self.train])

    def describe(self):
        return {"rows": self.boxes, "bad_rows": self.bad_rows[:20], "bad_row_count": len(self.bad_rows),
                "training_donor_boxes": len(self.used), "donor_images": len({b["donor"] for b in self.used}),
                "left_out": self.left_out}


def find_donors(out, manifest, boxes_path, tail_labels, split=TRAIN, encoding="png"):
    """`Donors` of the records in `out`: every box of `boxes_path` matched to a record of `split` (the training
    split) by file name; a box on a validation/test image, on an image not in the records, of a label the records
    lack or off the image is left out and counted. Tail labels: `tail_labels`, else the rarest labels of the split
    (`default_tail`), keeping those that have a donor box; none is a DataError saying which labels have boxes."""
    labels = list(manifest["labels"])
    boxes, bad_rows = read_boxes(boxes_path)
    info = manifest["splits"][split]
    base = [s for s in info["shards"] if not SHARD_RE.match(s["file"])]
    paths = [os.path.join(out, s["file"]) for s in base]
    train = [fields for _, fields in _records(paths, len(labels), encoding=encoding)]
    wrong = [r["image_id"] for r in train if r["split"] not in ("", split)]
    if wrong:  # the records say where they belong: a donor or receiver must be a training image
        raise DataError(f"{out}: training shards hold records of another split (e.g. {wrong[0]}); re-build them")
    by_name = {os.path.basename(r["image_id"]): i for i, r in enumerate(train)}
    split_of = _split_of_images(out)
    used, left_out = [], {"validation/test image": {}, "not in the records": 0, "label not in the records": 0,
                          "outside the image": 0}
    height, width = (int(v) for v in manifest["image_size"])
    for box in boxes:
        name = os.path.basename(box["image"])
        if box["label"] not in labels:
            left_out["label not in the records"] += 1
        elif not box_mask([box["box"]], height, width).any():  # beyond NIH's 1024 px frame
            left_out["outside the image"] += 1
        elif name in by_name:
            used.append({**box, "donor": by_name[name]})
        elif name in split_of:
            where = split_of[name]
            left_out["validation/test image"][where] = left_out["validation/test image"].get(where, 0) + 1
        else:
            left_out["not in the records"] += 1
    donors_of = {}
    for box in used:
        donors_of.setdefault(box["label"], []).append(box)
    positives = {label: int(info["positives"].get(label, 0)) for label in labels}
    tail = list(tail_labels) if tail_labels else default_tail(positives, labels)
    tail = [t for t in tail if t in donors_of]
    if not tail:
        have = ", ".join(f"{k} ({len(v)})" for k, v in sorted(donors_of.items())) or "none"
        raise DataError(f"{boxes_path}: no box of a tail label ({', '.join(tail_labels or []) or 'the rarest labels of the training split'}) "
                        f"lies on a training image; labels with training boxes: {have}. Pass --tail-labels with "
                        f"some of those")
    return Donors(paths, train, len(boxes), bad_rows, used, left_out, donors_of, tail)


def augment_records(out, manifest, options, shard_size, progress=False, log=print):
    """Add options.n DADAM images to the training split of the records in `out` (after build-records wrote them);
    writes the shards, dadam.csv and the figure, updates and returns the manifest (written)."""
    import tensorflow as tf

    from cxrkeras.data import features as ft
    from cxrkeras.data.images import encode_pixels
    from cxrkeras.data.manifest import records_encoding

    encoding = records_encoding(manifest)  # the synthetic shards are written as the records' other shards are
    labels = list(manifest["labels"])
    options.check(labels)
    found = find_donors(out, manifest, options.boxes, options.tail_labels, TRAIN, encoding)
    paths, train, used, donors_of, tail = found.paths, found.train, found.used, found.donors_of, found.tail
    info = manifest["splits"][TRAIN]
    positives = info["positives"]
    y_train = np.stack([r["labels"] for r in train])
    before = label_correlation(y_train)
    plan = _plan(train, donors_of, tail, None if options.correlation is None else before, options, labels)

    donors = {box["donor"] for item in plan for _, box in item["patches"]}
    images = {i: f["image"] for i, f in _records(paths, len(labels), keep=donors, encoding=encoding) if "image" in f}
    order = sorted(range(len(plan)), key=lambda k: (plan[k]["receiver"], k))  # one pass over the receivers
    receivers = {plan[k]["receiver"] for k in order}
    n_shards = max(1, math.ceil(len(plan) / int(shard_size)))
    written, rows = [], []
    stream = ((i, f) for i, f in _records(paths, len(labels), keep=receivers, encoding=encoding) if i in receivers)
    current = next(stream, None)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), unit="img", desc="dadam", dynamic_ncols=True)
    try:
        for s in range(n_shards):
            fname = shard_name(s, n_shards)
            chunk = order[s * int(shard_size):(s + 1) * int(shard_size)]
            with replacing(os.path.join(out, fname)) as tmp:
                with tf.io.TFRecordWriter(tmp) as writer:
                    for k in chunk:
                        item = plan[k]
                        while current[0] != item["receiver"]:
                            current = next(stream)
                        receiver = current[1]
                        h, w = receiver["image"].shape[:2]
                        bounds = [box_bounds(b["box"], h, w) for _, b in item["patches"]]
                        img = compose(receiver["image"], [(crop(images[b["donor"]], bound), bound) for (_, b), bound
                                                          in zip(item["patches"], bounds)], item["mode"],
                                      float(options.alpha))
                        h, w = img.shape[:2]
                        c = 1 if img.ndim == 2 else img.shape[2]
                        ex = ft.make_example(encode_pixels(img[..., 0] if c == 1 else img, encoding), h, w, c,
                                             item["labels"].tolist(), item["id"], receiver["patient_id"],
                                             age=receiver["age"], sex=receiver["sex"], view=receiver["view"],
                                             split=TRAIN, encoding=encoding, dataset=receiver["dataset"])
                        writer.write(ex.SerializeToString())
                        for (label, box), bound in zip(item["patches"], bounds):
                            donor = train[box["donor"]]
                            rows.append([item["id"], fname, item["mode"], label, donor["image_id"],
                                         donor["patient_id"], box["row"], receiver["image_id"],
                                         receiver["patient_id"], *bound,
                                         float(options.alpha) if item["mode"] == "blend" else 1.0])
                        if bar:
                            bar.update(1)
            written.append({"file": fname, "records": len(chunk), "sha256": sha256_file(os.path.join(out, fname)),
                            "bytes": os.path.getsize(os.path.join(out, fname))})
    finally:
        if bar:
            bar.close()
    with replacing(os.path.join(out, PROVENANCE)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "shard", "mode", "label", "donor_image", "donor_patient", "box_csv_row",
                    "receiver_image", "receiver_patient", "x0", "y0", "x1", "y1", "opacity"])
        w.writerows(rows)
    y_synth = np.stack([item["labels"] for item in plan])
    after = label_correlation(np.concatenate([y_train, y_synth]))
    correlation_figure(before, after, labels, os.path.join(out, FIGURE), len(train), len(plan))
    added = {label: 0 for label in labels}
    for item in plan:
        for label in {name for name, _ in item["patches"]}:
            added[label] += 1
    synth_pos = {label: int(y_synth[:, j].sum()) for j, label in enumerate(labels)}
    info["shards"] = [sh for sh in info["shards"] if not SHARD_RE.match(sh["file"])] + written
    info["images"] = int(info["images"]) + len(plan)
    info["positives"] = {label: int(positives.get(label, 0)) + synth_pos[label] for label in labels}
    from cxrkeras.data.datasets import manifest_names

    names = manifest_names(manifest)  # a synthetic image is of its receiver's source dataset
    synth_ds = np.bincount([train[item["receiver"]]["dataset"] for item in plan], minlength=len(names))
    whole = manifest["whole"]
    for part in (info, whole):
        if "datasets" in part:
            part["datasets"] = {n: int(part["datasets"].get(n, 0)) + int(k) for n, k in zip(names, synth_ds)}
    whole["images"] = int(whole["images"]) + len(plan)
    whole["positives"] = {label: int(whole["positives"].get(label, 0)) + synth_pos[label] for label in labels}
    manifest["augment"] = {
        "method": "dadam", "options": options.to_manifest(), "tail_labels": tail,
        "boxes": found.describe(),
        "synthetic": {"images": len(plan), "patch_label_images": {k: v for k, v in added.items() if v},
                      "modes": {m: sum(item["mode"] == m for item in plan) for m in ("normal", "blend")},
                      "receivers": len(receivers), "donors": len(donors),
                      "positives": {k: v for k, v in synth_pos.items() if v}},
        "shards": [s["file"] for s in written], "provenance": PROVENANCE, "figure": FIGURE,
        "correlation_max_abs_change": float(np.abs(after - before).max()),
    }
    mf.write_manifest(out, manifest)
    log(f"DADAM: {len(plan)} synthetic training images ({manifest['augment']['synthetic']['modes']['normal']} on "
        f"No Finding, {manifest['augment']['synthetic']['modes']['blend']} blended) from {len(used)} training boxes "
        f"of {len(donors_of)} label(s); tail labels {', '.join(tail)}; boxes left out: {found.left_out}; "
        f"provenance {os.path.join(out, PROVENANCE)}, label correlations {os.path.join(out, FIGURE)}")
    return manifest


def correlation_figure(before, after, labels, path, n_train, n_synth):
    """The training labels' Pearson correlation matrix before and after the synthetic images, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2))
    change = after - before
    panels = ((before, f"training labels ({n_train} images)", "coolwarm", 1.0),
              (after, f"with {n_synth} DADAM images", "coolwarm", 1.0),
              (change, "after - before", "PuOr", max(1e-3, float(np.abs(change).max()))))
    for i, (ax, (mat, title, cmap, lim)) in enumerate(zip(axes, panels)):
        shown = mat.copy()
        if i < 2:  # the diagonal (1) would dominate the colour scale
            np.fill_diagonal(shown, np.nan)
        im = ax.imshow(shown, cmap=cmap, vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"Pearson r: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_provenance(out):
    """{image_id: [(label, (x0, y0, x1, y1), mode)]} of a records folder's DADAM images ({} without any)."""
    path = os.path.join(out, PROVENANCE)
    if not os.path.isfile(path):
        return {}
    found = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            found.setdefault(row["image_id"], []).append(
                (row["label"], tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1")), row["mode"]))
    return found
