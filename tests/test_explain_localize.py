"""Localisation score (known answers on synthetic boxes, the pipeline on the bundled boxes) and the explain CLI."""

import csv
import json
import os
import warnings

import numpy as np
import pytest
from evalexport_helpers import write_dicom

from cxrkeras.data.boxes import box_mask, read_boxes
from cxrkeras.explain.localize import format_table, score_map
from cxrkeras.explain.overlay import to_original_frame

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data")
SAMPLE_BOXES = os.path.abspath(os.path.join(SAMPLE, "BBox_List_2017.csv"))


def test_box_mask_scales_the_1024_frame():
    mask = box_mask([(512, 256, 256, 128)], 64, 64)  # in a 64 px image: x 32..48, y 16..24
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 23, 32, 47)
    rows, cols = np.nonzero(box_mask([(0, 0, 512, 128)], 512, 256))  # non-square: each axis scaled on its own
    assert (rows.max(), cols.max()) == (63, 127)
    assert box_mask([(1000, 1000, 0.5, 0.5)], 64, 64).sum() == 1  # a sub-pixel box still covers a pixel


def test_score_known_answers():
    mask = box_mask([(256, 256, 256, 256)], 64, 64)
    assert score_map(mask.astype(float), mask) == (True, 1.0)  # heatmap exactly the box
    elsewhere = np.roll(mask, 32, axis=1).astype(float)
    assert score_map(elsewhere, mask) == (False, 0.0)
    half = np.zeros((64, 64))
    half[16:32, 16:24] = 1.0  # the left half of the box
    hit, iou = score_map(half, mask)
    assert hit and iou == pytest.approx(0.5)
    graded = half * 0.4
    graded[40, 40] = 1.0  # the peak is outside, weaker values inside: a miss, and 0.5 x max leaves one pixel
    assert score_map(graded, mask, threshold=0.5) == (False, 0.0)
    assert score_map(graded, mask, threshold=0.3)[1] == pytest.approx(128 / (256 + 1))
    assert score_map(np.zeros((64, 64)), mask) == (False, 0.0)  # no evidence: never a hit, never NaN
    # a 2x2 map upsampled into the frame of a 40x80 image whose central 40x40 square the model saw
    heat = to_original_frame(np.array([[0.0, 0.0], [0.0, 1.0]]), 40, 80, region=(0, 20, 40, 40))
    assert heat.shape == (40, 80) and not heat[:, :20].any() and not heat[:, 60:].any()
    assert np.unravel_index(heat.argmax(), heat.shape) == (30, 50)  # bilinear: flat beyond the last cell centre
    assert (heat[30:, 50:60] == 1.0).all() and heat[29, 50] < 1.0


def test_read_boxes_aliases_and_bad_rows(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "a.png,Infiltrate,1,2,3,4\n"
                    "b.png,Mass,1,2,x,4\n"
                    "c.png,Mass,1,2,0,4\n"
                    "d.png,Mass,1,2\n"
                    "\n")
    boxes, bad = read_boxes(str(path))
    assert boxes == [dict(image="a.png", label="Infiltration", box=(1.0, 2.0, 3.0, 4.0), row=2)]
    assert [b.split(": ")[0] for b in bad] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    wrong = tmp_path / "labels.csv"
    wrong.write_text("Image Index2,Finding Labels\n")
    from cxrkeras.errors import DataError

    with pytest.raises(DataError, match="NIH's header"):
        read_boxes(str(wrong))


def test_localize_on_the_bundled_boxes(thin_model, tmp_path):
    from cxrkeras.explain.localize import localize, write_result

    boxes = tmp_path / "boxes.csv"
    with open(SAMPLE_BOXES) as f:
        text = f.read()
    boxes.write_text(text + "99999999_000.png,Mass,1,2,3,4\n00009745_000.png,Lung,1,2,3,4\nzz.png,Mass,1\n")
    from cxrkeras.runs import load_keras_model

    model = load_keras_model(thin_model)  # one object for the three calls: one traced graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = localize(model, str(boxes), SAMPLE, threshold=0.5, seed=3, random_draws=4)
    # the 17 sample boxes lie in two folders (64 px and 512 px images): found recursively, each in its own scale
    # (an image in both, e.g. 00009745_000, is read from the first in sorted order, nih-512px)
    assert result["images_scored"] == 17 and len(result["rows"]) == 17
    assert result["not_found"] == ["99999999_000.png"] and len(result["unknown_label"]) == 1
    assert len(result["bad_rows"]) == 1 and result["overall"]["cases"] == 17
    sizes = {r["image"]: (r["height"], r["width"]) for r in result["rows"]}
    assert sizes["00009745_000.png"] == (512, 512) and sizes["00000149_006.png"] == (64, 64)
    cardio = next(r for r in result["rows"] if r["image"] == "00009745_000.png")
    assert cardio["box_fraction"] == pytest.approx(456.19 * 382.51 / 1024 ** 2, rel=0.02)
    assert set(result["per_label"]) == {"Atelectasis", "Cardiomegaly", "Infiltration", "Mass", "Nodule",
                                        "Pneumonia"}
    for row in result["rows"]:
        assert row["hit"] in (0, 1) and 0.0 <= row["iou"] <= 1.0 and 0.0 <= row["random_iou"] <= 1.0
    # seeded: the same seed gives the same baseline, another seed another one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = localize(model, SAMPLE_BOXES, SAMPLE, seed=3, random_draws=4)
        other = localize(model, SAMPLE_BOXES, SAMPLE, seed=4, random_draws=4)
    assert again["overall"] == pytest.approx(result["overall"], abs=1e-6)
    assert other["overall"]["random_iou"] != result["overall"]["random_iou"]
    table = format_table(result)
    assert "overall" in table and "1 not found" in table
    json_path, csv_path = write_result(result, str(tmp_path / "out"))
    assert json.load(open(json_path))["overall"]["cases"] == 17
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == 17


