"""The models under Keras' JAX backend (KERAS_BACKEND=jax, in a fresh process): every paper variant builds, runs a
training step, and gives the TensorFlow backend's outputs and LKA gradients for the same weights, so the model code
holds no TensorFlow-only op and `tools/bench_gpu.py` can run on a JAX-only GPU stack."""

import json
import os
import sys
import textwrap

import numpy as np
import pytest
from background_helpers import BackgroundCheck

VARIANTS = ("densenet121-lka-after", "densenet121-lka-last2", "densenet121-lka-full",
            "vgg16-lka-after", "vgg16-lka-last3", "vgg16-lka-full")
THIN = {"width_multiplier": 0.125, "blocks": [1, 1, 1, 1]}
SIZE = 48

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import keras
    from cxrkeras.models import build_model
    from cxrkeras.models.lka import LargeKernelAttention
    out, weights_dir, variants, thin, size = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, size, size, 3)).astype("float32")
    y = rng.integers(0, 2, size=(2, 14)).astype("float32")
    result = {"backend": keras.backend.backend()}
    for name in variants:
        kw = {k: v for k, v in thin.items() if name.startswith("densenet") or k != "blocks"}
        model = build_model(name, input_shape=(size, size, 3), **kw)
        path = os.path.join(weights_dir, name + ".weights.h5")
        if os.path.exists(path):
            model.load_weights(path)
        else:
            model.save_weights(path)
        probs = keras.ops.convert_to_numpy(model(x, training=False))
        lka = next(l for l in model._flatten_layers() if isinstance(l, LargeKernelAttention))
        x_in = np.asarray(rng.normal(size=(1,) + tuple(lka.input.shape[1:])), "float32")
        if keras.backend.backend() == "jax":
            import jax
            grad = jax.grad(lambda v, t: keras.ops.sum(lka.stateless_call(v, [], t)[0] ** 2), argnums=(0, 1))
            g_weights, g_input = grad([w.value for w in lka.trainable_weights], x_in)
        else:
            import tensorflow as tf
            t = tf.constant(x_in)
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(lka(t) ** 2)
            *g_weights, g_input = tape.gradient(loss, lka.trainable_weights + [t])
        loss = None
        if keras.backend.backend() == "jax":  # the TensorFlow side's training step is tested elsewhere
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
            loss = float(model.train_on_batch(x, y))
        result[name] = {"probs": probs.tolist(), "loss": loss,
                        "grads": [np.asarray(g).tolist() for g in list(g_weights) + [g_input]]}
    with open(out, "w") as f:
        json.dump(result, f)
""")


def _run(run, backend, tmp, weights_dir):
    out = os.path.join(tmp, f"{backend}.json")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    if backend == "jax":  # LLVM's optimisation of XLA's CPU code is most of the compile time (every eager op, the
        # initializers, the train step) and none of what is compared: same HLO, same ops, outputs within 1e-6
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    code, _, stderr = run([sys.executable, "-c", _SCRIPT, out, weights_dir, json.dumps(VARIANTS), json.dumps(THIN),
                           str(SIZE)], env=env, timeout=400)
    assert code == 0, stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def _both(tmp, run):
    weights = os.path.join(tmp, "weights")
    os.makedirs(weights)
    tf_side = _run(run, "tensorflow", tmp, weights)  # writes the weights the JAX process loads
    return tf_side, _run(run, "jax", tmp, weights)


BACKGROUND = BackgroundCheck("jax-backend", _both)  # started by conftest beside the other tests


@pytest.fixture(scope="module")
def both_backends():
    return BACKGROUND.result(timeout=850)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_under_jax_matches_tensorflow(both_backends, variant):
    tf_side, jax_side = both_backends
    assert tf_side["backend"] == "tensorflow" and jax_side["backend"] == "jax"
    a, b = tf_side[variant], jax_side[variant]
    np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-4)
    assert np.isfinite(b["loss"]) and b["loss"] > 0
    names = ["conv0.kernel", "conv0.bias", "conv_spatial.kernel", "conv_spatial.bias", "conv1.kernel", "conv1.bias",
             "input"]
    for name, ga, gb in zip(names, a["grads"], b["grads"]):
        ga, gb = np.asarray(ga), np.asarray(gb)
        np.testing.assert_allclose(gb, ga, atol=1e-4 * max(1.0, np.abs(ga).max()), err_msg=f"d {name}")
