"""Patient features (age, sex, view) and the 'No Finding' class: the one encoder, its normalisation fitted on the
training split (checked against pandas on index.csv), the pipeline's (image, features) inputs, records without the
fields, and one run end to end: build -> train -> evaluate -> export -> serve through the new signature in a fresh
process -> predict."""

import base64
import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.data.patient import PatientEncoder, fit_encoder
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.labels import NIH_LABELS, NO_FINDING

# absolute: Chromium's file input refuses a path with '..' in it ("path is not canonical")
CSV_64 = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data", "nih-64px",
                                      "Data_Entry_2017.csv"))


def _index(records):
    """index.csv of a records folder with NIH's columns, the ages as numbers."""
    df = pd.read_csv(os.path.join(records, "index.csv"), index_col=False)
    return df.assign(age=pd.to_numeric(df["Patient Age"]))


def _by_hand(age, sex, view, mean, sd):
    return [(age - mean) / sd, sex == "M", sex == "F", view == "PA", view == "AP"]


def test_encoder_rules_and_missing_values():
    enc = PatientEncoder(50.0, 10.0)
    age = tf.constant([60.0, 40.0, -1.0, float("nan"), 30.0, 20.0])
    sex = tf.constant(["M", " f ", "M", "F", "X", ""])
    view = tf.constant(["PA", "ap", "AP", "PA", "PA", "PA"])
    problems = [p.decode() for p in enc.problems(age, sex, view).numpy()]
    assert problems == ["", "", "age: unknown (missing in the input)", "age: not a number of years",
                        "sex: not one of M, F", "sex: unknown (missing in the input)"]
    lenient = PatientEncoder(50.0, 10.0, missing="encode")
    assert [p.decode() for p in lenient.problems(age, sex, view).numpy()] == \
        ["", "", "", "age: not a number of years", "sex: not one of M, F", ""]
    x = lenient.encode(age, sex, view).numpy()
    np.testing.assert_allclose(x[:2], [[1, 1, 0, 1, 0], [-1, 0, 1, 0, 1]])
    np.testing.assert_allclose(x[2], [0, 1, 0, 0, 1])  # unknown age: the training mean
    np.testing.assert_allclose(x[5], [-3, 0, 0, 1, 0])  # unknown sex: all zero
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"sex\[4\]: not one of M, F"):
        enc.encode_checked(tf.fill([5], 50.0), sex[:5], view[:5])
    with pytest.raises(tf.errors.InvalidArgumentError, match="must each hold one value per image"):
        enc.encode_checked(age, sex, view, count=tf.constant(2))
    assert PatientEncoder.from_config(enc.to_config()) == enc
    assert enc.check_values(["58", "058Y", "abc"], ["M", "F", "M"], ["PA", "AP", "PA"]) == \
        [None, None, "age: not a number of years"]
    with pytest.raises(ConfigError, match="age_sd must be > 0"):
        PatientEncoder(50.0, 0.0)
    with pytest.raises(ConfigError, match="unknown key"):
        PatientEncoder.from_config({"age_mean": 1.0, "scale": 2})


def test_normalisation_fitted_on_the_training_split_and_the_pipeline_inputs(tiny_records):
    from cxrkeras.data.pipeline import build_dataset

    enc = fit_encoder(tiny_records, "train")
    index = _index(tiny_records)
    train = index[index["split"] == "train"]
    assert enc.fitted_on["images"] == enc.fitted_on["known_ages"] == len(train)
    assert enc.age_mean == pytest.approx(train["age"].mean(), abs=1e-9)
    assert enc.age_sd == pytest.approx(train["age"].std(ddof=0), abs=1e-9)
    assert abs(enc.age_mean - index["age"].mean()) > 1e-6  # the training split's, not the whole table's
    ds = build_dataset(tiny_records, "val", batch_size=8, image_size=32, patient=enc, no_finding_class=True,
                       return_ids=True)
    rows = index.set_index("image_id")
    seen = 0
    for (images, features), labels, ids in ds:
        assert images.shape[1:] == (32, 32, 3) and features.shape[1:] == (5,) and labels.shape[1:] == (15,)
        for image_id, f, y in zip(ids["image_id"].numpy(), features.numpy(), labels.numpy()):
            row = rows.loc[image_id.decode()]
            np.testing.assert_allclose(f, _by_hand(row["age"], row["Patient Gender"], row["View Position"],
                                                   enc.age_mean, enc.age_sd), atol=1e-5)
            assert y[-1] == (row["Finding Labels"] == NO_FINDING)  # the derived class = NIH's 'No Finding'
            assert y[:-1].sum() == (0 if y[-1] else len(row["Finding Labels"].split("|")))
            seen += 1
    assert seen == int((index["split"] == "val").sum())


