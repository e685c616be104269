"""The TFRecord schema: feature keys, the writer's `make_example` and the reader's feature spec, in one place."""

import tensorflow as tf

IMAGE_ENCODED = "image/encoded"  # lossless PNG bytes
IMAGE_FORMAT = "image/format"
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

UNKNOWN_INT = -1


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _str(value):
    return _bytes([("" if value is None else str(value)).encode("utf-8")])


def make_example(
    image_png,
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
):
    """One record. `labels` is the multi-hot vector in manifest label order."""
    feature = {
        IMAGE_ENCODED: _bytes([image_png]),
        IMAGE_FORMAT: _bytes([b"png"]),
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
    }
