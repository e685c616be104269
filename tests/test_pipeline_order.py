"""build_dataset's element order against a plain per-record tf.data formulation of the same steps, and which bad
record is named first (issue 19b checks the records in batches: the stream it feeds the shuffle, and the error,
must stay those of a record-at-a-time reader)."""

import json
import os
import shutil

import pytest
import tensorflow as tf

from cxrkeras.data import features
from cxrkeras.data.pipeline import build_dataset
from records_helpers import rewrite_shard


def _reference_ids(records, split, stage, seed, batch_size, shuffle_buffer, epochs):
    """Image ids per batch, one record at a time: shards shuffled by `seed`, read round-robin 8 at a time (each
    closed by an end marker, as the pipeline's reader does), stage 1 without 'No Finding' rows, shuffled, batched;
    shuffle_buffer 0: evaluation's order (shards as listed, no shuffle)."""
    with open(os.path.join(records, "manifest.json")) as f:
        manifest = json.load(f)
    paths = [os.path.join(records, s["file"]) for s in manifest["splits"][split]["shards"]]
    spec = {features.IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
            features.LABELS: tf.io.FixedLenFeature([len(manifest["labels"])], tf.int64)}
    files = tf.data.Dataset.from_tensor_slices(paths)
    if shuffle_buffer:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True)))
    ds = files.interleave(lambda p: tf.data.TFRecordDataset(p).map(lambda r: (r, tf.constant(False))).concatenate(end),
                          cycle_length=min(len(paths), 8), block_length=1)
    ds = ds.filter(lambda r, is_end: tf.logical_not(is_end)).map(lambda r, is_end: tf.io.parse_single_example(r, spec))
    if stage == 1:
        ds = ds.filter(lambda ex: tf.reduce_any(ex[features.LABELS] > 0))
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat(epochs)
    return [list(b[features.IMAGE_ID].numpy()) for b in ds.batch(batch_size, drop_remainder=True)]


@pytest.mark.parametrize("stage", [1, 2])
def test_training_batches_hold_the_images_a_record_at_a_time_reader_gives(any_records, stage):
    _, records = any_records
    kw = dict(stage=stage, batch_size=8, seed=3, shuffle_buffer=64)
    ds = build_dataset(records, "train", training=True, image_size=32, return_ids=True, repeat=True, **kw)
    want = _reference_ids(records, "train", stage, kw["seed"], kw["batch_size"], kw["shuffle_buffer"], epochs=2)
    got = [list(b[2]["image_id"].numpy()) for b in ds.take(len(want))]
    assert got == want  # two epochs: the shard order and the shuffle are reseeded per epoch alike


def test_eval_stream_keeps_the_records_order(any_records):
    _, records = any_records
    ds = build_dataset(records, "test", batch_size=5, image_size=32, return_ids=True, drop_remainder=False)
    got = [i for b in ds for i in b[2]["image_id"].numpy()]
    assert got == [b[0] for b in _reference_ids(records, "test", 2, None, 1, 0, 1)]


@pytest.mark.parametrize("first", ["fields", "image"])
def test_the_first_bad_record_in_element_order_is_named(any_records, tmp_path, first):
    """A record with an unknown age and a later (or earlier) record whose image bytes are broken, in one shard:
    the records are checked in batches, yet the error names the one a record-at-a-time check meets first."""
    from cxrkeras.data.patient import PatientEncoder
    from cxrkeras.data.pipeline import build_dataset, data_errors
    from cxrkeras.errors import DataError

    encoding, records = any_records
    shutil.copytree(records, tmp_path / "r")
    with open(tmp_path / "r" / "manifest.json") as f:
        shard = max(json.load(f)["splits"]["test"]["shards"], key=lambda s: s["records"])
    fields, image = (2, 5) if first == "fields" else (5, 2)

    def change(examples):
        examples[fields].features.feature[features.AGE].int64_list.value[0] = -1
        value = examples[image].features.feature[features.IMAGE_ENCODED].bytes_list.value
        value[0] = value[0][:-7] if encoding == "raw" else b"\x89PNG broken"

    rewrite_shard(str(tmp_path / "r"), shard["file"], change)
    ds = build_dataset(str(tmp_path / "r"), "test", batch_size=4, image_size=32, patient=PatientEncoder())
    want = (rf"shard {shard['file']}: record {fields} \(.*\): age \(meta/age\) is unknown" if first == "fields" else
            rf"shard {shard['file']}: record {image} \(0-based\) is corrupt .* cannot be decoded")
    with pytest.raises(DataError, match=want):
        with data_errors():
            for _ in ds:
                pass
