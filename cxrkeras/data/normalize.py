"""The model's input normalisation ("torch": ImageNet mean/std RGB; "caffe": keras.applications' plain VGG16)."""

import numpy as np
import tensorflow as tf

from cxrkeras.constants import PREPROCESSING
from cxrkeras.data.decode import to_rgb
from cxrkeras.errors import ConfigError

MODES = PREPROCESSING

# keras.applications.imagenet_utils: "torch" (ImageNet mean/std: DenseNet121, torchvision's VGG16-BN) and "caffe"
# (keras.applications' plain VGG16) constants.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def check_mode(mode):
    if mode not in MODES:
        raise ConfigError(f"unknown preprocessing {mode!r}: choose one of {', '.join(MODES)} "
                          f"(the model's preprocessing: 'torch' = ImageNet mean/std RGB, 'caffe' = keras.applications' "
                          "plain VGG16)")
    return mode


def _channel_map(mode, channels):
    """(channels x 3 matrix, 3 bias) with normalize(x) = x @ M + b per pixel; channels=1 also copies gray to RGB."""
    if mode == "torch":
        m = np.diag(1.0 / (255.0 * np.array(_TORCH_STD)))
        b = -np.array(_TORCH_MEAN) / np.array(_TORCH_STD)
    else:
        m = np.eye(3)[:, ::-1]  # RGB -> BGR
        b = -np.array(_CAFFE_BGR_MEAN)
    if channels == 1:
        m = m.sum(axis=0, keepdims=True)
    return tf.constant(m, tf.float32), tf.constant(b, tf.float32)


def to_model_input(images, mode):
    """Images in [0, 255] with 1 (gray) or 3 (RGB) channels -> normalised RGB float32 (..., 3), in one per-pixel
    matmul + bias (much faster on CPU than broadcasting elementwise ops; equal up to float rounding)."""
    check_mode(mode)
    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    channels = x.shape[-1]
    if channels not in (1, 3):
        x, channels = to_rgb(x), 3
    m, b = _channel_map(mode, channels)
    shape = tf.shape(x)
    y = tf.nn.bias_add(tf.matmul(tf.reshape(x, [-1, channels]), m), b)
    return tf.reshape(y, tf.concat([shape[:-1], [3]], axis=0))


def normalize(images, mode):
    """RGB float images in [0, 255] (..., 3) -> the backbone's ImageNet input, as keras.applications' preprocess_input
    ("torch": /255, minus mean, over std; "caffe": RGB->BGR minus the BGR means)."""
    images = tf.convert_to_tensor(images)
    if images.shape[-1] is not None and images.shape[-1] != 3:
        raise ConfigError(f"normalize expects RGB images (..., 3), got shape {images.shape}; use to_model_input")
    return to_model_input(images, mode)


def denormalize(images, mode):
    """Inverse of `normalize`: RGB float in [0, 255] (for display)."""
    check_mode(mode)
    x = tf.cast(images, tf.float32)
    if mode == "torch":
        x = (x * tf.constant(_TORCH_STD) + tf.constant(_TORCH_MEAN)) * 255.0
    else:
        x = (x + tf.constant(_CAFFE_BGR_MEAN))[..., ::-1]
    return tf.clip_by_value(x, 0.0, 255.0)
