"""FusedBatchNormalization (the backbones' BN) against PyTorch's BatchNorm2d in training mode, and against Keras' own
layer: same output and gradients, PyTorch's unbiased moving variance, and Keras' own call where it is not fused."""

import numpy as np
import pytest
import tensorflow as tf
import torch

import keras

from cxrkeras.models.batchnorm import FusedBatchNormalization

SHAPES = {"5x7x6": (3, 5, 7, 6), "1x1x4": (4, 1, 1, 4), "12x12x32": (2, 12, 12, 32)}


def _layer(cls, c, weights):
    layer = cls(axis=3, epsilon=1e-5, momentum=0.9)
    layer.build((None, None, None, c))
    layer.set_weights(weights)
    return layer


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_training_step_equals_pytorch(shape):
    rng = np.random.default_rng(0)
    n, h, w, c = shape
    x = (rng.normal(size=shape) * 3 + 1).astype("float32")
    up = rng.normal(size=shape).astype("float32")
    gamma, beta = rng.uniform(0.5, 2, c).astype("float32"), rng.normal(size=c).astype("float32")
    mean, var = rng.normal(size=c).astype("float32"), rng.uniform(0.5, 2, c).astype("float32")

    ref = torch.nn.BatchNorm2d(c, eps=1e-5, momentum=0.1).double().train()
    with torch.no_grad():
        for p, v in zip((ref.weight, ref.bias, ref.running_mean, ref.running_var), (gamma, beta, mean, var)):
            p.copy_(torch.from_numpy(v.astype("float64")))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype("float64")).requires_grad_()
    yt = ref(xt)
    (yt * torch.from_numpy(up.transpose(0, 3, 1, 2).astype("float64"))).sum().backward()

    layer = _layer(FusedBatchNormalization, c, [gamma, beta, mean, var])
    xk = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xk)
        y = layer(xk, training=True)
        loss = tf.reduce_sum(y * up)
    dx, dgamma, dbeta = tape.gradient(loss, [xk, layer.gamma, layer.beta])

    def close(a, b, tol):
        np.testing.assert_allclose(np.asarray(a), b.detach().numpy(), rtol=tol, atol=tol)

    close(y, yt.permute(0, 2, 3, 1), 1e-4)
    close(dx, xt.grad.permute(0, 2, 3, 1), 1e-3)
    close(dgamma, ref.weight.grad, 1e-3)
    close(dbeta, ref.bias.grad, 1e-3)
    close(layer.moving_mean, ref.running_mean, 1e-5)
    close(layer.moving_variance, ref.running_var, 1e-4)  # PyTorch's unbiased batch variance


def test_keras_own_call_where_not_fused():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6, 5, 3)).astype("float32")
    weights = [rng.uniform(0.5, 2, 3), rng.normal(size=3), rng.normal(size=3), rng.uniform(0.5, 2, 3)]
    weights = [w.astype("float32") for w in weights]
    fused, plain = _layer(FusedBatchNormalization, 3, weights), _layer(keras.layers.BatchNormalization, 3, weights)
    # inference: Keras' own call, identical
    np.testing.assert_array_equal(np.asarray(fused(x, training=False)), np.asarray(plain(x, training=False)))
    # training: same normalisation; the moving variance differs only by Bessel's factor n / (n - 1)
    np.testing.assert_allclose(np.asarray(fused(x, training=True)), np.asarray(plain(x, training=True)), atol=2e-5)
    n = 4 * 6 * 5
    batch_var_fused = (fused.moving_variance.numpy() - 0.9 * weights[3]) / 0.1
    batch_var_plain = (plain.moving_variance.numpy() - 0.9 * weights[3]) / 0.1
    np.testing.assert_allclose(batch_var_fused, batch_var_plain * n / (n - 1), rtol=1e-4)
    # a frozen layer, other ranks, dtypes: Keras' own call
    fused.trainable = False
    before = fused.moving_variance.numpy().copy()
    fused(x, training=True)
    np.testing.assert_array_equal(fused.moving_variance.numpy(), before)
    flat = FusedBatchNormalization(axis=-1)
    assert not flat._fused(tf.zeros([2, 3]), True, None)
    assert not flat._fused(tf.zeros([2, 3, 3, 2], tf.float16), True, None)
    assert flat._fused(tf.zeros([2, 3, 3, 2]), True, None)


@pytest.mark.parametrize("variant", ["densenet121", "vgg16-bn", "resnet50", "efficientnetb2-lstm-mha"])
def test_backbones_use_it(variant):
    """(their weights keep Keras' BN names: tests/test_models_torch.py and test_models_roundtrip.py load them)"""
    from cxrkeras.models import build_model

    kw = {"blocks": (1, 1, 1, 1)} if variant.startswith("densenet") else {}
    model = build_model(variant, input_shape=(64, 64, 3), **kw)
    bns = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(layer, FusedBatchNormalization) for layer in bns)
