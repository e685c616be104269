"""build_dataset on the tiny real records: shapes, ranges, stage filter, label alignment, determinism, bad input."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from cxrkeras.data import features, preprocess
from cxrkeras.data.pipeline import build_dataset, count_images, data_error_from, label_statistics
from cxrkeras.errors import ConfigError, DataError
from cxrkeras.labels import NIH_LABELS

S = 32  # output size of the tests (records are 64 px)


def _manifest(records):
    with open(os.path.join(records, "manifest.json")) as f:
        return json.load(f)


def _csv_labels(sample64):
    with open(sample64[0], newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {r[0]: np.array([float(lbl in r[1].split("|")) for lbl in NIH_LABELS]) for r in rows}


def _collect(ds):
    images, labels, ids = [], [], []
    for x, y, meta in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
        ids += [s.decode() for s in meta["image_id"].numpy()]
    return np.concatenate(images), np.concatenate(labels), ids


def test_eval_shapes_range_count_and_alignment(tiny_records, sample64):
    ds = build_dataset(tiny_records, "test", stage=2, batch_size=8, image_size=S, return_ids=True)
    x, y, ids = _collect(ds)
    m = _manifest(tiny_records)
    assert len(ids) == m["splits"]["test"]["images"] == len(set(ids))  # nothing dropped in evaluation
    assert x.shape == (len(ids), S, S, 3) and x.dtype == np.float32 and y.dtype == np.float32
    lo = (0 - np.array(preprocess._TORCH_MEAN)) / np.array(preprocess._TORCH_STD)
    hi = (1 - np.array(preprocess._TORCH_MEAN)) / np.array(preprocess._TORCH_STD)
    assert np.all(x >= lo - 1e-4) and np.all(x <= hi + 1e-4) and x.std() > 0.3
    truth = _csv_labels(sample64)
    for image_id, label in zip(ids, y):
        np.testing.assert_array_equal(label, truth[image_id])
    # the image of a known id is the eval transform of its original file
    i = ids.index(sorted(ids)[0])
    raw = tf.io.read_file(os.path.join(sample64[1], ids[i]))
    expected = preprocess.preprocess_for_eval(preprocess.decode_image(raw), S, "torch").numpy()
    np.testing.assert_allclose(x[i], expected, atol=1e-4)


def test_stage1_removes_exactly_no_finding(tiny_records, sample64):
    m = _manifest(tiny_records)["splits"]["train"]
    all_ids = _collect(build_dataset(tiny_records, "train", stage=2, batch_size=16, image_size=S,
                                     return_ids=True))[2]
    x, y, ids = _collect(build_dataset(tiny_records, "train", stage=1, batch_size=16, image_size=S,
                                       return_ids=True))
    assert len(all_ids) == m["images"]
    assert len(ids) == m["images"] - m["no_finding"] == count_images(tiny_records, "train", stage=1)
    truth = _csv_labels(sample64)
    removed = set(all_ids) - set(ids)
    assert removed == {i for i in all_ids if truth[i].sum() == 0}
    assert np.all(y.sum(axis=1) >= 1)


def test_training_batches_augmented_in_range_and_aligned(tiny_records, sample64):
    n = count_images(tiny_records, "train", stage=1)
    ds = build_dataset(tiny_records, "train", stage=1, batch_size=8, training=True, image_size=S, seed=1,
                       preprocessing="caffe", return_ids=True)
    x, y, ids = _collect(ds)
    assert len(ids) == (n // 8) * 8  # drop_remainder defaults to True in training
    assert x.shape[1:] == (S, S, 3)
    assert x.min() >= -123.68 - 1e-3 and x.max() <= 255 - 103.939 + 1e-3
    truth = _csv_labels(sample64)
    for image_id, label in zip(ids, y):
        np.testing.assert_array_equal(label, truth[image_id])
    ex, _, eids = _collect(build_dataset(tiny_records, "train", stage=1, batch_size=64, image_size=S,
                                         preprocessing="caffe", return_ids=True))
    plain = dict(zip(eids, ex))
    diffs = [np.abs(img - plain[i]).mean() for img, i in zip(x, ids)]
    assert np.median(diffs) > 5.0  # augmentation really changes the images (caffe scale: 0..255)
    assert ids != sorted(ids) and ids[:8] != eids[:8]  # shuffled


def test_seed_determinism_and_epochs_differ(tiny_records):
    def first_batches(seed, k=2, ds=None):
        ds = ds or build_dataset(tiny_records, "train", stage=2, batch_size=8, training=True, image_size=S,
                                 seed=seed, return_ids=True)
        return [(b[0].numpy(), list(b[2]["image_id"].numpy())) for b in ds.take(k)]

    a, b, c = first_batches(7), first_batches(7), first_batches(8)
    for (xa, ia), (xb, ib) in zip(a, b):
        np.testing.assert_allclose(xa, xb, atol=1e-5)  # two runs: the same numbers up to float rounding
        assert ia == ib
    assert not all(np.allclose(xa, xc, atol=1e-2) for (xa, _), (xc, _) in zip(a, c))
    # one shard, no shuffle buffer: the same order every epoch, so only the augmentation can differ
    ds = build_dataset(tiny_records, "val", stage=2, batch_size=8, training=True, image_size=S, seed=7,
                       shuffle_buffer=0, return_ids=True)
    epoch1, epoch2 = first_batches(None, ds=ds), first_batches(None, ds=ds)
    assert epoch1[0][1] == epoch2[0][1]
    assert not np.allclose(epoch1[0][0], epoch2[0][0], atol=1e-2)  # each epoch draws new augmentation


def test_repeat_cache_and_equalize(tiny_records, tmp_path):
    n = count_images(tiny_records, "val")
    ds = build_dataset(tiny_records, "val", batch_size=4, training=True, image_size=S, seed=0, repeat=True)
    assert sum(1 for _ in ds.take(n)) == n  # more batches than one epoch holds
    plain = build_dataset(tiny_records, "val", batch_size=4, image_size=S)
    cached = build_dataset(tiny_records, "val", batch_size=4, image_size=S, cache=str(tmp_path / "c"))
    for _ in range(2):  # the first pass writes the disk cache, the second reads it
        for (x1, _), (x2, _) in zip(plain, cached):
            np.testing.assert_allclose(x1.numpy(), x2.numpy(), atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files and all("-val-stage2-64x64-c1-plain" in f for f in files), files
    # another stage (other images) or equalisation gets its own cache file, never the other's
    list(build_dataset(tiny_records, "val", stage=1, batch_size=4, image_size=S, cache=str(tmp_path / "c")))
    list(build_dataset(tiny_records, "val", batch_size=4, image_size=S, equalize="hist", cache=str(tmp_path / "c")))
    keys = {f.split(".")[0] for f in os.listdir(tmp_path / "c")}
    assert len(keys) == 3 and any("-stage1-" in k for k in keys) and any(k.endswith("-hist") for k in keys), keys
    eq = next(iter(build_dataset(tiny_records, "val", batch_size=4, image_size=S, equalize="clahe")))[0]
    assert not np.allclose(eq.numpy(), next(iter(plain))[0].numpy())


def test_global_batch_under_strategy(tiny_records):
    class TwoReplicas:
        num_replicas_in_sync = 2

    with pytest.raises(ConfigError, match="GLOBAL batch"):
        build_dataset(tiny_records, "train", batch_size=5, training=True, strategy=TwoReplicas())
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    ds = build_dataset(tiny_records, "train", batch_size=4, training=True, image_size=S, seed=0, strategy=strategy)
    x, y = next(iter(strategy.experimental_distribute_dataset(ds)))
    assert x.shape == (4, S, S, 3) and y.shape == (4, 14)


def test_bad_arguments_and_folders(tiny_records, tmp_path):
    with pytest.raises(DataError, match="unknown split 'training'.*test, train, val"):
        build_dataset(tiny_records, "training")
    with pytest.raises(ConfigError, match="unknown stage 3"):
        build_dataset(tiny_records, "train", stage=3)
    with pytest.raises(ConfigError, match="preprocessing"):
        build_dataset(tiny_records, "train", preprocessing="imagenet")
    with pytest.raises(ConfigError, match="equalize"):
        build_dataset(tiny_records, "train", equalize="ahe")
    with pytest.raises(DataError, match="build-records"):
        build_dataset(str(tmp_path), "train")
    broken = tmp_path / "missing_shard"
    shutil.copytree(tiny_records, broken)
    name = _manifest(tiny_records)["splits"]["val"]["shards"][0]["file"]
    os.remove(broken / name)
    with pytest.raises(DataError, match=f"{name}.*missing"):
        build_dataset(str(broken), "val")


def _iterate_error(records, split, verify="sha256"):
    with pytest.raises(tf.errors.OpError) as info:
        for _ in build_dataset(records, split, batch_size=4, training=True, image_size=S, seed=0, verify=verify):
            pass
    return data_error_from(info.value)


def _relist(records, name):
    """Make the manifest list the shard `name` as it now is (size, sha256): what a faulty build would have written,
    so that only the in-graph record check can catch what is wrong inside it."""
    from cxrkeras.hashing import sha256_file

    m = _manifest(records)
    for info in m["splits"].values():
        for shard in info["shards"]:
            if shard["file"] == name:
                path = os.path.join(records, name)
                shard.update(bytes=os.path.getsize(path), sha256=sha256_file(path))
    with open(os.path.join(records, "manifest.json"), "w") as f:
        json.dump(m, f)


def _shard_with(records, split, at_least):
    """(file name, records) of the last shard of `split` holding more than `at_least` records."""
    shards = [s for s in _manifest(records)["splits"][split]["shards"] if s["records"] > at_least]
    assert shards, f"the tiny records have no {split} shard with more than {at_least} records"
    return shards[-1]["file"], shards[-1]["records"]


def test_crc_corrupt_record_names_shard_and_record(tiny_records, tmp_path):
    shutil.copytree(tiny_records, tmp_path / "r")
    name, _ = _shard_with(tiny_records, "train", 5)
    shard = tmp_path / "r" / name
    offsets, offset = [], 0
    for rec in tf.data.TFRecordDataset(str(shard)):
        offsets.append(offset)
        offset += 16 + len(rec.numpy())  # length(8) + crc(4) + data + crc(4)
    raw = bytearray(shard.read_bytes())
    raw[offsets[5] + 12 + 50] ^= 0xFF  # a byte inside record 5's data: its CRC no longer matches
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"shard {name} is not the file manifest.json lists \\(sha256"):
        build_dataset(str(tmp_path / "r"), "train")  # by default refused before reading: the sha256 differs
    err = _iterate_error(str(tmp_path / "r"), "train", verify="size")  # same size: the in-graph check names it
    assert isinstance(err, DataError)
    assert f"shard {name}: only 5 of the" in str(err) and "record 5 (0-based)" in str(err)


def test_undecodable_image_names_shard_and_record(tiny_records, tmp_path):
    shutil.copytree(tiny_records, tmp_path / "r")
    name, n = _shard_with(tiny_records, "test", 2)
    bad = n // 2
    shard = str(tmp_path / "r" / name)
    examples = [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(shard)]
    examples[bad].features.feature[features.IMAGE_ENCODED].bytes_list.value[0] = b"\x89PNG broken"
    with tf.io.TFRecordWriter(shard) as w:
        for ex in examples:
            w.write(ex.SerializeToString())
    _relist(str(tmp_path / "r"), name)
    err = _iterate_error(str(tmp_path / "r"), "test")
    assert f"shard {name}: record {bad} (0-based)" in str(err) and "decoded" in str(err)


def test_label_statistics_from_manifest(tiny_records):
    m = _manifest(tiny_records)
    df = label_statistics(tiny_records)
    assert list(df.index) == list(NIH_LABELS)
    for split, info in m["splits"].items():
        assert list(df[split]) == [info["positives"][lbl] for lbl in NIH_LABELS]
        assert df.attrs["images"][split] == info["images"]
    s1 = label_statistics(tiny_records, stage=1)
    n1 = m["splits"]["train"]["images"] - m["splits"]["train"]["no_finding"]
    np.testing.assert_allclose(s1["train_prevalence"], np.array(s1["train"]) / n1)


def test_preview_batch_cli(tiny_records, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from cxrkeras.cli import cli

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["preview-batch", tiny_records, "--split", "train", "--stage", "1",
                                      "--out", str(out), "--n", "4", "--image-size", "32", "--seed", "0"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 200 and np.asarray(img).std() > 10
    bad = CliRunner().invoke(cli, ["preview-batch", tiny_records, "--split", "nope", "--out", str(out)])
    assert bad.exit_code != 0 and "unknown split 'nope'" in bad.output


def test_xla_and_plain_augmentation_agree(tiny_records):
    kwargs = dict(stage=2, batch_size=8, training=True, image_size=S, seed=3)
    fast = next(iter(build_dataset(tiny_records, "val", jit=True, **kwargs)))[0].numpy()
    plain = next(iter(build_dataset(tiny_records, "val", jit=False, **kwargs)))[0].numpy()
    np.testing.assert_allclose(fast, plain, atol=1e-4)
