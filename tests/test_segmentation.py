"""U-Net lung segmentation: pairs and their bad inputs, Dice/IoU against scikit-learn, learning a synthetic shape
(held-out Dice > 0.9), the patient-wise split, `segment` on files and the commands."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from segmentation_helpers import write_shapes

from cxrkeras.cli import cli
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.segmentation.metrics import dice_iou
from cxrkeras.segmentation.pairs import find_pairs, read_pair
from cxrkeras.segmentation.train import SegmentationConfig, train_segmentation

@pytest.fixture(scope="module")
def trained(trained_unet):
    return trained_unet


@pytest.mark.timeout(300)  # the session's U-Net is trained in its setup
def test_unet_learns_a_synthetic_shape(trained):
    splits = trained["metrics"]["splits"]
    assert splits["train"]["n"] + splits["val"]["n"] + splits["test"]["n"] == 48 and splits["test"]["n"] >= 5
    assert splits["test"]["dice_mean"] > 0.9 and splits["val"]["dice_mean"] > 0.9  # held-out images
    assert splits["test"]["iou_mean"] > 0.8
    saved = json.load(open(os.path.join(trained["out"], "metrics.json")))
    assert saved["splits"]["test"]["n"] == splits["test"]["n"] and saved["preprocessor"]["image_size"] == 32
    table = pd.read_csv(os.path.join(trained["out"], "split.csv"))
    assert sorted(table["split"].unique()) == ["test", "train", "val"] and len(table) == 48


def test_segment_writes_masks_at_the_image_size_and_they_match(trained, tmp_path):
    from cxrkeras.segmentation.segment import segment_files

    names = pd.read_csv(os.path.join(trained["out"], "split.csv")).query("split == 'test'")["image"].tolist()
    paths = [os.path.join(trained["images"], f"{n}.png") for n in names]
    entries = segment_files(trained["out"], paths, str(tmp_path), log=lambda *_: None)
    assert len(entries) == len(paths)
    pred = np.stack([np.asarray(Image.open(e["mask"])) > 0 for e in entries])
    truth = np.stack([np.asarray(Image.open(os.path.join(trained["masks"], f"{n}.png"))) > 0 for n in names])
    assert pred.shape == truth.shape and set(np.unique(np.asarray(Image.open(entries[0]["mask"])))) <= {0, 255}
    assert dice_iou(pred, truth)[0].mean() > 0.9
    assert Image.open(entries[0]["overlay"]).mode == "RGB"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png") as err:
        segment_files(trained["out"], [paths[0], str(bad)], str(tmp_path / "again"), log=lambda *_: None)
    assert "the others were written" in str(err.value) and len(os.listdir(tmp_path / "again")) == 3


def test_dice_and_iou_against_scikit_learn():
    from sklearn.metrics import f1_score, jaccard_score

    rng = np.random.default_rng(0)
    pred, truth = rng.random((5, 9, 7)) > 0.6, rng.random((5, 9, 7)) > 0.5
    dice, iou = dice_iou(pred, truth)
    for i in range(5):
        assert dice[i] == pytest.approx(f1_score(truth[i].ravel(), pred[i].ravel()))
        assert iou[i] == pytest.approx(jaccard_score(truth[i].ravel(), pred[i].ravel()))
    empty = np.zeros((1, 4, 4), bool)
    assert dice_iou(empty, empty) == (pytest.approx([1.0]), pytest.approx([1.0]))


def _pairs(tmp_path, n=3, **kw):
    return write_shapes(str(tmp_path), n, size=16, **kw)


def test_every_bad_input_is_named(tmp_path):
    images, masks = _pairs(tmp_path / "a")
    os.remove(os.path.join(masks, "img001.png"))
    with pytest.raises(DataError, match=r"1 image\(s\) without a mask in .*: img001.png"):
        find_pairs(images, masks)
    images, masks = _pairs(tmp_path / "b")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(os.path.join(masks, "extra.png"))
    with pytest.raises(DataError, match=r"1 mask\(s\) without an image .*: extra.png"):
        find_pairs(images, masks)
    images, masks = _pairs(tmp_path / "c")
    Image.fromarray(np.zeros((20, 16), np.uint8)).save(os.path.join(masks, "img002.png"))
    pairs = find_pairs(images, masks)
    with pytest.raises(DataError, match=r"img002: mask .*img002.png is 16x20 but image .*img002.png is 16x16"):
        read_pair(*pairs[2], 16)
    grey = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    Image.fromarray(grey).save(os.path.join(masks, "img001.png"))
    with pytest.raises(DataError, match=r"mask .*img001.png: 16 distinct grey values .* must be binary"):
        read_pair(*pairs[1], 16)
    open(os.path.join(masks, "img000.png"), "wb").close()
    with pytest.raises(DataError, match=r"mask .*img000.png: empty file"):
        read_pair(*pairs[0], 16)


def test_mask_names_binarised_and_resized_with_the_image(tmp_path):
    images, masks = _pairs(tmp_path, suffix="_mask")  # Shenzhen's NAME_mask.png
    pairs = find_pairs(images, masks)
    assert [p[0] for p in pairs] == ["img000", "img001", "img002"] and pairs[0][2].endswith("img000_mask.png")
    Image.fromarray(np.where(np.asarray(Image.open(pairs[0][2])) > 0, 1, 0).astype(np.uint8)).save(pairs[0][2])
    image, mask = read_pair(*pairs[0], 8)  # values 0/1 are binary too; resized 16 -> 8 with the image
    assert image.shape == mask.shape == (8, 8) and set(np.unique(mask)) <= {0.0, 1.0} and mask.any()


def test_patient_wise_split_and_its_errors(tmp_path):
    from cxrkeras.segmentation.train import load_pairs

    images, masks = _pairs(tmp_path, n=20)
    csv = tmp_path / "patients.csv"
    pd.DataFrame({"Image Index": [f"img{i:03d}.png" for i in range(20)],
                  "Patient ID": [f"p{i // 4}" for i in range(20)]}).to_csv(csv, index=False)
    config = SegmentationConfig(images=images, masks=masks, image_size=16, patient_csv=str(csv)).check()
    names, _, _, split = load_pairs(config, log=lambda *_: None)
    by_patient = pd.DataFrame({"p": [f"p{int(n[3:]) // 4}" for n in names], "s": split}).groupby("p")["s"]
    assert (by_patient.nunique() == 1).all() and len(set(split)) == 3
    pd.DataFrame({"Image Index": ["img000.png"], "Patient ID": ["p0"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"no patient for 19 image\(s\), e.g. img001"):
        load_pairs(config, log=lambda *_: None)
    with pytest.raises(ConfigError, match="multiple of 2\\*\\*depth"):
        train_segmentation(SegmentationConfig(images=images, masks=masks, image_size=24, depth=4))


def test_cli_train_segmentation_error_and_segment(trained, tmp_path):
    images, masks = _pairs(tmp_path)
    os.remove(os.path.join(masks, "img000.png"))
    res = CliRunner().invoke(cli, ["train-segmentation", "--images", images, "--masks", masks, "--out",
                                   str(tmp_path / "o"), "--image-size", "16", "--depth", "2", "--epochs", "1"])
    assert res.exit_code != 0 and "img000.png" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["segment", "--model", trained["out"], "--out", str(tmp_path / "seg"),
                                   os.path.join(trained["images"], "img000.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "seg" / "img000_mask.png").is_file() and (tmp_path / "seg" / "img000_overlay.png").is_file()
