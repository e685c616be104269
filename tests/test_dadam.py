"""DADAM (build-records --augment dadam): the donor's pixels inside the scaled box and its label added; donors and
receivers only from the training split; manifest counts, provenance, preview boxes, bad options."""

import csv
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_64, SAMPLE_64_CSV

from cxrkeras.data.boxes import box_mask
from cxrkeras.errors import ConfigError, DataError

IMAGES = os.path.join(SAMPLE_64, "images")
TAIL = ("Mass", "Nodule")


def _index(records):
    with open(os.path.join(records, "index.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_boxes(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows(rows)
    return path


def _records(records, files):
    """{image_id: (image uint8 [H, W], labels, patient)} of the given shard files, read with TensorFlow directly."""
    import tensorflow as tf

    from cxrkeras.data import features as ft
    from cxrkeras.data.manifest import load_manifest

    manifest = load_manifest(records)
    spec = ft.feature_spec(len(manifest["labels"]))
    out = {}
    for name in files:
        for raw in tf.data.TFRecordDataset(os.path.join(records, name)):
            ex = tf.io.parse_single_example(raw, spec)
            data = ex[ft.IMAGE_ENCODED].numpy()
            if manifest.get("encoding", "png") == "raw":  # every shard, the synthetic ones too, in one encoding
                image = np.frombuffer(data, np.uint8).reshape(int(ex[ft.IMAGE_HEIGHT]), int(ex[ft.IMAGE_WIDTH]))
            else:
                image = tf.io.decode_png(data).numpy()[..., 0]
            out[ex[ft.IMAGE_ID].numpy().decode()] = (image, ex[ft.LABELS].numpy(), ex[ft.PATIENT_ID].numpy().decode())
    return out


@pytest.fixture(scope="module", params=["png", "raw"])
def augmented(request, tiny_records, tmp_path_factory):
    """The tests' sample built again with DADAM (PNG and raw records), from a box file with boxes on images of every
    split."""
    from cxrkeras.data.dadam import DadamOptions
    from cxrkeras.data.records import build_records

    root = tmp_path_factory.mktemp("dadam")
    by_split = {}
    for row in _index(tiny_records):
        by_split.setdefault(row["split"], []).append(row["image_id"])
    rng = np.random.default_rng(0)
    rows = []
    for split_name, n in (("train", 6), ("val", 3), ("test", 3)):
        for k, image in enumerate(by_split[split_name][:n]):
            x, y = rng.uniform(150, 600, 2)
            rows.append([image, TAIL[k % 2], x, y, rng.uniform(120, 300), rng.uniform(120, 300)])
    rows.append(["not_in_the_records.png", "Mass", 100, 100, 50, 50])
    rows.append([by_split["train"][0], "Mass", 2000, 100, 50, 50])  # beyond the 1024 px frame
    boxes = _write_boxes(str(root / "boxes.csv"), rows)
    out = str(root / "records")
    options = DadamOptions(boxes, n=60, tail_labels=TAIL, alpha=0.6, normal_fraction=0.5, correlation=-1.0, seed=3)
    build_records(SAMPLE_64_CSV, IMAGES, out, image_size=64, channels=1, shard_size=40, seed=0, workers=1,
                  progress=False, augment=options, log=lambda *_: None, encoding=request.param)
    from cxrkeras.data.manifest import load_manifest

    return {"out": out, "boxes": boxes, "rows": rows, "by_split": by_split, "manifest": load_manifest(out),
            "tiny": tiny_records}


def _provenance(out):
    with open(os.path.join(out, "dadam.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_donors_and_receivers_are_training_images_only(augmented):
    from cxrkeras.data.inspect import inspect_records

    out, by_split = augmented["out"], augmented["by_split"]
    prov = _provenance(out)
    train = set(by_split["train"])
    held_out = set(by_split["val"]) | set(by_split["test"])
    patients = {row["image_id"]: row["patient_id"] for row in _index(augmented["tiny"])}
    held_patients = {patients[i] for i in held_out}
    assert prov and {r["donor_image"] for r in prov} <= train and {r["receiver_image"] for r in prov} <= train
    assert not ({r["donor_image"] for r in prov} | {r["receiver_image"] for r in prov}) & held_out
    assert not ({r["donor_patient"] for r in prov} | {r["receiver_patient"] for r in prov}) & held_patients
    aug = augmented["manifest"]["augment"]
    assert aug["boxes"]["left_out"] == {"validation/test image": {"val": 3, "test": 3}, "not in the records": 1,
                                        "label not in the records": 0, "outside the image": 1}
    assert aug["boxes"]["training_donor_boxes"] == 6 and aug["synthetic"]["images"] == 60
    # the synthetic records: training split, the receivers' patients; inspect re-counts them and the split
    synthetic = _records(out, aug["shards"])
    assert len(synthetic) == 60 and all(p in {patients[i] for i in train} for _, _, p in synthetic.values())
    result = inspect_records(out)
    assert not result.problems and result.records == int(augmented["manifest"]["whole"]["images"])
    assert augmented["manifest"]["splits"]["train"]["images"] == \
        sum(s["records"] for s in augmented["manifest"]["splits"]["train"]["shards"])


def test_augmented_image_has_the_donors_pixels_in_the_scaled_box_and_its_label(augmented):
    out, manifest = augmented["out"], augmented["manifest"]
    labels = manifest["labels"]
    base = [s["file"] for s in manifest["splits"]["train"]["shards"] if s["file"] not in manifest["augment"]["shards"]]
    originals = _records(out, base)
    synthetic = _records(out, manifest["augment"]["shards"])
    box_of_row = {i + 2: tuple(float(v) for v in row[2:6]) for i, row in enumerate(augmented["rows"])}
    seen, by_image = set(), {}
    for row in _provenance(out):
        by_image.setdefault(row["image_id"], []).append(row)
    assert len(by_image) == 60
    for image_id, patches in by_image.items():
        image, y, _ = synthetic[image_id]
        receiver, y_receiver, _ = originals[patches[0]["receiver_image"]]
        masks = [box_mask([box_of_row[int(r["box_csv_row"])]], 64, 64) for r in patches]  # 1024 px frame -> 64
        for k, (row, mask) in enumerate(zip(patches, masks)):
            donor, _, _ = originals[row["donor_image"]]
            own = mask & ~np.logical_or.reduce(masks[k + 1:] or [np.zeros_like(mask)])  # later patches cover it
            assert mask.any() and not mask.all()
            if row["mode"] == "normal":
                np.testing.assert_array_equal(image[own], donor[own])
                assert not y_receiver.any()  # pasted onto a No Finding image
            else:
                blend = np.round(0.6 * donor[own].astype(float) + 0.4 * receiver[own].astype(float))
                assert np.abs(image[own] - blend).max() <= 0.5
                assert y_receiver[[labels.index(t) for t in TAIL]].any()  # onto an image with a tail class
            seen.add(row["mode"])
        outside = ~np.logical_or.reduce(masks)
        np.testing.assert_array_equal(image[outside], receiver[outside])
        expected = y_receiver.copy()
        for row in patches:
            expected[labels.index(row["label"])] = 1  # the donor's label added
        np.testing.assert_array_equal(y, expected)
    assert seen == {"normal", "blend"}
    counts = manifest["augment"]["synthetic"]["patch_label_images"]
    assert sum(counts.values()) >= 60 and set(counts) <= set(TAIL)


def test_preview_draws_the_patches_and_a_plain_rebuild_removes_them(augmented, tmp_path):
    from cxrkeras.cli import cli
    from cxrkeras.data.inspect import inspect_records
    from cxrkeras.data.records import build_records

    png = str(tmp_path / "dadam.png")
    result = CliRunner().invoke(cli, ["preview-batch", augmented["out"], "--dadam", "--n", "4", "--image-size",
                                      "64", "--out", png])
    assert result.exit_code == 0, result.output
    assert os.path.getsize(png) > 10_000
    assert os.path.isfile(os.path.join(augmented["out"], "dadam_correlation.png"))
    result = CliRunner().invoke(cli, ["preview-batch", augmented["tiny"], "--dadam", "--out", png])
    assert result.exit_code != 0 and "holds no DADAM images" in result.output
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(augmented["out"], copy)
    build_records(SAMPLE_64_CSV, IMAGES, copy, image_size=64, channels=1, shard_size=40, seed=0, workers=1,
                  progress=False, encoding=augmented["manifest"].get("encoding", "png"))  # the same without --augment
    assert not any(f.startswith("train-dadam") or f.startswith("dadam") for f in os.listdir(copy))
    assert not inspect_records(copy).problems


def test_bad_augment_options_are_clear_errors(augmented, tmp_path):
    from cxrkeras.cli import cli
    from cxrkeras.data.dadam import DadamOptions
    from cxrkeras.data.records import build_records

    common = dict(image_size=64, channels=1, shard_size=40, seed=0, workers=1, progress=False)
    with pytest.raises(DataError, match="not found"):
        build_records(SAMPLE_64_CSV, IMAGES, str(tmp_path / "a"), augment=DadamOptions(str(tmp_path / "no.csv")),
                      **common)
    with pytest.raises(ConfigError, match="dry-run"):
        build_records(SAMPLE_64_CSV, IMAGES, str(tmp_path / "a"), dry_run=True,
                      augment=DadamOptions(augmented["boxes"]), **common)
    with pytest.raises(ConfigError, match="--tail-labels Masss"):
        build_records(SAMPLE_64_CSV, IMAGES, str(tmp_path / "b"), augment=DadamOptions(
            augmented["boxes"], tail_labels=("Masss",)), **common)
    with pytest.raises(DataError, match="no box of a tail label"):
        build_records(SAMPLE_64_CSV, IMAGES, str(tmp_path / "c"), augment=DadamOptions(
            augmented["boxes"], tail_labels=("Hernia",)), **common)
    result = CliRunner().invoke(cli, ["build-records", "--csv", SAMPLE_64_CSV, "--images", IMAGES, "--out",
                                      str(tmp_path / "d"), "--augment", "dadam"])
    assert result.exit_code != 0 and "needs --boxes" in result.output