def test_boxes_of_any_label_count_for_an_any_finding_model(tmp_path):
    """A binary model (--labels Finding) is scored on every box, each for its one output; a model with other labels
    only on boxes of its own labels."""
    from evalexport_helpers import tiny_model

    from cxrkeras.explain.localize import box_class, localize
    from cxrkeras.labels import NIH_LABELS

    assert box_class("Mass", NIH_LABELS) == "Mass" and box_class("Atelectasis", ["Finding"]) == "Finding"
    assert box_class("Atelectasis", ["Effusion"]) is None and box_class("Lung", ["Finding"]) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = localize(tiny_model(64, labels=["Finding"]), SAMPLE_BOXES, SAMPLE, seed=0, random_draws=2,
                          log=lambda *_: None)
    assert result["overall"]["cases"] == 17 and list(result["per_label"]) == ["Finding"]
    assert result["unknown_label"] == [] and {r["label"] for r in result["rows"]} == {"Finding"}


def test_localize_known_answer_through_the_whole_pipeline(thin_model, tmp_path, monkeypatch):
    """Images bright exactly inside their box and a stand-in engine whose 'heatmap' is the model input itself:
    the 1024-frame boxes, the image sizes and the heatmap upsampling must line up (hit 1, IoU ~1); inverted, 0."""
    from PIL import Image

    import cxrkeras.explain.engine as engine_lib
    from cxrkeras.explain.localize import localize

    boxes = {"a.png": (512, (200.0, 300.0, 400.0, 260.0)), "b.png": (128, (600.0, 100.0, 256.0, 512.0))}
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for name, (size, (x, y, w, h)) in boxes.items():
        arr = np.zeros((size, size), np.uint8)
        f = size / 1024
        arr[round(y * f):round((y + h) * f), round(x * f):round((x + w) * f)] = 255
        Image.fromarray(arr).save(tmp_path / "imgs" / "sub" / name)
        lines.append(f"{name},Mass,{x},{y},{w},{h}")
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")

    class InputAsHeatmap:
        layer_name = "input"
        invert = False

        def __call__(self, x, classes, batch_size=8):
            img = x[..., 0] - x[..., 0].min(axis=(1, 2), keepdims=True)
            img = img / img.max(axis=(1, 2), keepdims=True)
            img = 1.0 - img if self.invert else img
            return np.repeat(img[:, None], len(classes), axis=1), np.full((len(x), 14), 0.5)

    engine = InputAsHeatmap()
    monkeypatch.setattr(engine_lib, "get_engine", lambda *args, **kwargs: engine)
    result = localize(thin_model, str(tmp_path / "boxes.csv"), str(tmp_path / "imgs"), random_draws=2)
    assert result["images_scored"] == 2 and result["overall"]["pointing"] == 1.0
    assert result["overall"]["iou"] > 0.95, result["rows"]
    engine.invert = True
    result = localize(thin_model, str(tmp_path / "boxes.csv"), str(tmp_path / "imgs"), random_draws=2)
    assert result["overall"]["pointing"] == 0.0 and result["overall"]["iou"] < 0.05


def test_cli_gradcam_png_and_dicom(thin_model, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from cxrkeras.cli import cli

    png = os.path.join(SAMPLE, "nih-512px", "images", "00009745_000.png")
    gray = np.asarray(Image.open(png).convert("L"), dtype=np.uint16)
    dcm = write_dicom(str(tmp_path / "wide.dcm"), (gray[128:384, :] * 16))  # 256 x 512, 12 bit
    out = tmp_path / "cams"
    runner = CliRunner()
    res = runner.invoke(cli, ["gradcam", "--model", thin_model, png, dcm, "--top-k", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.load(open(out / "gradcam.json"))
    assert summary["layer"] == "lka_after" and len(summary["overlays"]) == 4
    probs = [e["probability"] for e in summary["overlays"] if e["image"] == png]
    assert probs == sorted(probs, reverse=True)
    wide = Image.open(next(e["overlay"] for e in summary["overlays"] if e["image"] == dcm))
    assert wide.width > 1.6 * wide.height  # the DICOM's 2:1 aspect is kept (plus title band and colour bar)

    res = runner.invoke(cli, ["gradcam", "--model", thin_model, png, "--class", "Infiltrate", "--out", str(out),
                              "--method", "gradcam++"])
    assert res.exit_code == 0, res.output
    assert (out / "00009745_000_1_Infiltration.png").is_file()
    res = runner.invoke(cli, ["gradcam", "--model", thin_model, png, "--class", "Lung", "--out", str(out)])
    assert res.exit_code != 0 and "not one of the model's labels" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["gradcam", "--model", thin_model, png, "--layer", "predictions", "--out", str(out)])
    assert res.exit_code != 0 and "no spatial dimensions" in res.output and "lka_after" in res.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = runner.invoke(cli, ["gradcam", "--model", thin_model, str(bad), "--out", str(out)])
    assert res.exit_code != 0 and "bad.png" in res.output


def test_cli_localize(thin_model, tmp_path):
    from click.testing import CliRunner

    from cxrkeras.cli import cli

    res = CliRunner().invoke(cli, ["localize", "--model", thin_model, "--boxes", SAMPLE_BOXES, "--images",
                                   os.path.join(SAMPLE, "nih-512px"), "--out", str(tmp_path), "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "pointing" in res.output and "overall" in res.output and "9 not found" in res.output
    assert json.load(open(tmp_path / "localization.json"))["images_scored"] == 8
