"""Raw-pixel records (`build-records --encoding raw`): the same images as PNG records, read, inspected, checked,
cached and previewed the same way; a bad raw record is named like a bad PNG."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.data import features
from cxrkeras.data import records as rec
from cxrkeras.data.inspect import inspect_records
from cxrkeras.data.pipeline import build_dataset, data_error_from
from cxrkeras.errors import DataError
from records_helpers import decode, read_records, rewrite_shard, small_nih

S = 32


def _manifest(records):
    with open(os.path.join(records, "manifest.json")) as f:
        return json.load(f)


def _pixels(record):
    """A record's uint8 pixels, read without cxrkeras: PIL for PNG, NumPy for raw."""
    if record[features.IMAGE_FORMAT] == b"raw":
        shape = [int(record[k]) for k in (features.IMAGE_HEIGHT, features.IMAGE_WIDTH, features.IMAGE_CHANNELS)]
        return np.frombuffer(record[features.IMAGE_ENCODED], np.uint8).reshape(shape)[..., 0]
    return decode(record)


def test_raw_records_hold_the_png_records_pixels(tiny_records, tiny_raw_records):
    png_m, raw_m = _manifest(tiny_records), _manifest(tiny_raw_records)
    assert png_m["encoding"] == "png" and raw_m["encoding"] == "raw" and raw_m["options"]["encoding"] == "raw"
    assert png_m["fingerprint"] != raw_m["fingerprint"]
    for split in png_m["splits"]:  # same split, same shard plan; raw shards are bigger (no compression)
        p, r = png_m["splits"][split], raw_m["splits"][split]
        assert [s["records"] for s in p["shards"]] == [s["records"] for s in r["shards"]]
        assert {k: p[k] for k in ("images", "patients", "positives")} == {k: r[k] for k in ("images", "patients",
                                                                                           "positives")}
        assert sum(s["bytes"] for s in r["shards"]) > sum(s["bytes"] for s in p["shards"])
    png = {x[features.IMAGE_ID]: x for x in read_records(tiny_records)}
    raw = read_records(tiny_raw_records)
    assert len(raw) == len(png) == 268
    for x in raw:
        y = png[x[features.IMAGE_ID]]
        assert x[features.IMAGE_FORMAT] == b"raw" and y[features.IMAGE_FORMAT] == b"png"
        assert len(x[features.IMAGE_ENCODED]) == 64 * 64
        np.testing.assert_array_equal(_pixels(x), _pixels(y))
        np.testing.assert_array_equal(x[features.LABELS], y[features.LABELS])
    result = inspect_records(tiny_raw_records)
    assert result.problems == [] and result.records == 268


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pipeline_gives_the_same_batches_from_both_encodings(tiny_records, tiny_raw_records, training):
    kwargs = dict(stage=1, batch_size=16, training=training, image_size=S, seed=5, return_ids=True)
    for a, b in zip(build_dataset(tiny_records, "val", **kwargs), build_dataset(tiny_raw_records, "val", **kwargs)):
        np.testing.assert_array_equal(a[2]["image_id"].numpy(), b[2]["image_id"].numpy())
        np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), atol=1e-5)
        np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())


def test_cache_and_equalize_on_both(any_records, tmp_path):
    _, records = any_records
    kwargs = dict(stage=2, batch_size=8, image_size=S, equalize="clahe")
    first = np.concatenate([x.numpy() for x, _ in build_dataset(records, "test", cache=str(tmp_path), **kwargs)])
    again = np.concatenate([x.numpy() for x, _ in build_dataset(records, "test", cache=str(tmp_path), **kwargs)])
    plain = np.concatenate([x.numpy() for x, _ in build_dataset(records, "test", **kwargs)])
    assert os.listdir(tmp_path) and first.shape[0] == _manifest(records)["splits"]["test"]["images"]
    np.testing.assert_allclose(first, again, atol=1e-6)
    np.testing.assert_allclose(first, plain, atol=1e-5)


