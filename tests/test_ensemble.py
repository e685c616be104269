"""`cxrkeras ensemble`: the averaged probabilities through evaluate and through the exported SavedModel in a fresh
process equal the mean of the members' (<= 1e-6); weights; members that differ are refused, naming what differs."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from evalexport_helpers import tiny_model

from cxrkeras.errors import ConfigError, CxrError


def _preprocessor(records, size=32):
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.data.preprocessor import Preprocessor

    return Preprocessor.for_records(load_manifest(records), size, "torch", None).to_config()


@pytest.fixture(scope="module")
def members(tiny_records, tmp_path_factory):
    """Two .keras members on the tiny records: the linear tiny model, and a thin DenseNet-LKA with the FPSM head."""
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.models import build_model

    root = tmp_path_factory.mktemp("ensemble")
    labels = list(load_manifest(tiny_records)["labels"])
    a = tiny_model(labels=labels, seed=1, preprocessor=_preprocessor(tiny_records))
    b = build_model("densenet121-lka-last2", num_classes=len(labels), label_names=labels, input_shape=(32, 32, 3),
                    blocks=[1, 1, 1, 1], width_multiplier=0.25, head="fpsm", head_stages="4+3+2",
                    preprocessor=_preprocessor(tiny_records))
    rng = np.random.default_rng(2)  # spread the random FPSM model's outputs so its predictions differ from 0.5
    b.get_layer("predictions").set_weights([w * 30 if w.ndim == 2 else w + rng.normal(0, 0.5, w.shape)
                                            for w in b.get_layer("predictions").get_weights()])
    paths = [str(root / "a.keras"), str(root / "b.keras")]
    a.save(paths[0])
    b.save(paths[1])
    return {"paths": paths, "models": [a, b], "root": root, "records": tiny_records}


def _member_probs(paths, records, split):
    from cxrkeras.evaluation.evaluate import predict_split
    from cxrkeras.runs import load_source

    return [predict_split(load_source(p), records, split)[0] for p in paths]


@pytest.fixture(scope="module")
def member_test_probs(members):
    """Each member's probabilities on the test split (predict_split), for the tests that compare with them."""
    return _member_probs(members["paths"], members["records"], "test")


def _csv_probs(path):
    frame = pd.read_csv(path)
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy(dtype=np.float64)


@pytest.fixture(scope="module")
def exported(built, members):
    """The ensemble folder (as --run) exported once, its fresh-process verification included."""
    from cxrkeras.export.savedmodel import export

    return export(built["out"], str(members["root"] / "exports" / "ens"), log=lambda *_: None)


@pytest.fixture(scope="module")
def built(members):
    from cxrkeras.cli import cli

    out = str(members["root"] / "ens")
    result = CliRunner().invoke(cli, ["ensemble", *members["paths"], "--records", members["records"], "--weights",
                                      "equal", "--out", out, "--n-boot", "20", "--no-figures"])
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output}


@pytest.mark.timeout(300)
def test_ensemble_through_evaluate_is_the_mean_of_its_members(members, built, member_test_probs):
    out = built["out"]
    p_a, p_b = member_test_probs
    assert np.abs(p_a - p_b).max() > 0.05  # two different models
    ens = _csv_probs(os.path.join(out, "evaluation", "test", "predictions_test.csv"))
    assert np.abs(ens - (p_a + p_b) / 2).max() <= 1e-6
    metrics = json.load(open(os.path.join(out, "evaluation", "test", "metrics.json")))
    assert metrics["variant"] == "ensemble" and metrics["auc"]["mean"]["ci_low"] is not None  # evaluate's CIs
    info = json.load(open(os.path.join(out, "ensemble.json")))
    assert info["weights"] == [0.5, 0.5] and [m["member"] for m in info["members"]] == members["paths"]
    assert "| **ensemble** |" in built["output"] and "test mean AUC (95% CI)" in built["output"]


