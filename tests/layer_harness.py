"""`run_layer_test`: the keras-hub-style checks every custom layer must pass (config round trip, build, symbolic vs
eager shapes, a training step, dtype policies float32 / mixed_float16 / mixed_bfloat16, .keras round trip)."""

import os
import tempfile

import numpy as np

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def _dtype_name(dtype):
    return str(getattr(dtype, "name", dtype)).replace("tf.", "")


def run_layer_test(layer_cls, init_kwargs, input_data, expected_output_shape, expected_num_trainable_weights=None,
                   run_training_check=True, run_mixed_precision_check=True, output_dtype_policy=None):
    """Build `layer_cls(**init_kwargs)` and check it the way keras-hub's TestCase.run_layer_test does.

    output_dtype_policy: a fixed output dtype the layer keeps under every policy (e.g. "float32" for a head that is
    made float32 on purpose); None: the output follows the policy's compute dtype.
    """
    import keras

    input_data = np.asarray(input_data, dtype="float32")
    input_shape = (None,) + tuple(input_data.shape[1:])

    # config round trip: get_config mirrors __init__, from_config rebuilds the same layer
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():  # every argument comes back from get_config, as given
        assert key in config and config[key] == value, f"get_config() does not mirror {key}={value!r}: {config.get(key)!r}"
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config, "from_config(get_config()) does not give the same config"
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"].startswith("cxrkeras>"), serialized["registered_name"]
    assert type(keras.saving.deserialize_keras_object(serialized)) is layer_cls

    # build: weights exist after build, and calling does not create any (sub-layers are made in __init__/build)
    layer.build(input_shape)
    assert layer.built
    n_weights = len(layer.weights)
    if expected_num_trainable_weights is not None:
        assert len(layer.trainable_weights) == expected_num_trainable_weights, len(layer.trainable_weights)
    eager = layer(input_data)
    assert len(layer.weights) == n_weights, "calling the layer created weights: make sub-layers in __init__/build"

    # symbolic vs eager shapes, and compute_output_shape
    symbolic = layer_cls(**init_kwargs)(keras.KerasTensor(input_shape))
    assert tuple(symbolic.shape) == (None,) + tuple(expected_output_shape[1:]), symbolic.shape
    assert tuple(eager.shape) == tuple(expected_output_shape), eager.shape
    assert tuple(layer.compute_output_shape(input_shape)) == (None,) + tuple(expected_output_shape[1:])
    assert np.isfinite(keras.ops.convert_to_numpy(eager)).all()

    # one training step: a model of this layer alone fits, its loss is finite and its weights move
    if run_training_check:
        inputs = keras.Input(input_shape[1:])
        model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
        target = np.random.default_rng(1).normal(size=expected_output_shape).astype("float32")
        before = [np.array(w) for w in model.trainable_weights]
        loss = model.train_on_batch(input_data, target)
        assert np.isfinite(loss), loss
        assert any(not np.allclose(b, np.array(w)) for b, w in zip(before, model.trainable_weights)), \
            "a training step changed no weight"

        # .keras round trip of the model: same outputs
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "layer.keras")
            model.save(path)
            loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(np.asarray(loaded(input_data)), np.asarray(model(input_data)), atol=1e-5)

    # dtype policies: variables stay float32, the layer (and its sub-layers) compute in the policy's dtype
    if run_mixed_precision_check:
        for policy in POLICIES:
            mixed = layer_cls(**{**init_kwargs, "dtype": policy})
            out = mixed(input_data)
            compute = keras.mixed_precision.DTypePolicy(policy).compute_dtype
            want = output_dtype_policy or compute
            assert _dtype_name(out.dtype) == want, (policy, out.dtype)
            assert all(_dtype_name(w.dtype) == "float32" for w in mixed.weights), policy
            for sub in getattr(mixed, "_layers", []):
                assert sub.compute_dtype == mixed.compute_dtype, (policy, sub.name, sub.compute_dtype)
            assert np.isfinite(np.asarray(keras.ops.cast(out, "float32"))).all(), policy
    return layer
