"""`evaluate` end to end on the tiny records: whole split, files written, thresholds from validation, bad inputs."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from evalexport_helpers import tiny_model
from records_helpers import replace_shard
from sklearn.metrics import roc_auc_score

from cxrkeras.errors import DataError
from cxrkeras.evaluation import metrics


@pytest.fixture(scope="module")
def evaluated(tiny_records, tmp_path_factory):
    from cxrkeras.evaluation.evaluate import evaluate

    out = str(tmp_path_factory.mktemp("eval"))
    result = evaluate(tiny_model(), tiny_records, split="test", out_dir=out, n_boot=100, batch_size=16,
                      log=lambda *_: None)
    return result, out


def test_evaluate_writes_everything_over_the_whole_split(evaluated, tiny_records):
    result, out = evaluated
    manifest = json.load(open(os.path.join(tiny_records, "manifest.json")))
    n_test = manifest["splits"]["test"]["images"]
    for name in ("metrics.json", "thresholds.json", "predictions_test.csv", "predictions_val.csv", "roc_test.png",
                 "pr_test.png", "reliability_test.png", "comparison_test.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    doc = json.loads(open(os.path.join(out, "metrics.json")).read())  # strict JSON (no NaN)
    assert doc["n_images"] == n_test and doc["split"] == "test"
    df = pd.read_csv(os.path.join(out, "predictions_test.csv"), dtype={"patient_id": str})
    assert len(df) == n_test and df["image_index"].is_unique
    assert set(df["patient_id"]) and df["image_index"].str.endswith(".png").all()
    # the AUCs in metrics.json are those of the CSV's probabilities
    for label, entry in doc["auc"]["per_label"].items():
        y = df[f"true_{label}"].to_numpy()
        if entry["auc"] is None:
            assert y.sum() == 0 and entry["reason"]
        else:
            assert entry["auc"] == pytest.approx(roc_auc_score(y, df[f"prob_{label}"]), abs=1e-9)
    assert doc["auc"]["mean"]["ci_low"] <= doc["auc"]["mean"]["auc"] <= doc["auc"]["mean"]["ci_high"]
    md = open(os.path.join(out, "comparison_test.md")).read()
    assert "CheXNet" in md and "paper (2)" in md and "ours AUC (95% CI)" in md
    # every label's decisions at the validation-chosen thresholds, as metrics.json has them
    assert "## Decisions at the Youden J thresholds: test split" in md and "Confusion matrix" not in md
    for label, e in doc["at_thresholds"]["youden"]["per_label"].items():
        assert f"| {label} | {e['threshold']:.4f} | " in md and f"| {e['tp']} | {e['fp']} | {e['fn']} | {e['tn']} |" in md
        assert e["tp"] + e["fp"] + e["fn"] + e["tn"] == n_test


def test_thresholds_chosen_on_validation_and_applied_to_test(evaluated):
    result, out = evaluated
    val = pd.read_csv(os.path.join(out, "predictions_val.csv"))
    test = pd.read_csv(os.path.join(out, "predictions_test.csv"))
    thr = json.load(open(os.path.join(out, "thresholds.json")))
    assert thr["chosen_on"] == "val"
    for label in result["labels"]:
        y = val[f"true_{label}"].to_numpy()
        t = thr["methods"]["youden"][label]
        if 0 < y.sum() < len(y):
            assert t == pytest.approx(metrics.youden_threshold(y, val[f"prob_{label}"].to_numpy()))
        else:
            assert t == 0.5 and label in thr["reasons"]["youden"]
        assert (test[f"finding_{label}"] == (test[f"prob_{label}"] >= t)).all()
        sens = result["at_thresholds"]["youden"]["per_label"][label]["sensitivity"]
        pos = test[f"true_{label}"] == 1
        if pos.any():
            assert sens == pytest.approx((test.loc[pos, f"prob_{label}"] >= t).mean())


def test_label_mismatch_is_a_clear_error(tiny_records, tmp_path):
    from cxrkeras.evaluation.evaluate import evaluate

    model = tiny_model(labels=["Effusion", "Mass", "Pneumothorax"])
    with pytest.raises(DataError, match="label mismatch.*3 outputs.*14 labels"):
        evaluate(model, tiny_records, out_dir=str(tmp_path), log=lambda *_: None)


def test_empty_split_is_a_clear_error(tiny_records, tmp_path):
    from cxrkeras.evaluation.evaluate import evaluate

    records = str(tmp_path / "records")
    shutil.copytree(tiny_records, records)
    manifest = json.load(open(os.path.join(records, "manifest.json")))
    manifest["splits"]["holdout"] = {"images": 0, "patients": 0, "no_finding": 0, "positives": {}, "shards": []}
    json.dump(manifest, open(os.path.join(records, "manifest.json"), "w"))
    with pytest.raises(DataError, match="split 'holdout' .* is empty"):
        evaluate(tiny_model(), records, split="holdout", out_dir=str(tmp_path / "o"), log=lambda *_: None)


@pytest.mark.timeout(120)
def test_records_that_do_not_match_their_manifest_are_refused(tiny_records, tmp_path):
    """Issue 11 row 3: a test shard replaced by another valid one used to be scored (16 images twice, 16 never)."""
    from cxrkeras.cli import cli
    from cxrkeras.evaluation.evaluate import evaluate

    records, name = replace_shard(tiny_records, tmp_path)
    with pytest.raises(DataError, match=rf"shard {name} has [\d,]+ bytes but manifest.json lists"):
        evaluate(tiny_model(), records, out_dir=str(tmp_path / "o"), n_boot=0, log=lambda *_: None)
    keras_file = str(tmp_path / "m.keras")
    tiny_model().save(keras_file)
    for verify in ("sha256", "size"):  # sizes are checked even when hashing is skipped
        res = CliRunner().invoke(cli, ["evaluate", "--model", keras_file, "--records", records, "--out",
                                       str(tmp_path / "o"), "--n-boot", "0", "--no-figures",
                                       "--verify-records", verify])
        assert res.exit_code == 1 and f"shard {name} has" in res.output and "Traceback" not in res.output
    # same size, other bytes (one byte of an image changed): only the sha256 tells
    same = str(tmp_path / "same")
    shutil.copytree(tiny_records, same)
    path = os.path.join(same, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(DataError, match=rf"shard {name} is not the file manifest.json lists \(sha256 \w+… instead"):
        evaluate(tiny_model(), same, out_dir=str(tmp_path / "o"), n_boot=0, log=lambda *_: None)


@pytest.mark.timeout(120)
def test_evaluate_run_says_when_stage1_stands_in_for_stage2(tiny_records, tmp_path):
    """Issue 11 row 8: a run whose stage 2 has no best.keras was evaluated with stage 1's model, silently."""
    import yaml

    from cxrkeras.cli import cli

    run = tmp_path / "runs" / "r"
    stage1 = run / "stage1"
    stage1.mkdir(parents=True)
    tiny_model().save(str(stage1 / "best.keras"))
    (stage1 / "config.yaml").write_text(yaml.safe_dump({"data": {"records": tiny_records, "image_size": 32}}))
    (stage1 / "run_info.json").write_text(json.dumps({"records": tiny_records, "image_size": 32}))
    args = ["evaluate", "--run", str(run), "--n-boot", "0", "--no-figures"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and f"note: the run has no stage 2: using stage 1's model {stage1 / 'best.keras'}" \
        in res.output, res.output
    (run / "stage2").mkdir()
    (run / "stage2" / "config.yaml").write_text("{}")  # stage 2 started, but no good epoch yet
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "note: stage 2 has no best.keras (not finished, or stopped before a good epoch): " \
        f"using stage 1's model {stage1 / 'best.keras'}" in res.output, res.output
    assert json.load(open(run / "evaluation" / "test" / "metrics.json"))["model"] == str(stage1 / "best.keras")


def test_evaluate_cli_needs_run_or_model(tmp_path):
    from cxrkeras.cli import cli

    res = CliRunner().invoke(cli, ["evaluate", "--records", str(tmp_path)])
    assert res.exit_code != 0 and "exactly one of --run" in res.output
    model = tmp_path / "m.keras"
    model.write_bytes(b"not a model")
    res = CliRunner().invoke(cli, ["evaluate", "--model", str(model), "--records", str(tmp_path), "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot be loaded as a Keras model" in res.output and "Traceback" not in res.output


def test_figures_are_images(evaluated):
    from PIL import Image

    _, out = evaluated
    for name in ("roc_test.png", "pr_test.png", "reliability_test.png"):
        with Image.open(os.path.join(out, name)) as im:
            assert im.format == "PNG" and min(im.size) >= 400
            assert np.asarray(im.convert("L")).std() > 5  # not blank


def test_mixed_precision_model_is_evaluated_in_float32(rng):
    import keras

    from cxrkeras.runs import as_float32

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = tiny_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    clone, policy = as_float32(mixed)
    assert policy == "mixed_float16"
    assert {layer.dtype_policy.name for layer in clone.layers} == {"float32"}
    x = rng.normal(size=(3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(mixed(x), dtype=np.float32), atol=1e-2)
    assert as_float32(clone)[0] is clone


def test_binary_task_metrics_console_and_comparison(tmp_path, sample64):
    """A binary task from the NIH CSV (--labels Finding): accuracy, sensitivity, specificity, precision, F1 and the
    confusion matrix at the validation-chosen threshold, equal to scikit-learn's on predictions_test.csv, in
    metrics.json, on the console and in comparison_test.md; the PR figure is written."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    from cxrkeras.data.records import build_records
    from cxrkeras.evaluation.evaluate import evaluate

    records = str(tmp_path / "rec")
    build_records(*sample64, records, labels="Finding", image_size=32, workers=1, progress=False)
    out, lines = str(tmp_path / "eval"), []
    evaluate(tiny_model(labels=["Finding"]), records, split="test", out_dir=out, n_boot=50, batch_size=16,
             log=lines.append)
    doc = json.load(open(os.path.join(out, "metrics.json")))
    e = doc["at_thresholds"]["youden"]["per_label"]["Finding"]
    df = pd.read_csv(os.path.join(out, "predictions_test.csv"))
    truth, pred = df["true_Finding"] == 1, df["finding_Finding"] == 1
    assert (pred == (df["prob_Finding"] >= e["threshold"])).all() and 0 < pred.sum() < len(pred)
    assert e["confusion_matrix"] == confusion_matrix(truth, pred).tolist()
    assert e["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert e["sensitivity"] == pytest.approx(recall_score(truth, pred))
    assert e["specificity"] == pytest.approx(recall_score(~truth, ~pred))
    assert e["precision"] == pytest.approx(precision_score(truth, pred))
    assert e["f1"] == pytest.approx(f1_score(truth, pred))
    console = "\n".join(lines)
    tn, fp, fn, tp = confusion_matrix(truth, pred).ravel()
    assert f"Finding vs not: AUC {doc['auc']['per_label']['Finding']['auc']:.3f}" in console
    assert f"accuracy {e['accuracy']:.3f}" in console and f"specificity {e['specificity']:.3f}" in console
    assert re.search(rf"true no Finding\s+{tn} \(TN\)\s+{fp} \(FP\)", console)
    assert re.search(rf"true Finding\s+{fn} \(FN\)\s+{tp} \(TP\)", console)
    md = open(os.path.join(out, "comparison_test.md")).read()
    assert f"| **true Finding** | {fn} (FN) | {tp} (TP) |" in md and "chosen on the 'val' split" in md
    assert os.path.getsize(os.path.join(out, "pr_test.png")) > 0