@pytest.mark.timeout(300)
def test_ensemble_is_compared_with_its_best_member_by_validation_auc(members, built, tmp_path):
    """compare.json beside the ensemble: B is the member with the best validation mean AUC, and each side's
    per-label AUC is scikit-learn's on the predictions. (The tiny records' val split has no label with both
    classes: the test split stands in for validation and the train split is scored; without any validation AUC
    there is no comparison, and one split for both is refused.)"""
    from sklearn.metrics import roc_auc_score

    from cxrkeras.cli import cli

    assert not os.path.exists(os.path.join(built["out"], "comparisons"))  # no val AUC: no "best" member
    out = str(tmp_path / "ens")
    args = ["ensemble", *members["paths"], "--records", members["records"], "--out", out, "--n-boot", "20",
            "--no-figures", "--val-split", "test"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "both 'test'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, args + ["--split", "train"])
    assert res.exit_code == 0, res.output
    info = json.load(open(os.path.join(out, "ensemble.json")))
    best = max(range(2), key=lambda i: info["members"][i]["test_mean_auc"])
    result = json.load(open(os.path.join(out, "comparisons", "best-member-train", "compare.json")))
    assert result["b"]["member"] == members["paths"][best] and result["a"]["name"] == "ensemble"
    frame = pd.read_csv(os.path.join(out, "evaluation", "train", "predictions_train.csv"))
    p_best = _member_probs([members["paths"][best]], members["records"], "train")[0]
    labels = [c[len("true_"):] for c in frame.columns if c.startswith("true_")]
    checked = 0
    for k, label in enumerate(labels):
        entry = result["per_label"][label]
        if entry.get("auc_a") is None:
            continue
        y = frame[f"true_{label}"]
        assert entry["auc_a"] == pytest.approx(roc_auc_score(y, frame[f"prob_{label}"]), abs=1e-9)
        assert entry["auc_b"] == pytest.approx(roc_auc_score(y, p_best[:, k]), abs=1e-6)
        checked += 1
    assert checked >= 1 and "its best member" in res.output


@pytest.mark.timeout(300)
def test_exported_ensemble_is_the_mean_of_its_members_in_a_fresh_process(members, exported, tmp_path):
    result = exported
    assert result["thresholds_info"]["source"] == "evaluation"  # the ensemble's own evaluation, found by sha256
    assert result["verification"]["max_abs_diff_images"] <= 1e-5
    x = np.random.default_rng(5).normal(size=(6, 32, 32, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, tensorflow as tf\n"
              "m = tf.saved_model.load(sys.argv[1])\n"
              "out = m.signatures['predict_images'](images=tf.constant(np.load(sys.argv[2])))\n"
              "np.save(sys.argv[3], out['probabilities'].numpy())\n")
    proc = subprocess.run([sys.executable, "-c", script, result["path"], str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = np.load(tmp_path / "y.npy")
    a, b = (np.asarray(m(x, training=False), dtype=np.float64) for m in members["models"])
    assert np.abs(served - (a + b) / 2).max() <= 1e-6


def test_weights_val_auc_and_given(members, member_test_probs, tmp_path):
    from sklearn.metrics import roc_auc_score

    from cxrkeras.evaluation.ensemble import ensemble

    res = ensemble(members["paths"], str(tmp_path / "w"), members["records"], weights="3,1", n_boot=0,
                   figures_on=False, log=lambda *_: None)
    p_a, p_b = member_test_probs
    ens = _csv_probs(os.path.join(tmp_path, "w", "evaluation", "test", "predictions_test.csv"))
    assert np.abs(ens - (0.75 * p_a + 0.25 * p_b)).max() <= 1e-6
    assert [m["weight"] for m in res["members"]] == [0.75, 0.25]
    with pytest.raises(CxrError, match="at least 5 patients"):  # the tiny val split: no estimable label
        ensemble(members["paths"], str(tmp_path / "v"), members["records"], n_boot=0, figures_on=False,
                 log=lambda *_: None)
    res = ensemble(members["paths"], str(tmp_path / "v"), members["records"], n_boot=0, figures_on=False,
                   log=lambda *_: None, min_patients=1)  # val-auc: proportional to each member's mean val AUC
    from cxrkeras.evaluation.evaluate import predict_split
    from cxrkeras.runs import load_source

    aucs = []
    for path in members["paths"]:
        probs, y, _, _ = predict_split(load_source(path), members["records"], "val")
        aucs.append(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in range(y.shape[1])
                             if 0 < y[:, j].sum() < len(y)]))
    np.testing.assert_allclose([m["weight"] for m in res["members"]], np.array(aucs) / sum(aucs), atol=1e-9)


def test_members_that_differ_are_refused_naming_the_difference(members, tmp_path):
    from cxrkeras.evaluation.ensemble import ensemble

    other = tiny_model(labels=["Effusion", "Atelectasis"], preprocessor=_preprocessor(members["records"]))
    other.save(str(tmp_path / "labels.keras"))
    bigger = tiny_model(size=48, preprocessor=_preprocessor(members["records"], 48))
    bigger.save(str(tmp_path / "size.keras"))
    quiet = dict(n_boot=0, figures_on=False, log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"labels.keras differs from .*a.keras: labels"):
        ensemble([members["paths"][0], str(tmp_path / "labels.keras")], str(tmp_path / "x"), members["records"],
                 **quiet)
    with pytest.raises(ConfigError, match=r"input size 48 vs 32"):
        ensemble([members["paths"][0], str(tmp_path / "size.keras")], str(tmp_path / "x"), members["records"],
                 **quiet)
    with pytest.raises(ConfigError, match="one weight per member"):
        ensemble(members["paths"], str(tmp_path / "x"), members["records"], weights="1,2,3", **quiet)
    with pytest.raises(ConfigError, match="2 to"):
        ensemble(members["paths"][:1], str(tmp_path / "x"), members["records"], **quiet)


def test_gradcam_refuses_an_ensemble_and_model_info_reads_it(built):
    from cxrkeras.explain.engine import get_engine
    from cxrkeras.models import keras_file_info, model_info
    from cxrkeras.runs import load_source

    source = load_source(built["out"])  # the ensemble folder, as --run
    info = model_info(source.model)
    assert info["variant"] == "ensemble" and info["build_args"]["weighting"] == "equal"
    assert keras_file_info(os.path.join(built["out"], "ensemble.keras"))["variant"] == "ensemble"  # not a member's
    with pytest.raises(ConfigError, match="is an ensemble"):
        get_engine(source.model)


@pytest.mark.timeout(420)
def test_serve_an_ensemble_run_and_its_export_equal_the_mean_of_its_members(members, built, exported, tmp_path):
    """`cxrkeras serve` of the ensemble folder (in process) and of its exported SavedModel (its own server process)
    answers the mean of the members' probabilities on the same uploads (<= 1e-6), and says why it has no heatmaps."""
    from serve_helpers import instances, read_sample, running_server

    from cxrkeras.export.predict import load_predictor
    from cxrkeras.serve.backend import Backend

    blobs = [read_sample(name) for name in ("00000100_000.png", "00001369_000.png")]
    member_probs = [np.asarray(load_predictor(p, lambda *_: None)(blobs)[0], dtype=np.float64)
                    for p in members["paths"]]
    mean = (member_probs[0] + member_probs[1]) / 2
    assert np.abs(member_probs[0] - member_probs[1]).max() > 0.05
    backend = Backend(built["out"], log=lambda *_: None)
    backend.warm_up()  # a prediction, and no Grad-CAM of an ensemble
    assert backend.heatmap_source is None and "ensemble" in backend.heatmap_reason
    probs, _ = backend.predict(blobs)
    assert np.abs(probs - mean).max() <= 1e-6
    with running_server(os.path.dirname(exported["path"]), tmp_path) as server:
        status, doc = server.json("GET", "/v1/models/ens/metadata")
        assert status == 200, doc
        status, doc = server.json("POST", "/v1/models/ens:predict", instances(blobs))
        assert status == 200, doc
        served = np.array([row["probabilities"] for row in doc["predictions"]], dtype=np.float64)
    assert np.abs(served - mean).max() <= 1e-6
