"""Online DADAM (`data.dadam`): the training pipeline's hook that puts box patches of the training split's
tail-class images on its training images as they stream, each pass of the split drawn afresh.

The planning is offline DADAM's (cxrkeras.data.dadam): the box file read and matched to the training split's own
records only (`find_donors`: a box on a validation/test image is left out and counted), the boxes scaled from NIH's
1024 px frame to the images' size (`box_bounds`), the tail label and box drawn (`draw_patch`), the correlated
partner (`draw_partner`), the pixels (`compose`). What differs: the receiver is the streamed image itself, so its
labels choose the mode: no finding -> the patch is pasted ("normal") with its partner; a tail class -> the patch is
blended with opacity `alpha` ("blend"); any other image is left as it is. Each eligible image gets a patch with
probability `probability`.

Stage 1 reads only images with a finding, so it only blends (its stream holds no No Finding image; none is added
back: stage 1 stays "BCE on abnormal images" with its own epoch size); stage 2 pastes and blends.

The hook runs after the cache (cached images stay unaugmented) and before the shuffle, on the training split only
(`apply` refuses any other). The draws come from a seeded stream of their own that differs per pass; with a seed,
the same seed gives the same augmented batches. The donor patches are decoded once, at the stream's size by the
pipeline's own `decode_image` (equalisation included), and bounded by `max_bank_mb`. `counts` holds, per pass, how
many images got a patch of each label (what the run record writes), and `events` the patches of the current pass
(preview-batch draws their boxes).
"""

import threading

import numpy as np

from cxrkeras.data import dadam as planning
from cxrkeras.errors import ConfigError, DataError

SEED_SALT = 0x0DADA  # the patch draws have their own seeded stream, not the augmentation's
MB = 1024 * 1024
MAX_EVENTS = 1_000_000  # patches kept for the current pass (preview-batch); beyond it only counted


def from_config(config, log=print):
    """The OnlineDadam of a training config (config.data.dadam), or None when data.dadam.boxes is null."""
    d = config.data.dadam
    if d.boxes is None:
        return None
    return OnlineDadam(config.data.records, d, split=config.data.train_split, seed=config.train.seed, log=log)