def test_records_without_the_fields_are_refused_naming_the_field(sample512, tmp_path):
    """The bundled nih-512px CSV has no age, sex or view: the records store them as unknown, and a model with
    patient features refuses them, naming the record and the field."""
    from cxrkeras.data.pipeline import build_dataset, data_errors
    from cxrkeras.data.records import build_records

    csv_path, images = sample512
    out = str(tmp_path / "r512")
    build_records(csv_path, images, out, image_size=32, shard_size=200, workers=1, progress=False)
    with pytest.raises(DataError, match=r"split 'train', record \d+_\d+\.png .*: age \(meta/age\) is unknown"
                                        r".*'Patient Age'.*data.patient_missing: encode"):
        fit_encoder(out, "train")
    with pytest.raises(DataError, match="known age"):
        fit_encoder(out, "train", missing="encode")  # nothing to normalise with
    ds = build_dataset(out, "test", batch_size=4, image_size=32, patient=PatientEncoder())
    with pytest.raises(DataError, match=r"shard test-\d+-of-\d+\.tfrecord: record 0 \(.*\.png\): age \(meta/age\) is "
                                        r"unknown"):
        with data_errors():
            next(iter(ds))
    lenient = build_dataset(out, "test", batch_size=4, image_size=32, patient=PatientEncoder(missing="encode"))
    (_, features), _ = next(iter(lenient))
    np.testing.assert_array_equal(features.numpy(), 0.0)  # the documented missing-value encoding


def test_no_finding_class_is_refused_for_a_subset_of_the_labels():
    from cxrkeras.labels import with_no_finding

    assert with_no_finding(NIH_LABELS)[-1] == NO_FINDING and len(with_no_finding(NIH_LABELS)) == 15
    with pytest.raises(ConfigError, match="cannot be derived"):
        with_no_finding(["Effusion", "Mass"])
    assert with_no_finding(["Pneumothorax_x"]) == ["Pneumothorax_x", NO_FINDING]  # another label set: its own


# --- end to end ---

@pytest.fixture(scope="module")
def patient_run(tiny_records, tmp_path_factory):
    """att-B with patient features and the 'No Finding' class, one stage (--init none) of 2 epochs, evaluated
    and exported (the export checks itself in a fresh process)."""
    from cxrkeras.evaluation.evaluate import evaluate
    from cxrkeras.export.savedmodel import export
    from cxrkeras.training import train
    from test_training import tiny_config

    root = tmp_path_factory.mktemp("patient")
    config = tiny_config(tiny_records, str(root / "runs"), "pf", epochs=2,
                         model={"variant": "densenet121-att-b", "patient_features": True},
                         data={"no_finding_class": True})
    logs = []
    result = train(config, 2, init="none", log=logs.append)
    run = str(root / "runs" / "pf")
    metrics = evaluate(run, split="test", n_boot=50, figures_on=False, log=logs.append)
    exported = export(run, str(root / "exports" / "pf"), log=logs.append)
    return dict(run=run, result=result, metrics=metrics, export=exported, logs=logs, root=root)


@pytest.fixture(scope="module")
def patient_server(patient_run, tmp_path_factory):
    """`cxrkeras serve` of that export, its own process, shared by the API and the browser tests."""
    from serve_helpers import running_server

    with running_server(os.path.dirname(patient_run["export"]["path"]), tmp_path_factory.mktemp("pf-server")) as srv:
        yield srv


def _keras_reference(run, blobs, values):
    from cxrkeras.data.patient import value_tensors
    from cxrkeras.runs import load_source

    source = load_source(run)
    x = np.stack([source.preprocessor.from_bytes(tf.constant(b)).numpy() for b in blobs])
    features = source.patient.encode(**value_tensors(values)).numpy()
    return np.asarray(source.model((x, features), training=False), dtype=np.float64), source


