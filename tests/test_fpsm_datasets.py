"""The FPSM dataset-id embedding and the records' source-dataset field: the CSV column through build-records, the
manifest's names and counts, old folders as one dataset, the model against NumPy, parameter counts, the unknown
source error, and a tiny run (both stages, evaluate, export) whose SavedModel matches Keras in a fresh process."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE_64, SAMPLE_64_CSV

from cxrkeras.cli import cli
from cxrkeras.data import datasets as ds_lib
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.models import build_model, model_info, trainable_params

NAMES = ["Other", "NIH"]  # order of first appearance in the CSV below (its first patient, 1, is odd)


def _source_of(patient_id):
    return "Other" if int(patient_id) % 2 else "NIH"


def _write_csv(path, rows=None, value=None):
    """The tests' NIH sample with a 'Dataset' column (odd patients "Other", even "NIH"; `value(line, row)`
    overrides), or `rows` of it."""
    with open(SAMPLE_64_CSV, newline="") as f:
        table = list(csv.reader(f))
    header, body = table[0][:-1] + ["Dataset"], table[1:] if rows is None else table[1:1 + rows]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for line, r in enumerate(body, start=2):
            w.writerow(r + [value(line, r) if value else _source_of(r[3])])
    return path


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """(records folder, CSV) of the sample pooled from two 'source datasets', built by `cxrkeras build-records`."""
    d = tmp_path_factory.mktemp("two-datasets")
    csv_path = _write_csv(str(d / "two.csv"))
    out = str(d / "records")
    result = CliRunner().invoke(cli, ["build-records", "--csv", csv_path, "--images", os.path.join(SAMPLE_64, "images"),
                                      "--out", out, "--image-size", "64", "--shard-size", "40", "--workers", "1",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "dataset Other" in result.output and "dataset NIH" in result.output  # the per-split table rows
    return out, csv_path


def _stored(records_dir, split):
    """{image id: meta/dataset} read with plain tf.train.Example parsing (not cxrkeras' spec)."""
    import tensorflow as tf

    manifest = json.load(open(os.path.join(records_dir, "manifest.json")))
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        for raw in tf.data.TFRecordDataset(os.path.join(records_dir, shard["file"])):
            ex = tf.train.Example.FromString(raw.numpy()).features.feature
            value = list(ex["meta/dataset"].int64_list.value) if "meta/dataset" in ex else []
            out[ex["image/id"].bytes_list.value[0].decode()] = value
    return out


def test_two_dataset_csv_through_build_records(two_datasets):
    records, csv_path = two_datasets
    manifest = json.load(open(os.path.join(records, "manifest.json")))
    assert manifest["datasets"] == {"names": NAMES, "column": "Dataset"}
    with open(csv_path, newline="") as f:
        truth = {r["Image Index"]: r["Dataset"] for r in csv.DictReader(f)}
    for split in ("train", "val", "test"):
        stored = _stored(records, split)
        # index 0 is left out of the record (its default), so index-0 records are the bytes of older ones
        got = {i: NAMES[v[0]] if v else NAMES[0] for i, v in stored.items()}
        assert got == {i: truth[i] for i in stored}
        assert all(v in ([], [1]) for v in stored.values())
        counts = {n: sum(1 for i in stored if truth[i] == n) for n in NAMES}
        assert manifest["splits"][split]["datasets"] == counts and sum(counts.values()) == len(stored)
    assert ds_lib.manifest_names(manifest) == NAMES


def test_old_records_read_as_one_dataset(tiny_records, tmp_path):
    from cxrkeras.data.pipeline import build_dataset

    manifest = json.load(open(os.path.join(tiny_records, "manifest.json")))
    assert manifest["datasets"] == {"names": [ds_lib.DEFAULT_NAME], "column": None}
    assert all(v == [] for v in _stored(tiny_records, "val").values())  # no field written: old bytes
    old = dict(manifest)
    del old["datasets"]  # a folder built before the field
    assert ds_lib.manifest_names(old) == [ds_lib.DEFAULT_NAME]
    (x, idx), _ = next(iter(build_dataset(tiny_records, "val", batch_size=8, image_size=32,
                                          datasets=["Other", ds_lib.DEFAULT_NAME])))
    assert idx.dtype.name == "int32" and idx.shape == (8, 1) and set(idx.numpy().ravel()) == {1}


def test_dataset_name_option_and_fingerprint(tmp_path):
    from cxrkeras.data.records import build_records

    images, out = os.path.join(SAMPLE_64, "images"), str(tmp_path / "r")
    report = build_records(SAMPLE_64_CSV, images, out, image_size=16, shard_size=200, workers=1, progress=False,
                           dataset_name="ChestX-ray14 subset", dry_run=True)
    assert report.manifest["datasets"]["names"] == ["ChestX-ray14 subset"]
    assert report.manifest["options"]["dataset_name"] == "ChestX-ray14 subset"
    with pytest.raises(ConfigError, match="leave out --dataset-name"):
        build_records(_write_csv(str(tmp_path / "two.csv"), rows=5), images, str(tmp_path / "s"), image_size=16,
                      workers=1, progress=False, dataset_name="NIH", dry_run=True)


@pytest.mark.parametrize("value, message", [
    (lambda line, r: "" if line == 4 else "NIH", "line 4: column 'Dataset' is empty"),
    (lambda line, r: "x" * 65 if line == 3 else "NIH", "line 3: column 'Dataset' has 65 characters"),
    (lambda line, r: "N\x07IH" if line == 5 else "NIH", "line 5: column 'Dataset' holds a control"),
    (lambda line, r: "NIH [v2]" if line == 2 else "NIH", "line 2: column 'Dataset' holds one of"),
    (lambda line, r: f"source {line}", "line 66: column 'Dataset' names more than 64"),
], ids=["empty", "too-long", "control", "reserved", "too-many"])
def test_bad_dataset_names_name_line_and_column(tmp_path, value, message):
    from cxrkeras.data.sources import read_table

    path = _write_csv(str(tmp_path / "bad.csv"), rows=80, value=value)
    with pytest.raises(DataError) as err:
        read_table(path)
    assert message in str(err.value)
    assert "xxxxx" not in str(err.value) and "\x07" not in str(err.value) and "[v2]" not in str(err.value)


# --- the model ---

THIN = {"densenet121": dict(blocks=[1, 1, 1, 1], width_multiplier=0.25), "vgg16-bn": dict(width_multiplier=0.125)}


def _thin(variant, **kw):
    return build_model(variant, num_classes=3, input_shape=(48, 48, 3), dropout=0.0, head="fpsm",
                       head_stages="4+3+2", **THIN[variant], **kw)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("merge", ["sum", "concat"])
@pytest.mark.parametrize("variant", sorted(THIN))
def test_embedding_prediction_against_numpy(variant, merge):
    """prediction = sigmoid(sum_s [pool_s, E[d]] W_s + b_s) (concat: one Dense over [pool_4, pool_3, pool_2, E[d]])
    from the layers' weights in NumPy; the embedding changes it by dataset; with E = 0 it is the no-embedding
    model with the same weights."""
    model = _thin(variant, head_merge=merge, head_dataset_embedding=["A", "B", "C"])
    assert [t.name for t in model.inputs] == ["image", "dataset"] and model_info(model)["datasets"] == ["A", "B", "C"]
    rng = np.random.default_rng(0)
    emb = model.get_layer("fpsm_dataset_embedding")
    emb.set_weights([rng.normal(size=(3, 3)).astype("float32")])
    x = rng.normal(size=(3, 48, 48, 3)).astype("float32")
    ids = np.array([[0], [1], [2]], np.int32)
    pools = keras.Model(model.inputs, [model.get_layer(f"fpsm{s}_pool").output for s in (4, 3, 2)])
    feats = [np.asarray(f, np.float64) for f in pools([x, ids])]
    e = emb.get_weights()[0].astype(np.float64)[ids[:, 0]]
    head = model.get_layer("predictions")
    if merge == "sum":
        w = head.get_weights()
        z = sum(np.concatenate([f, e], 1) @ k + b for f, k, b in zip(feats, w[:3], w[3:]))
    else:
        k, b = head.get_weights()
        z = np.concatenate(feats + [e], 1) @ k + b
    out = np.asarray(model([x, ids], training=False))
    np.testing.assert_allclose(out, _sigmoid(z), atol=1e-5)
    by_id = [np.asarray(model([x[:1], np.array([[i]], np.int32)], training=False)) for i in range(3)]
    assert min(np.abs(by_id[i] - by_id[j]).max() for i in range(3) for j in range(i)) > 1e-4
    # E = 0: the no-embedding model with the same weights (the embedding's rows of the kernels then add nothing)
    plain = _thin(variant, head_merge=merge)
    assert len(plain.inputs) == 1
    emb.set_weights([np.zeros((3, 3), np.float32)])
    for layer in plain.layers:
        if layer.name == "predictions":
            got = head.get_weights()
            if merge == "sum":
                layer.set_weights([k[:-3] for k in got[:3]] + got[3:])
            else:
                layer.set_weights([got[0][:-3], got[1]])
        elif layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(np.asarray(model([x, ids], training=False)), np.asarray(plain(x, training=False)),
                               atol=1e-6)


@pytest.mark.parametrize("variant, plain", [("densenet121", 6_989_738), ("vgg16-bn", 14_741_098)])
def test_parameter_count_with_the_embedding(variant, plain):
    """no-embedding count (14 classes, 4+3+2) + N*N (embedding) + N*14 per level Dense, through `cxrkeras models`."""
    n = 3
    result = CliRunner().invoke(cli, ["models", variant, "--head", "fpsm", "--head-dataset-embedding", str(n)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith(variant + " "))
    assert f"{plain + n * n + n * 14 * 3:,}" in row.split()
    model = build_model(variant, head="fpsm", head_stages="4+3+2", head_merge="concat", head_dataset_embedding=n)
    assert trainable_params(model) == plain - 2 * 14 + n * n + n * 14  # concat: one Dense (one bias, not three)


def test_option_checks():
    with pytest.raises(ConfigError, match="apply to head: fpsm only"):
        build_model("densenet121", num_classes=2, head_dataset_embedding=2, blocks=[1, 1, 1, 1])
    with pytest.raises(ConfigError, match="true takes the dataset names of the training records"):
        _thin("densenet121", head_dataset_embedding=True)
    with pytest.raises(ConfigError, match="65 datasets"):
        _thin("densenet121", head_dataset_embedding=65)
    with pytest.raises(ConfigError, match="given twice"):
        _thin("densenet121", head_dataset_embedding=["A", "A"])


def test_records_of_an_unknown_source_name_shard_record_and_datasets(two_datasets):
    from cxrkeras.data.pipeline import _dataset_index, build_dataset, data_errors

    records, _ = two_datasets
    with pytest.raises(DataError) as err, data_errors():
        for _ in build_dataset(records, "val", batch_size=8, image_size=32, datasets=["NIH", "CheXpert"]):
            pass
    text = str(err.value)
    assert "shard val-00000-of-00001.tfrecord: record" in text and ".png)" in text
    assert "meta/dataset index 0 (Other) is none of the datasets the model was trained on (NIH, CheXpert)" in text
    # a stored index the manifest does not name (a damaged record)
    import tensorflow as tf

    index, problem = _dataset_index(tf.constant(5, tf.int64), ["NIH"], ["NIH"], tf.constant(""))
    assert int(index) == -1 and b"index 5 (an index manifest.json does not name)" in problem.numpy()
    # by name: a model of ["NIH", "Other"] reads the records' index 0 (Other) as its index 1
    (_, idx), _, ids = next(iter(build_dataset(records, "val", batch_size=64, image_size=32,
                                               datasets=["NIH", "Other"], return_ids=True)))
    truth = {i: v[0] if v else 0 for i, v in _stored(records, "val").items()}
    assert [int(v) for v in idx.numpy()[:, 0]] == [1 - truth[i.decode()] for i in ids["image_id"].numpy()]


def test_gradcam_with_the_dataset_input():
    """The engine takes (images, dataset index) and explains the summed score: its probabilities are the model's
    for each dataset; the embedding shifts the logits by a per-dataset constant, so the maps do not change."""
    from cxrkeras.explain.engine import HeatmapEngine

    model = _thin("densenet121", head_dataset_embedding=2)
    model.get_layer("fpsm_dataset_embedding").set_weights([np.array([[0.0, 3.0], [-3.0, 1.0]], np.float32)])
    x = np.random.default_rng(2).normal(size=(2, 48, 48, 3)).astype("float32")
    engine = HeatmapEngine(model, "conv5_block1_concat")
    maps = []
    for i in (0, 1):
        ids = np.full((2, 1), i, np.int32)
        m, probs = engine.explain((x, ids), [0, 1])
        np.testing.assert_allclose(probs, np.asarray(model([x, ids], training=False)), atol=1e-5)
        maps.append(m)
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


# --- a run end to end ---

_FRESH = """
import json, sys
import numpy as np
import tensorflow as tf
fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
blob = open(sys.argv[2], "rb").read()
out = {n: fn(image_bytes=tf.constant([blob]), dataset=tf.constant([n]))["probabilities"].numpy()[0].tolist()
       for n in sys.argv[3:]}
try:
    fn(image_bytes=tf.constant([blob, blob]), dataset=tf.constant(["NIH", "Nope"]))
    out["error"] = None
except tf.errors.InvalidArgumentError as exc:
    out["error"] = exc.message
print("RESULT" + json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_run_trains_evaluates_and_exports_with_the_dataset_input(two_datasets, tmp_path):
    from cxrkeras.config import load_config
    from cxrkeras.evaluation.evaluate import evaluate
    from cxrkeras.export.predict import predict
    from cxrkeras.export.savedmodel import export
    from cxrkeras.runs import load_source
    from cxrkeras.training.trainer import train

    records, _ = two_datasets
    config = load_config(overrides={
        "data": {"records": records, "image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
        "model": {"variant": "densenet121-lka-last2", "weights": None,
                  "overrides": {"blocks": [1, 1, 1, 1], "width_multiplier": 0.125, "head": "fpsm",
                                "head_dataset_embedding": True}},
        "train": {"epochs": 1, "steps_per_epoch": 2, "verbose": 0}, "run": {"root": str(tmp_path), "name": "f"}})
    for stage in (1, 2):
        result = train(config, stage, log=lambda *_: None)
        source = load_source(result.stage_dir)
        assert source.datasets == NAMES and model_info(source.model)["build_args"]["head_dataset_embedding"] == NAMES
    run = str(tmp_path / "f")
    metrics = evaluate(run, records, split="test", n_boot=20, figures_on=False, log=lambda *_: None)
    with open(os.path.join(metrics["out_dir"], "predictions_test.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == json.load(open(os.path.join(records, "manifest.json")))["splits"][
            "test"]["images"]  # every test image of both sources scored
    exported = export(run, str(tmp_path / "exp"), log=lambda *_: None)
    check = exported["verification"]
    assert check["max_abs_diff_bytes"] <= 1e-5 and check["bad_dataset_error"].startswith("dataset[1]: not one of")
    # an independent fresh process: the SavedModel against the Keras model, for both dataset ids
    image = os.path.join(SAMPLE_64, "images", "00000001_000.png")
    proc = subprocess.run([sys.executable, "-c", _FRESH, exported["path"], image] + NAMES, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    served = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    source = load_source(run)
    x = source.preprocessor.from_bytes(open(image, "rb").read()).numpy()[None]
    for i, name in enumerate(NAMES):
        keras_p = np.asarray(source.model([x, np.array([[i]], np.int32)], training=False))[0]
        np.testing.assert_allclose(served[name], keras_p, atol=1e-5)
    assert np.abs(np.subtract(served[NAMES[0]], served[NAMES[1]])).max() > 0  # the id reaches the graph
    assert "dataset[1]: not one of the datasets the model was trained on (Other, NIH)" in served["error"]
    # predict: --dataset by name, default the first; an unknown name lists the model's
    for target in (exported["path"], run):
        got = {n: predict(target, [image], dataset=n, log=lambda *_: None)["results"][0]["probabilities"]
               for n in NAMES}
        for name in NAMES:
            np.testing.assert_allclose(list(got[name].values()), served[name], atol=1e-5)
        default = predict(target, [image], log=lambda *_: None)["results"][0]["probabilities"]
        np.testing.assert_allclose(list(default.values()), served[NAMES[0]], atol=1e-5)
        with pytest.raises(ConfigError, match=r"--dataset: not one of the model's datasets \(Other, NIH\)"):
            predict(target, [image], dataset="Nope", log=lambda *_: None)


def test_inspect_records_counts_the_datasets(two_datasets):
    from cxrkeras.data.inspect import inspect_records

    records, _ = two_datasets
    assert inspect_records(records).problems == []
    manifest_path = os.path.join(records, "manifest.json")
    original = open(manifest_path).read()
    manifest = json.loads(original)
    manifest["splits"]["val"]["datasets"]["NIH"] += 1
    try:
        with open(manifest_path, "w") as f:
            json.dump(manifest, f)
        problems = inspect_records(records).problems
    finally:
        with open(manifest_path, "w") as f:
            f.write(original)
    assert any("split val: records give images per dataset" in p for p in problems)


def test_dadam_images_keep_their_receivers_dataset(two_datasets, tmp_path):
    """DADAM shards of pooled records: each synthetic image is of its receiver's source dataset, counted in the
    manifest (inspect-records re-counts them from the records)."""
    from cxrkeras.data.dadam import DadamOptions
    from cxrkeras.data.inspect import inspect_records
    from cxrkeras.data.records import build_records

    records, csv_path = two_datasets
    with open(os.path.join(records, "index.csv"), newline="") as f:
        train = [r["image_id"] for r in csv.DictReader(f) if r["split"] == "train"]
    boxes = str(tmp_path / "boxes.csv")
    with open(boxes, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows([[image, ("Mass", "Nodule")[k % 2], 300, 300, 200, 200] for k, image in enumerate(train[:6])])
    out = str(tmp_path / "r")
    report = build_records(csv_path, os.path.join(SAMPLE_64, "images"), out, image_size=64, shard_size=40,
                           workers=1, progress=False, log=lambda *_: None,
                           augment=DadamOptions(boxes, n=16, tail_labels=("Mass", "Nodule"), seed=1))
    train_info = report.manifest["splits"]["train"]
    assert sum(train_info["datasets"].values()) == train_info["images"]
    assert inspect_records(out).problems == []
    with open(os.path.join(out, "dadam.csv"), newline="") as f:
        receivers = {r["image_id"]: r["receiver_image"] for r in csv.DictReader(f)}
    stored = _stored(out, "train")
    assert len(receivers) == 16 and all(stored[i] == stored[r] for i, r in receivers.items())
    assert {tuple(stored[r]) for r in receivers.values()} == {(), (1,)}  # receivers of both sources


def test_ensembles_refuse_dataset_input_members():
    from types import SimpleNamespace

    from cxrkeras.models.ensemble import check_members

    plain = SimpleNamespace(patient=None, datasets=None)
    member = SimpleNamespace(patient=None, datasets=["NIH", "Other"])
    with pytest.raises(ConfigError, match="runs/b: takes a dataset input"):
        check_members([plain, member], ["runs/a", "runs/b"])


def test_disk_cache_keeps_image_only_and_dataset_streams_apart(two_datasets, tmp_path):
    """One cache folder for a plain model and a dataset-input model: each stream has its own cache file."""
    from cxrkeras.data.pipeline import build_dataset

    records, _ = two_datasets
    cache = str(tmp_path / "cache")
    common = dict(batch_size=64, image_size=32, cache=cache, return_ids=True)
    plain = [b for b in build_dataset(records, "val", **common)]
    for names in (["Other", "NIH"], ["NIH", "Other"]):
        for _ in range(2):  # the second pass reads the cache
            (x, idx), _, ids = next(iter(build_dataset(records, "val", datasets=names, **common)))
            truth = {i: v[0] if v else 0 for i, v in _stored(records, "val").items()}
            want = [truth[i.decode()] if names == NAMES else 1 - truth[i.decode()] for i in ids["image_id"].numpy()]
            assert [int(v) for v in idx.numpy()[:, 0]] == want
            np.testing.assert_array_equal(x.numpy(), plain[0][0].numpy())
    assert len({f.split(".")[0] for f in os.listdir(cache)}) == 3
