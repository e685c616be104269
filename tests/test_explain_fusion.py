"""Grad-CAM fused with a U-Net lung mask: the fusion rule, and gradcam / localize with --mask-model (lambda 0 is
Grad-CAM, lambda 1 the mask, scored beside the random baseline)."""

import json
import os
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from cxrkeras.errors import ConfigError
from cxrkeras.explain.fusion import fuse, unit_max

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data")
SAMPLE_BOXES = os.path.abspath(os.path.join(SAMPLE, "BBox_List_2017.csv"))


def test_fusion_rule():
    rng = np.random.default_rng(0)
    g, m = rng.random((12, 10)) * 0.7, rng.random((12, 10)) * 3
    np.testing.assert_allclose(fuse(g, m, 0.0), g / g.max(), rtol=1e-6)
    np.testing.assert_allclose(fuse(g, m, 1.0), m / m.max(), rtol=1e-6)
    np.testing.assert_allclose(fuse(g, m, 0.25), 0.25 * m / m.max() + 0.75 * g / g.max(), rtol=1e-6)
    assert fuse(g, m, 0.5).max() <= 1.0 and unit_max(np.zeros((2, 2))).max() == 0.0
    smooth = fuse(g, m, 1.0, sigma=2.0)
    assert smooth.std() < fuse(g, m, 1.0).std()  # smoothing the mask removes its pixel noise
    with pytest.raises(ConfigError, match="one frame"):
        fuse(g, m[:5], 0.5)
    with pytest.raises(ConfigError, match=r"--fusion-lambda must be in \[0, 1\]"):
        fuse(g, m, 1.5)


@pytest.mark.timeout(300)  # may train the session's U-Net
def test_localize_scores_gradcam_mask_and_fusion(thin_model, trained_unet):
    from cxrkeras.explain.localize import format_table, localize
    from cxrkeras.runs import load_keras_model
    from cxrkeras.segmentation.segment import MaskModel

    model, unet = load_keras_model(thin_model), MaskModel(trained_unet["out"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at0 = localize(model, SAMPLE_BOXES, SAMPLE, seed=1, random_draws=2, mask_model=unet, fusion_lambda=0.0)
        at1 = localize(model, SAMPLE_BOXES, SAMPLE, seed=1, random_draws=2, mask_model=unet, fusion_lambda=1.0)
    assert at0["overall"]["cases"] == 17
    for row in at0["rows"]:  # lambda 0: the fused map is Grad-CAM
        assert (row["fused_hit"], row["fused_iou"]) == (row["hit"], pytest.approx(row["iou"], abs=1e-6))
    for row in at1["rows"]:  # lambda 1: the fused map is the mask
        assert (row["fused_hit"], row["fused_iou"]) == (row["mask_hit"], pytest.approx(row["mask_iou"], abs=1e-6))
    assert at0["overall"]["mask_iou"] == pytest.approx(at1["overall"]["mask_iou"])
    assert any(r["mask_iou"] != r["iou"] for r in at0["rows"])  # the two maps differ
    table = format_table(at1)
    assert "lung mask" in table and "fused (lambda 1)" in table and "random" in table
    assert at1["settings"]["fusion_lambda"] == 1.0 and at1["settings"]["mask_model"].endswith("unet.keras")


@pytest.mark.timeout(300)
def test_cli_gradcam_with_a_mask_model(thin_model, trained_unet, tmp_path):
    from cxrkeras.cli import cli

    png = os.path.join(SAMPLE, "nih-512px", "images", "00009745_000.png")
    res = CliRunner().invoke(cli, ["gradcam", "--model", thin_model, png, "--top-k", "1", "--out", str(tmp_path),
                                   "--mask-model", trained_unet["out"], "--fusion-lambda", "0"])
    assert res.exit_code == 0, res.output
    entry = json.load(open(tmp_path / "gradcam.json"))["overlays"][0]
    assert os.path.isfile(entry["fused_overlay"]) and entry["fused_peak_row_col"] == entry["peak_row_col"]
    res = CliRunner().invoke(cli, ["localize", "--model", thin_model, "--boxes", SAMPLE_BOXES, "--images",
                                   os.path.join(SAMPLE, "nih-512px"), "--mask-model", trained_unet["out"],
                                   "--fusion-lambda", "0.5", "--fusion-sigma", "2"])
    assert res.exit_code == 0, res.output
    assert "lung mask" in res.output and "fused (lambda 0.5)" in res.output
    res = CliRunner().invoke(cli, ["gradcam", "--model", thin_model, png, "--out", str(tmp_path),
                                   "--mask-model", thin_model])
    assert res.exit_code != 0 and "not a cxrkeras U-Net" in res.output and "Traceback" not in res.output