def test_bad_image_bytes_are_named_in_both_encodings(any_records, tmp_path):
    encoding, tiny = any_records
    records = str(tmp_path / "r")
    shutil.copytree(tiny, records)
    shard = [s for s in _manifest(records)["splits"]["test"]["shards"] if s["records"] > 2][-1]
    bad = shard["records"] // 2

    def truncate(examples):  # a PNG cut short, or raw pixels one row short of height x width
        value = examples[bad].features.feature[features.IMAGE_ENCODED].bytes_list.value
        value[0] = value[0][:-64]

    rewrite_shard(records, shard["file"], truncate)
    with pytest.raises(tf.errors.OpError) as info:
        for _ in build_dataset(records, "test", batch_size=4, training=True, image_size=S, seed=0):
            pass
    err = data_error_from(info.value)
    assert isinstance(err, DataError), info.value
    assert f"shard {shard['file']}: record {bad} (0-based)" in str(err) and "decoded" in str(err)


def test_inspect_names_a_raw_record_of_the_wrong_size(tiny_raw_records, tmp_path):
    records = str(tmp_path / "r")
    shutil.copytree(tiny_raw_records, records)
    name = _manifest(records)["splits"]["val"]["shards"][0]["file"]

    def shrink(examples):  # a first record of another size than the manifest's (its bytes consistent with it)
        f = examples[0].features.feature
        f[features.IMAGE_ENCODED].bytes_list.value[0] = bytes(32 * 32)
        f[features.IMAGE_HEIGHT].int64_list.value[0] = f[features.IMAGE_WIDTH].int64_list.value[0] = 32

    rewrite_shard(records, name, shrink)
    problems = inspect_records(records).problems
    assert any(f"{name}: first image is [32, 32, 1], manifest says [64, 64, 1]" in p for p in problems), problems


def test_cli_raw_build_inspect_preview_and_refusal(tmp_path, sample64):
    csv_path, images, _ = small_nih(tmp_path, sample64, n=40)
    out = str(tmp_path / "raw")
    runner = CliRunner()
    args = ["build-records", "--csv", csv_path, "--images", images, "--out", out, "--image-size", "48",
            "--workers", "1", "--no-progress", "--shard-size", "8"]
    built = runner.invoke(cli, args + ["--encoding", "raw"])
    assert built.exit_code == 0, built.output
    assert "encoding raw" in built.output
    m = _manifest(out)
    assert m["encoding"] == "raw" and all(s["bytes"] > 48 * 48 * s["records"] for s in m["splits"]["train"]["shards"])
    shown = runner.invoke(cli, ["inspect-records", out])
    assert shown.exit_code == 0 and "encoding raw" in shown.output, shown.output
    grid = tmp_path / "grid.png"
    preview = runner.invoke(cli, ["preview-batch", out, "--split", "train", "--out", str(grid), "--n", "4",
                                  "--image-size", "32"])
    assert preview.exit_code == 0 and grid.is_file(), preview.output
    again = runner.invoke(cli, args)  # the same folder as PNG: other options, refused by name
    assert again.exit_code != 0 and "--encoding raw -> png" in again.output, again.output
    wrong = runner.invoke(cli, args + ["--encoding", "jpeg"])
    assert wrong.exit_code != 0 and "jpeg" in wrong.output


def test_folders_built_before_the_encoding_was_recorded_read_as_png(tiny_records, tmp_path):
    records = str(tmp_path / "old")
    shutil.copytree(tiny_records, records)
    m = _manifest(records)
    del m["encoding"], m["options"]["encoding"]
    with open(os.path.join(records, "manifest.json"), "w") as f:
        json.dump(m, f)
    assert inspect_records(records).problems == []
    n = sum(int(x.shape[0]) for x, _ in build_dataset(records, "val", batch_size=16, image_size=S))
    assert n == m["splits"]["val"]["images"]
    m["encoding"] = "zip"
    with open(os.path.join(records, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(DataError, match="encoding 'zip' is not one of png, raw"):
        build_dataset(records, "val")
    with pytest.raises(Exception, match="choose one of png, raw"):
        rec.build_records("x.csv", encoding="jpeg")