@pytest.mark.timeout(600)
def test_patient_features_train_evaluate_export(patient_run, tiny_records):
    run, metrics, exported = patient_run["run"], patient_run["metrics"], patient_run["export"]
    from cxrkeras.runs import RunInfo, load_source

    source = load_source(run)
    assert source.labels == list(NIH_LABELS) + [NO_FINDING]
    index = _index(tiny_records)
    train = index[index["split"] == "train"]
    assert source.patient.age_mean == pytest.approx(train["age"].mean())  # stored with the model
    info = RunInfo.read(os.path.join(run, "stage2"))
    assert info.patient_features == source.patient.to_config() and info.finished
    assert any("patient features: age (years - " in line for line in patient_run["logs"])
    # evaluated like any label: its AUC is scikit-learn's on the predictions file
    from sklearn.metrics import roc_auc_score

    preds = pd.read_csv(os.path.join(metrics["out_dir"], "predictions_test.csv"))
    nf = metrics["auc"]["per_label"][NO_FINDING]
    assert nf["auc"] == pytest.approx(roc_auc_score(preds[f"true_{NO_FINDING}"], preds[f"prob_{NO_FINDING}"]))
    # ... and kept out of the published comparison: its table has the 14 labels, their own mean
    table = open(os.path.join(metrics["out_dir"], "comparison_test.md")).read()
    published_part = table.split("## Decisions")[0]  # the decisions table below it covers every output
    rows = [r for r in published_part.splitlines() if r.startswith("| ") and not r.startswith("| label")]
    assert len(rows) == 15 and not any(r.startswith(f"| {NO_FINDING}") for r in rows)
    without = metrics["auc_without_no_finding"]["mean"]["auc"]
    assert f"{without:.4f}" in rows[-1] and "the derived class, not in the published comparison" in table
    assert without != pytest.approx(metrics["auc"]["mean"]["auc"])
    # the export: the new signature, checked in a fresh process
    check = exported["verification"]
    assert max(check["max_abs_diff_bytes"], check["max_abs_diff_images"]) <= 1e-5
    assert check["bad_patient_error"] == "sex[1]: not one of M, F"
    for name in ("image_bytes", "age", "sex", "view"):
        assert f"inputs['{name}']" in check["signatures"].split("signature_def['predict_images']")[0]


@pytest.mark.timeout(600)
def test_patient_features_served_and_predicted(patient_run, patient_server, tmp_path):
    from serve_helpers import multipart

    base = os.path.dirname(patient_run["export"]["path"])
    images = os.path.join(os.path.dirname(CSV_64), "images")
    names = ["00000001_000.png", "00000003_001.png", "00000004_000.png"]
    blobs = [open(os.path.join(images, n), "rb").read() for n in names]
    table = pd.read_csv(CSV_64, index_col=False).set_index("Image Index")
    values = [(float(table.loc[n, "Patient Age"]), table.loc[n, "Patient Gender"], table.loc[n, "View Position"])
              for n in names]
    expected, _ = _keras_reference(patient_run["run"], blobs, values)

    server = patient_server
    status, doc = server.json("GET", "/v1/models/pf/metadata")
    inputs = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert status == 200 and sorted(inputs) == ["age", "image_bytes", "sex", "view"]
    assert inputs["age"]["dtype"] == "DT_FLOAT" and doc["patient_inputs"]["sex"] == ["M", "F"]
    rows = [{"image_bytes": {"b64": base64.b64encode(b).decode()}, "age": a, "sex": s, "view": v}
            for b, (a, s, v) in zip(blobs, values)]
    status, doc = server.json("POST", "/v1/models/pf:predict", {"instances": rows})
    assert status == 200, doc
    got = np.array([p["probabilities"] for p in doc["predictions"]])
    assert got.shape == (3, 15) and np.max(np.abs(got - expected)) <= 1e-5
    columnar = {"inputs": {"image_bytes": [r["image_bytes"] for r in rows], "age": [v[0] for v in values],
                           "sex": [v[1] for v in values], "view": [v[2] for v in values]}}
    status, doc = server.json("POST", "/v1/models/pf:predict", columnar)
    assert status == 200 and np.max(np.abs(np.array(doc["outputs"]["probabilities"]) - expected)) <= 1e-5
    status, doc = server.json("POST", "/v1/models/pf:predict",
                              {"instances": [dict(rows[0], sex="X"), rows[1]]})
    assert status == 400 and doc["error"] == "sex[0]: not one of M, F"
    status, doc = server.json("POST", "/v1/models/pf:predict", {"instances": [{"image_bytes": rows[0][
        "image_bytes"]}]})
    assert status == 400 and "this model's inputs are image_bytes, age, sex, view" in doc["error"]
    # the page's upload: one age, sex and view per file; a file without them gets its own error
    fields = [("age", "58"), ("sex", "M"), ("view", "PA"), ("age", "40"), ("sex", ""), ("view", "AP"),
              ("top_k", "1")]
    body, ctype = multipart([(names[0], blobs[0]), (names[1], blobs[1])], fields)
    status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    doc = json.loads(data)
    assert status == 200 and doc["results"][1]["error"] == "sex: unknown (missing in the input)"
    first = doc["results"][0]
    assert first["error"] is None and first["patient"] == {"age": "58", "sex": "M", "view": "PA"}
    assert len(first["heatmaps"]) == 1 and first["heatmaps"][0]["image"].startswith("data:image/png")
    probs = {r["label"]: r["probability"] for r in first["table"]}
    ref, _ = _keras_reference(patient_run["run"], blobs[:1], [(58.0, "M", "PA")])
    assert max(abs(probs[k] - ref[0][j]) for j, k in enumerate(doc["model"]["labels"])) <= 1e-5
    body, ctype = multipart([(names[0], blobs[0])], [("top_k", "1")])
    status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    assert status == 400 and "give the fields age, sex and view" in json.loads(data)["error"]

    runner = CliRunner()
    files = [os.path.join(images, n) for n in names]
    res = runner.invoke(cli, ["predict", "--model", base, "--json", "--patient-csv", CSV_64] + files)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output[res.output.index("{"):])
    got = np.array([[r["probabilities"][k] for k in doc["labels"]] for r in doc["results"]])
    assert np.max(np.abs(got - expected)) <= 1e-5
    res = runner.invoke(cli, ["predict", "--model", base, "--json", "--age", "58", "--sex", "m", "--view", "PA",
                              files[0]])
    assert res.exit_code == 0, res.output
    one, _ = _keras_reference(patient_run["run"], blobs[:1], [(58.0, "M", "PA")])
    doc = json.loads(res.output[res.output.index("{"):])
    assert max(abs(doc["results"][0]["probabilities"][k] - one[0][j]) for j, k in enumerate(doc["labels"])) <= 1e-5
    res = runner.invoke(cli, ["predict", "--model", base, files[0]])
    assert res.exit_code != 0 and "--age, --sex, --view" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["predict", "--model", base, "--age", "58", files[0]])
    assert res.exit_code != 0 and "together" in res.output
    res = runner.invoke(cli, ["gradcam", "--model", patient_run["run"], "--out", str(tmp_path / "cam"), "--top-k",
                              "1", "--patient-csv", CSV_64, files[0]])
    assert res.exit_code == 0, res.output
    assert os.path.isfile(os.path.join(tmp_path / "cam", "gradcam.json"))
    from cxrkeras.explain.localize import localize

    boxes = os.path.join(os.path.dirname(os.path.dirname(CSV_64)), "BBox_List_2017.csv")
    with pytest.raises(ConfigError, match="give NIH's Data_Entry CSV"):
        localize(patient_run["run"], boxes, images, log=lambda *_: None)