class OnlineDadam:
    """Donors and tail labels of the training split (read when made), the donor bank (decoded at the stream's size
    by `apply`) and the counts of what was made."""

    def __init__(self, records_dir, options, split="train", seed=None, log=print):
        from cxrkeras.data.manifest import load_manifest, records_encoding
        from cxrkeras.hashing import sha256_file

        self.records_dir, self.options, self.split, self.log = records_dir, options, split, log
        self.manifest = load_manifest(records_dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"{records_dir}: no split {split!r} to take DADAM donors from")
        self.labels = list(self.manifest["labels"])
        unknown = [t for t in (options.tail_labels or ()) if t not in self.labels]
        if unknown:
            raise ConfigError(f"data.dadam.tail_labels {', '.join(unknown)}: not labels of the records "
                              f"({', '.join(self.labels)})")
        self.encoding = records_encoding(self.manifest)
        self.boxes_sha256 = sha256_file(options.boxes)
        self.donors = planning.find_donors(records_dir, self.manifest, options.boxes, options.tail_labels, split,
                                           self.encoding)
        y = self.donors.labels_matrix()
        self.correlation = None if options.correlation is None else planning.label_correlation(y)
        self.given = planning.co_occurrence(y)
        self.tail = list(self.donors.tail)
        self.tail_idx = np.array([self.labels.index(t) for t in self.tail])
        partners = {planning.partner_label(t, self.donors.donors_of, self.correlation, self.labels,
                                           options.correlation) for t in self.tail}
        self.bank_labels = sorted(set(self.tail) | (partners - {None}))  # the boxes a draw can use
        self.seed = seed
        self.stage = None
        self.bank, self.bank_size = None, None
        self.counts, self.events = [], {}
        self._lock = threading.Lock()

    # --- the donor bank ---

    def _bank_boxes(self):
        return [box for label in self.bank_labels for box in self.donors.donors_of[label]]

    def bank_bytes(self, height, width, channels):
        """Bytes the bank holds at this size: every box patch a draw can use."""
        total = 0
        for box in self._bank_boxes():
            x0, y0, x1, y1 = planning.box_bounds(box["box"], height, width)
            total += (x1 - x0) * (y1 - y0) * channels
        return total

    def load_bank(self, work_size, channels, preprocessor):
        """{box row: (patch uint8, bounds)} at `work_size`, decoded once by the pipeline's `decode_image`."""
        from cxrkeras.data.pipeline import decode_image

        height, width = (int(v) for v in work_size)
        if self.bank is not None and self.bank_size == (height, width, channels):
            return self.bank
        need = self.bank_bytes(height, width, channels)
        limit = float(self.options.max_bank_mb) * MB
        boxes = self._bank_boxes()
        if need > limit:
            raise ConfigError(
                f"online DADAM: the donor bank would hold {need / MB:.1f} MB of box patches ({len(boxes)} training "
                f"boxes of {', '.join(self.bank_labels)} at {height}x{width}x{channels}), above data.dadam.max_bank_mb"
                f" = {self.options.max_bank_mb:g}: list fewer data.dadam.tail_labels, set data.dadam.correlation "
                f"null (no partner patches), use records of a smaller size, or raise data.dadam.max_bank_mb")
        keep = {box["donor"] for box in boxes}
        images = {i: f["image"] for i, f in planning._records(
            self.donors.paths, len(self.labels), keep=keep, encoding=self.encoding,
            decode=lambda ex: decode_image(ex, channels, self.encoding, preprocessor, (height, width)))
            if "image" in f}
        bank = {}
        for box in boxes:
            bounds = planning.box_bounds(box["box"], height, width)
            bank[box["row"]] = (np.array(planning.crop(images[box["donor"]], bounds)), bounds)
        self.bank, self.bank_size = bank, (height, width, channels)
        self.log(f"online DADAM: {len(bank)} donor patches ({need / MB:.2f} MB) from "
                 f"{len(keep)} training images; tail labels {', '.join(self.tail)}; probability "
                 f"{self.options.probability:g}" + (" (stage 1: blends only)" if self.stage == 1 else ""))
        return bank

    # --- the hook ---

    def apply(self, ds, *, split, training, stage, seed, work_size, preprocessor, no_finding_class):
        """The element stream (image uint8 HxWxC, labels, image_id, patient_id, values) with the patches put on;
        training split only."""
        import tensorflow as tf

        if not training or split != self.split:
            raise ConfigError(f"online DADAM augments the training split {self.split!r} only, not split {split!r}"
                              + ("" if training else " in evaluation"))
        if work_size is None:
            raise DataError(f"{self.records_dir}: online DADAM needs records of one stored size (manifest.json "
                            f"image_size); re-build them with `cxrkeras build-records`")
        self.stage = int(stage)
        channels = int(ds.element_spec[0].shape[-1])
        self.load_bank(work_size, channels, preprocessor)
        n_labels = int(ds.element_spec[1].shape[-1])
        randoms = tf.data.Dataset.random(seed=None if seed is None else int(seed) + SEED_SALT,
                                         rerandomize_each_iteration=True)

        def put(element, r):
            index, (image, labels, image_id, patient_id, values) = element
            out, y = tf.numpy_function(lambda *a: self._one(*a, no_finding_class=no_finding_class),
                                       [index, r, image, labels, image_id], [tf.uint8, tf.int64], stateful=True)
            out = tf.ensure_shape(out, image.shape)
            y = tf.ensure_shape(y, [n_labels])
            return out, y, image_id, patient_id, values

        # one call at a time, in stream order: the counts follow the passes (index 0 starts one)
        return tf.data.Dataset.zip((ds.enumerate(), randoms)).map(put)

    def _one(self, index, r, image, labels, image_id, no_finding_class=False):
        """One element: (image, labels), a patch put on with this element's own seeded draws."""
        with self._lock:
            if int(index) == 0:
                self.counts.append({"pass": len(self.counts) + 1, "images": 0, "synthetic": 0,
                                    "modes": {"normal": 0, "blend": 0}, "patch_label_images": {},
                                    "positives_added": {}})
                self.events = {}
            entry = self.counts[-1] if self.counts else None
            if entry is None:  # the stream did not start at index 0 (never by build_dataset)
                raise DataError("online DADAM: element stream started mid-pass")
            entry["images"] += 1
        y = labels[:len(self.labels)]
        if not y.any():
            mode = "normal"
        elif y[self.tail_idx].any():
            mode = "blend"
        else:
            return image, labels
        rng = np.random.default_rng(int(r) & 0xFFFFFFFFFFFFFFFF)
        if rng.random() >= float(self.options.probability):
            return image, labels
        name = image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)
        train = self.donors.train
        for _ in range(8):  # an image is not its own donor
            label, box = planning.draw_patch(rng, self.tail, self.donors.donors_of)
            if train[box["donor"]]["image_id"] != name:
                break
        else:
            return image, labels
        patches = [(label, box)]
        if mode == "normal":
            patches += planning.draw_partner(rng, label, self.donors.donors_of, self.correlation, self.given,
                                             self.labels, self.options.correlation)
        placed = [self.bank[b["row"]] for _, b in patches]
        out = planning.compose(image, placed, mode, float(self.options.alpha))
        new = planning.with_patch_labels(y, patches, self.labels)
        y_out = np.array(labels, copy=True)
        y_out[:len(self.labels)] = new
        if no_finding_class:  # the derived 'No Finding' label: no finding any more
            y_out[len(self.labels)] = int(not new.any())
        with self._lock:
            entry["synthetic"] += 1
            entry["modes"][mode] += 1
            for patch_label in {n for n, _ in patches}:
                entry["patch_label_images"][patch_label] = entry["patch_label_images"].get(patch_label, 0) + 1
            for j in np.flatnonzero(new > y):
                key = self.labels[int(j)]
                entry["positives_added"][key] = entry["positives_added"].get(key, 0) + 1
            if len(self.events) < MAX_EVENTS:
                self.events[name] = [(n, bounds, mode) for (n, _), (_, bounds) in zip(patches, placed)]
        return out, y_out.astype(np.int64)

    # --- the record ---

    def record(self, previous=None, resumed_at=None):
        """run_info.json's "dadam": the options, the box file's sha256, the donors, and per pass of the training
        split the images read and how many got a patch of each label (`previous`: a resumed run's record, whose
        passes are kept before this process's)."""
        import os

        donors = sorted({self.donors.train[b["donor"]]["image_id"] for label in self.bank_labels
                         for b in self.donors.donors_of[label]})
        with self._lock:
            passes = [dict(c, resumed_at_epoch=resumed_at) if resumed_at else dict(c) for c in self.counts]
        earlier = list((previous or {}).get("passes") or [])
        return {"mode": "online", "boxes": os.path.abspath(self.options.boxes), "boxes_sha256": self.boxes_sha256,
                "probability": float(self.options.probability), "alpha": float(self.options.alpha),
                "correlation": None if self.options.correlation is None else float(self.options.correlation),
                "tail_labels": self.tail, "requested_tail_labels": list(self.options.tail_labels or []) or None,
                "partner_labels": [m for m in self.bank_labels if m not in self.tail],
                "max_bank_mb": float(self.options.max_bank_mb), "split": self.split, "stage": self.stage,
                "stage_modes": ["blend"] if self.stage == 1 else ["normal", "blend"],
                "box_file": self.donors.describe(), "donor_images": donors[:1000], "donor_image_count": len(donors),
                "bank_patches": len(self.bank or {}), "bank_size": list(self.bank_size) if self.bank_size else None,
                "passes": earlier + passes,
                "note": "a pass is one read of the training split's stage images (an epoch of the default "
                        "steps_per_epoch); the last pass may be partial (read ahead by the shuffle buffer and "
                        "prefetch when training stopped)"}
