"""Hybrid features: HOG/LBP dimensions as documented, classifiers chosen on val, and `cxrkeras hybrid` beating
chance where texture decides the label, beside the CNN alone."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from hybrid_helpers import texture_image, write_run, write_texture_records

from cxrkeras.errors import ConfigError
from cxrkeras.hybrid.classify import fit_per_label, predict
from cxrkeras.hybrid.texture import TextureParams, texture_features


@pytest.mark.parametrize("kw, hog_dim", [(dict(), 9 * 4 * 7 * 7), (dict(size=48, pixels_per_cell=6, cells_per_block=3,
                                                                       orientations=12), 12 * 9 * 6 * 6),
                                         (dict(size=32, cells_per_block=1, lbp_points=16, lbp_radius=2), 9 * 16)])
def test_documented_dimensions(kw, hog_dim):
    from skimage.feature import hog

    params = TextureParams(**kw)
    image = texture_image(np.random.default_rng(0), True, size=params.size)
    feats = texture_features(image, params)
    assert params.hog_dim == hog_dim and params.lbp_dim == params.lbp_points + 2
    assert feats.shape == (hog_dim + params.lbp_dim,)
    reference = hog(image.astype(float), orientations=params.orientations,
                    pixels_per_cell=(params.pixels_per_cell,) * 2, cells_per_block=(params.cells_per_block,) * 2)
    np.testing.assert_allclose(feats[:hog_dim], reference, rtol=1e-5, atol=1e-6)
    assert feats[hog_dim:].sum() == pytest.approx(1.0) and (feats[hog_dim:] >= 0).all()  # an LBP histogram


def test_lbp_of_a_flat_image_is_one_pattern_and_bad_params():
    params = TextureParams(size=16)
    hist = texture_features(np.full((16, 16), 100, np.uint8), params)[params.hog_dim:]
    # every inner pixel has the same (uniform) pattern; scikit-image gives the border's neighbours outside the
    # image the value 0, so the 1-px border has another one
    assert hist.max() == pytest.approx(14 * 14 / 256) and hist.sum() == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="fewer than cells_per_block"):
        TextureParams(size=16, pixels_per_cell=8, cells_per_block=3)
    with pytest.raises(ConfigError, match=r"lbp_points must be an integer in \[4, 32\]"):
        TextureParams(lbp_points=2)
    with pytest.raises(ValueError, match="needs a 16x16 image"):
        texture_features(np.zeros((8, 8)), params)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_classifier_chosen_on_val_beats_chance(kind):
    rng = np.random.default_rng(0)
    params = TextureParams(size=32)

    def split(n):
        y = (np.arange(n) % 2 == 0).astype(float)
        x = np.stack([texture_features(texture_image(rng, bool(v), size=32), params) for v in y])
        return x, np.stack([y, np.zeros(n)], axis=1)  # a second label with no positives

    (xt, yt), (xv, yv), (xs, ys) = split(30), split(12), split(20)
    fitted = fit_per_label(xt, yt, xv, yv, ["Stripes", "Empty"], kind)
    assert fitted[0]["val_auc"] is not None and fitted[0]["params"] is not None
    assert fitted[1]["estimator"] is None and "single-class in train" in fitted[1]["note"]
    from sklearn.metrics import roc_auc_score

    probs = predict(fitted, xs)
    assert roc_auc_score(ys[:, 0], probs[:, 0]) > 0.9 and (probs[:, 1] == 0).all()


@pytest.fixture(scope="module")
def texture_run(tmp_path_factory):
    from cxrkeras.models import build_model

    root = str(tmp_path_factory.mktemp("texture"))
    records = write_texture_records(root, 60)
    model = build_model("vgg16-plain", num_classes=1, label_names=["Stripes"], input_shape=(32, 32, 3),
                        width_multiplier=0.125)
    return write_run(root, records, model)


@pytest.mark.timeout(300)
def test_hybrid_on_a_texture_task_beats_chance(texture_run, tmp_path):
    from cxrkeras.cli import cli

    res = CliRunner().invoke(cli, ["hybrid", "--run", texture_run, "--out", str(tmp_path), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    result = json.load(open(tmp_path / "hybrid.json"))
    assert result["settings"]["hog_dim"] == 1764 and result["settings"]["lbp_dim"] == 10
    assert result["settings"]["cnn_dim"] == 64 and result["n_test"] == 18  # 64 channels of thin VGG16's pool
    assert result["sets"]["hybrid"]["dims"] == 1764 + 10 + 64 and result["sets"]["texture"]["dims"] == 1774
    texture = result["sets"]["texture"]["auc"]["per_label"]["Stripes"]
    assert texture["auc"] > 0.9 and texture["ci_low"] > 0.5  # texture decides the label
    assert result["sets"]["hybrid"]["auc"]["mean"]["auc"] > 0.9
    assert set(result["sets"]) == {"texture", "hybrid", "cnn"}
    assert "HOG+LBP+CNN" in res.output and "CNN alone" in res.output and "Hamming loss" in res.output
    assert os.path.isfile(tmp_path / "hybrid.md")
    # paired with the CNN alone as `cxrkeras compare` pairs two runs: each side's AUC is its set's
    paired = json.load(open(tmp_path / "comparisons" / "texture-vs-cnn" / "compare.json"))
    entry, cnn = paired["per_label"]["Stripes"], result["sets"]["cnn"]["auc"]["per_label"]["Stripes"]
    assert entry["auc_a"] == pytest.approx(texture["auc"], abs=1e-12)
    assert entry["auc_b"] == pytest.approx(cnn["auc"], abs=1e-12)
    assert entry["delta"] == pytest.approx(texture["auc"] - cnn["auc"], abs=1e-12) and entry["delong_p"] is not None
    assert result["comparisons"]["hybrid"]["mean"]["auc_a"] == pytest.approx(
        result["sets"]["hybrid"]["auc"]["mean"]["auc"], abs=1e-9)
    assert "HOG+LBP vs CNN alone: mean ΔAUC" in res.output
    res = CliRunner().invoke(cli, ["hybrid", "--run", texture_run, "--out", str(tmp_path), "--hog-cell", "64"])
    assert res.exit_code != 0 and "fewer than cells_per_block" in res.output and "Traceback" not in res.output
