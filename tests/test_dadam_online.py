"""Online DADAM (data.dadam): patches of training donors only, the donor's pixels inside the box scaled from NIH's
1024 px frame (pasted exactly, blended at alpha within rounding) and the receiver's outside, the label added; seeded
per pass; the counts are those of the batches; evaluation untouched; two stages through evaluate."""

import csv
import json
import os

import numpy as np
import pytest

from cxrkeras.errors import ConfigError

TAIL = ["Mass", "Nodule"]
FRAME = 1024.0


def _index(records):
    with open(os.path.join(records, "index.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def boxes(tiny_records, tmp_path_factory):
    """A box file with boxes on training, validation and test images (labels Mass / Nodule)."""
    by_split = {}
    for row in _index(tiny_records):
        by_split.setdefault(row["split"], []).append(row)
    path = str(tmp_path_factory.mktemp("online-dadam") / "boxes.csv")
    rows = []
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for k, row in enumerate(by_split[split][:n]):
            x, y = rng.uniform(100, 600, 2)
            rows.append([os.path.basename(row["image_id"]), TAIL[k % 2], x, y, rng.uniform(120, 300),
                         rng.uniform(120, 300)])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows(rows)
    return {"path": path, "rows": rows, "by_split": by_split}


def _options(boxes, **kw):
    from cxrkeras.config import DadamConfig

    return DadamConfig(**{"boxes": boxes["path"], "probability": 1.0, "tail_labels": TAIL, "correlation": None,
                          **kw})


def _online(records, boxes, **kw):
    from cxrkeras.data.dadam_online import OnlineDadam

    return OnlineDadam(records, _options(boxes, **kw), log=lambda *_: None)


def _elements(records):
    """(images uint8 [N, H, W, 1], labels [N, L], ids) of the training split, read directly from its shards."""
    import tensorflow as tf

    from cxrkeras.data import features as ft
    from cxrkeras.data.manifest import load_manifest, shard_paths

    manifest = load_manifest(records)
    spec = ft.feature_spec(len(manifest["labels"]))
    images, labels, ids = [], [], []
    for path in shard_paths(manifest, records, "train"):
        for raw in tf.data.TFRecordDataset(path):
            ex = tf.io.parse_single_example(raw, spec)
            images.append(tf.io.decode_png(ex[ft.IMAGE_ENCODED], channels=1).numpy())
            labels.append(ex[ft.LABELS].numpy())
            ids.append(ex[ft.IMAGE_ID].numpy().decode())
    return np.stack(images), np.stack(labels), ids


def _hand_bounds(box, size):
    """NIH's (x, y, w, h) box in the 1024 px frame -> pixel bounds of the pixel centres inside it, at `size`."""
    x, y, w, h = box
    s = size / FRAME
    c0, c1 = int(np.ceil(x * s - 0.5)), int(np.ceil((x + w) * s - 0.5))
    r0, r1 = int(np.ceil(y * s - 0.5)), int(np.ceil((y + h) * s - 0.5))
    return c0, r0, max(c1, c0 + 1), max(r1, r0 + 1)


@pytest.mark.timeout(300)
def test_hook_puts_the_donors_pixels_in_the_scaled_box_and_adds_the_label(tiny_records, boxes):
    import tensorflow as tf

    from cxrkeras.data.preprocessor import Preprocessor
    from cxrkeras.data.manifest import load_manifest

    images, labels, ids = _elements(tiny_records)
    labels_of = {i: y for i, y in zip(ids, labels)}
    image_of = {i: im for i, im in zip(ids, images)}
    names = list(load_manifest(tiny_records)["labels"])
    online = _online(tiny_records, boxes, alpha=0.6)
    ds = tf.data.Dataset.from_tensor_slices((images, labels, ids, ids, np.zeros((len(ids), 0), np.float32)))
    pre = Preprocessor.for_records(load_manifest(tiny_records), 64, "torch", None)
    out = list(online.apply(ds, split="train", training=True, stage=2, seed=7, work_size=(64, 64), preprocessor=pre,
                            no_finding_class=False).as_numpy_iterator())
    rows = {r[0]: r for r in boxes["rows"]}
    train_names = {os.path.basename(r["image_id"]): r["image_id"] for r in boxes["by_split"]["train"]}
    tail = [names.index(t) for t in TAIL]
    changed, pasted, blended = 0, 0, 0
    for (image, y, image_id, _, _), receiver, y0 in zip(out, images, labels):
        image_id = image_id.decode()
        events = online.events.get(image_id)
        eligible = not y0.any() or y0[tail].any()
        if not events:
            assert np.array_equal(image, receiver) and np.array_equal(y, y0)
            assert not eligible  # probability 1: every eligible image gets a patch
            continue
        changed += 1
        assert len(events) == 1  # correlation off: no partner
        label, bounds, mode = events[0]
        donor_rows = [r for r in boxes["rows"] if r[1] == label]
        # the donor: a training image whose box of that label has exactly these bounds at 64 px
        matches = [r for r in donor_rows if _hand_bounds(r[2:], 64) == tuple(bounds) and r[0] in train_names]
        assert matches, (label, bounds)
        donor = image_of[train_names[matches[0][0]]]
        assert train_names[matches[0][0]] != image_id
        x0, y0b, x1, y1 = bounds
        inside = np.zeros(image.shape[:2], bool)
        inside[y0b:y1, x0:x1] = True
        assert np.array_equal(image[~inside], receiver[~inside])  # the receiver's pixels outside
        if mode == "normal":
            assert not y0.any()
            assert np.array_equal(image[inside], donor[inside])  # pasted exactly
            pasted += 1
        else:
            assert y0[tail].any()
            want = 0.6 * donor[inside].astype(float) + 0.4 * receiver[inside].astype(float)
            assert np.abs(image[inside].astype(float) - want).max() <= 0.5 + 1e-9  # blended within rounding
            blended += 1
        assert y[names.index(label)] == 1 and np.all(y >= y0) and np.array_equal(np.delete(y, names.index(label)),
                                                                                 np.delete(y0, names.index(label)))
        assert labels_of[image_id] is not None
    counts = online.counts[0]
    assert changed == counts["synthetic"] == pasted + blended > 0 and pasted > 0 and blended > 0
    assert counts["modes"] == {"normal": pasted, "blend": blended} and counts["images"] == len(images)


@pytest.mark.timeout(300)
def test_only_training_images_donate_and_evaluation_is_refused(tiny_records, boxes):
    from cxrkeras.data.pipeline import build_dataset

    online = _online(tiny_records, boxes)
    split_of = {os.path.basename(r["image_id"]): r["split"] for r in _index(tiny_records)}
    donors = {online.donors.train[b["donor"]]["image_id"] for b in online.donors.used}
    assert donors and all(split_of[os.path.basename(d)] == "train" for d in donors)
    assert online.donors.left_out["validation/test image"] == {"val": 3, "test": 3}
    for split, training in (("val", False), ("test", False), ("val", True)):
        with pytest.raises(ConfigError, match="training split 'train' only"):
            build_dataset(tiny_records, split, training=training, image_size=32, batch_size=4, dadam=online)
    record = online.record()
    assert set(record["donor_images"]) == donors and record["box_file"]["left_out"]["validation/test image"]


def _batches(records, online, seed, passes=1):
    from cxrkeras.data.pipeline import build_dataset

    ds = build_dataset(records, "train", stage=2, batch_size=16, training=True, augment=False, image_size=64,
                       seed=seed, return_ids=True, shuffle_buffer=64, drop_remainder=False, dadam=online,
                       repeat=passes > 1)
    out = []
    n = -(-count_train(records) // 16)
    for k, (images, y, extra) in enumerate(ds.as_numpy_iterator()):
        out.append((images, y, [s.decode() for s in extra["image_id"]]))
        if k + 1 == n * passes:
            break
    return out


def count_train(records):
    from cxrkeras.data.pipeline import count_images

    return count_images(records, "train", 2)


@pytest.mark.timeout(300)
def test_counts_are_the_batches_and_draws_are_seeded_per_pass(tiny_records, boxes):
    from cxrkeras.data.manifest import load_manifest

    names = list(load_manifest(tiny_records)["labels"])
    plain = _batches(tiny_records, None, seed=5)
    online = _online(tiny_records, boxes, probability=0.5)
    aug = _batches(tiny_records, online, seed=5)
    changed, added = set(), {}
    for (img0, y0, ids0), (img1, y1, ids1) in zip(plain, aug):
        assert ids0 == ids1  # DADAM keeps the order
        for k, image_id in enumerate(ids1):
            if not np.allclose(img0[k], img1[k], atol=1e-6):
                changed.add(image_id)
            for j in np.flatnonzero(y1[k] > y0[k]):
                added[names[j]] = added.get(names[j], 0) + 1
    counts = online.counts[0]
    assert changed == set(online.events) and len(changed) == counts["synthetic"] > 0
    assert added == counts["positives_added"]
    per_label = {}
    for patches in online.events.values():
        for label in {p[0] for p in patches}:
            per_label[label] = per_label.get(label, 0) + 1
    assert per_label == counts["patch_label_images"]
    again = _batches(tiny_records, _online(tiny_records, boxes, probability=0.5), seed=5)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(aug, again))
    two = _online(tiny_records, boxes, probability=0.5)
    both = _batches(tiny_records, two, seed=5, passes=2)
    # pass 1 as before, pass 2 read whole and drawn afresh (a 3rd may have begun: read ahead by shuffle + prefetch)
    assert len(two.counts) >= 2 and two.counts[0] == counts and two.counts[1]["images"] == counts["images"]
    flat = [(i, img, y) for images, ys, ids in both for i, img, y in zip(ids, images, ys)]  # batches span passes
    m = counts["images"]
    first, second = ({i: (img, y) for i, img, y in part} for part in (flat[:m], flat[m:2 * m]))
    assert set(first) == set(second) == {i for _, _, ids in aug for i in ids}
    differ = [i for i in first if not np.array_equal(first[i][0], second[i][0])]
    assert two.counts[1]["synthetic"] > 0 and len(differ) > 0.2 * len(first)


def test_bank_bound_and_bad_options_are_clear(tiny_records, boxes):
    from cxrkeras.data.preprocessor import Preprocessor
    from cxrkeras.data.manifest import load_manifest

    online = _online(tiny_records, boxes, max_bank_mb=1e-4)
    pre = Preprocessor.for_records(load_manifest(tiny_records), 64, "torch", None)
    with pytest.raises(ConfigError, match="above data.dadam.max_bank_mb = 0.0001: list fewer data.dadam.tail"):
        online.load_bank((64, 64), 1, pre)
    with pytest.raises(ConfigError, match="tail_labels Nope: not labels of the records"):
        _online(tiny_records, boxes, tail_labels=["Nope"])
    from cxrkeras.config import load_config

    with pytest.raises(ConfigError, match="data.dadam.probability must be in"):
        load_config(overrides={"data": {"dadam": {"boxes": boxes["path"], "probability": 1.5}}})
    with pytest.raises(ConfigError, match="data.dadam.boxes .* is not a file"):
        load_config(overrides={"data": {"dadam": {"boxes": boxes["path"] + ".missing"}}})


@pytest.mark.timeout(600)
def test_two_stages_with_online_dadam_through_evaluate(tiny_records, boxes, tmp_path):
    """Stage 1 (blends only) and stage 2 with data.dadam; run_info.json records the options, the box file's sha256,
    the donors and the images made per pass; the validation batches equal those of a run without it; evaluate
    scores the run."""
    from cxrkeras.config import load_config
    from cxrkeras.data.dadam_online import from_config
    from cxrkeras.evaluation.evaluate import evaluate
    from cxrkeras.hashing import sha256_file
    from cxrkeras.training.trainer import make_datasets, train

    overrides = {"data": {"records": tiny_records, "image_size": 32, "batch_size": 4, "shuffle_buffer": 64,
                          "dadam": {"boxes": boxes["path"], "probability": 0.5, "tail_labels": TAIL}},
                 "model": {"variant": "densenet121-lka-last2", "weights": None,
                           "overrides": {"blocks": [1, 1, 1, 1], "width_multiplier": 0.125}},
                 "train": {"epochs": 2, "verbose": 0}, "run": {"root": str(tmp_path), "name": "d"}}
    config = load_config(overrides=overrides)
    infos = {}
    for stage in (1, 2):
        result = train(config, stage, log=lambda *_: None)
        infos[stage] = json.load(open(os.path.join(result.stage_dir, "run_info.json")))
    for stage, info in infos.items():
        d = info["dadam"]
        assert d["boxes_sha256"] == sha256_file(boxes["path"]) and d["tail_labels"] == TAIL and d["stage"] == stage
        assert d["probability"] == 0.5 and d["donor_image_count"] == 6 and len(d["passes"]) >= 2
        full = [p for p in d["passes"] if p["images"] == info["train_images"]]
        assert len(full) >= 2 and all(p["synthetic"] > 0 for p in full)
        assert sum(p["patch_label_images"].get(t, 0) for p in full for t in TAIL) >= sum(p["synthetic"] for p in full)
    assert all(p["modes"]["normal"] == 0 for p in infos[1]["dadam"]["passes"])  # stage 1 has no No Finding image
    assert any(p["modes"]["normal"] > 0 for p in infos[2]["dadam"]["passes"])
    _, val_on = make_datasets(config, 2, dadam=from_config(config, log=lambda *_: None))
    plain = load_config(overrides={**overrides, "data": {**overrides["data"], "dadam": {"boxes": None}}})
    _, val_off = make_datasets(plain, 2)
    for (a, ya), (b, yb) in zip(val_on.as_numpy_iterator(), val_off.as_numpy_iterator()):
        assert np.array_equal(a, b) and np.array_equal(ya, yb)  # evaluation batches untouched
    report = evaluate(os.path.join(str(tmp_path), "d"), tiny_records, split="test", out_dir=str(tmp_path / "ev"),
                      n_boot=20, figures_on=False, log=lambda *_: None)
    assert report is not None and os.path.isfile(tmp_path / "ev" / "metrics.json")


@pytest.mark.timeout(300)
def test_preview_batch_shows_online_dadam(tiny_records, boxes, tmp_path):
    from click.testing import CliRunner

    from cxrkeras.cli import cli

    png = str(tmp_path / "online.png")
    args = ["preview-batch", tiny_records, "--stage", "2", "--n", "8", "--image-size", "64", "--out", png,
            "--online-dadam", boxes["path"], "--tail-labels", ",".join(TAIL)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert open(png, "rb").read(4) == b"\x89PNG"
    res = CliRunner().invoke(cli, args + ["--split", "val"])
    assert res.exit_code != 0 and "shows the training split, not 'val'" in res.output and "Traceback" not in res.output