@pytest.mark.timeout(600)
def test_the_page_asks_for_age_sex_and_view(patient_server, tmp_path, monkeypatch):
    """Headless Chromium: the page shows an age, sex and view field beside each chosen file and sends them; the
    file whose sex is left empty gets its own error, the other its table."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_serve_browser import CHROMEDRIVER, CHROMIUM, _browser, _wait

    assert CHROMIUM and CHROMEDRIVER, "the browser test needs Chromium and its driver (apt-get install chromium " \
                                      "chromium-driver)"
    monkeypatch.setenv("SE_OFFLINE", "true")
    images = os.path.join(os.path.dirname(CSV_64), "images")
    files = [os.path.join(images, n) for n in ("00000001_000.png", "00000003_001.png")]
    server = patient_server
    driver = _browser(str(tmp_path), str(tmp_path / "profile"))
    try:
        driver.get(server.url + "/")
        _wait(driver, lambda d: "model pf" in d.find_element(By.ID, "model-line").text, "the model line")
        assert "age (years), sex (M/F) and view position (PA/AP)" in driver.find_element(By.ID, "patient-hint").text
        driver.find_element(By.ID, "files").send_keys("\n".join(files))
        items = driver.find_elements(By.CSS_SELECTOR, "#chosen li")
        assert len(items) == 2
        items[0].find_element(By.CSS_SELECTOR, "input.age").send_keys("58")
        Select(items[0].find_element(By.CSS_SELECTOR, "select.sex")).select_by_value("M")
        Select(items[0].find_element(By.CSS_SELECTOR, "select.view")).select_by_value("PA")
        items[1].find_element(By.CSS_SELECTOR, "input.age").send_keys("40")
        Select(items[1].find_element(By.CSS_SELECTOR, "select.view")).select_by_value("AP")
        driver.find_element(By.ID, "analyse").click()
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results article")) == 2, "two results")
        cards = driver.find_elements(By.CSS_SELECTOR, "#results article")
        assert "age 58 · sex M · view PA" in cards[0].text
        assert len(cards[0].find_elements(By.CSS_SELECTOR, "table.labels tbody tr")) == 15
        assert "Not analysed: sex: unknown (missing in the input)" in cards[1].text
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
