"""The TFRecord schema: feature keys, the writer's `make_example`, the reader's feature spec and the one graph
decoder of a record's pixels (`decode_pixels`, PNG or raw), in one place."""

import tensorflow as tf

from cxrkeras.constants import ENCODINGS

IMAGE_ENCODED = "image/encoded"  # lossless PNG bytes, or (encoding "raw") the uint8 pixels H x W x C, row-major
IMAGE_FORMAT = "image/format"  # b"png" or b"raw"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
IMAGE_ID = "image/id"  # NIH "Image Index", or the generic source's path key
PATIENT_ID = "patient/id"
LABELS = "labels/multi_hot"  # int64[num_labels], order = manifest["labels"]
FOLLOW_UP = "meta/follow_up"  # -1 when unknown
AGE = "meta/age"  # years, -1 when unknown
SEX = "meta/sex"  # "M"/"F", "" when unknown
VIEW = "meta/view"  # "PA"/"AP", "" when unknown
SPLIT = "meta/split"
DATASET = "meta/dataset"  # index into manifest["datasets"]["names"]; absent = 0 (so index-0 records and those
# built before the field are the same bytes)

UNKNOWN_INT = -1


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _str(value):
    return _bytes([("" if value is None else str(value)).encode("utf-8")])


def make_example(
    image_bytes,
    height,
    width,
    channels,
    labels,
    image_id,
    patient_id,
    follow_up=UNKNOWN_INT,
    age=UNKNOWN_INT,
    sex="",
    view="",
    split="",
    encoding="png",
    dataset=0,
):
    """One record. `labels` is the multi-hot vector in manifest label order; `image_bytes` PNG bytes, or with
    `encoding="raw"` the H*W*C uint8 pixels."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}: one of {ENCODINGS}")
    if encoding == "raw" and len(image_bytes) != int(height) * int(width) * int(channels):
        raise ValueError(f"raw image of {len(image_bytes)} bytes is not {height}x{width}x{channels}")
    feature = {
        IMAGE_ENCODED: _bytes([image_bytes]),
        IMAGE_FORMAT: _bytes([encoding.encode("ascii")]),
        IMAGE_HEIGHT: _ints([int(height)]),
        IMAGE_WIDTH: _ints([int(width)]),
        IMAGE_CHANNELS: _ints([int(channels)]),
        IMAGE_ID: _str(image_id),
        PATIENT_ID: _str(patient_id),
        LABELS: _ints([int(v) for v in labels]),
        FOLLOW_UP: _ints([int(follow_up)]),
        AGE: _ints([int(age)]),
        SEX: _str(sex),
        VIEW: _str(view),
        SPLIT: _str(split),
    }
    if int(dataset):
        feature[DATASET] = _ints([int(dataset)])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def feature_spec(num_labels):
    """The parsing spec for `tf.io.parse_example`; every key of `make_example`."""
    return {
        IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=b"png"),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_CHANNELS: tf.io.FixedLenFeature([], tf.int64),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        PATIENT_ID: tf.io.FixedLenFeature([], tf.string),
        LABELS: tf.io.FixedLenFeature([num_labels], tf.int64),
        FOLLOW_UP: tf.io.FixedLenFeature([], tf.int64, default_value=UNKNOWN_INT),
        AGE: tf.io.FixedLenFeature([], tf.int64, default_value=UNKNOWN_INT),
        SEX: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        VIEW: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        SPLIT: tf.io.FixedLenFeature([], tf.string, default_value=b""),
        DATASET: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }


def decode_pixels(example, channels, encoding):
    """The image of a parsed record (`example`: the dict `feature_spec` parses) as uint8 (H, W, C), for the
    records' `encoding` (the manifest's; "png" when it records none). `channels` 1 or 3: converted to that (PNG)
    or required (raw); None: as stored. Raw: `tf.io.decode_raw` reshaped to the record's height, width and
    channels; bytes that are not exactly H*W*C raise InvalidArgumentError, as bad PNG bytes do (so the pipeline's
    integrity check names the shard and record either way)."""
    encoded = example[IMAGE_ENCODED]
    if encoding == "raw":
        stored = tf.cast(example[IMAGE_CHANNELS], tf.int32)
        pixels = tf.io.decode_raw(encoded, tf.uint8)
        shape = tf.stack([tf.cast(example[IMAGE_HEIGHT], tf.int32), tf.cast(example[IMAGE_WIDTH], tf.int32),
                          stored if channels is None else tf.constant(channels, tf.int32)])
        return tf.ensure_shape(tf.reshape(pixels, shape), [None, None, channels])
    if encoding != "png":
        raise ValueError(f"unknown records encoding {encoding!r}: one of {ENCODINGS}")
    image = tf.io.decode_image(encoded, channels=channels or 0, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
