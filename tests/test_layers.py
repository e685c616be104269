"""Every custom layer of cxrkeras through `run_layer_test`; the list comes from Keras' registry, so a new layer
that is registered without a case here, or defined without being registered, fails by name."""

import importlib
import inspect
import pkgutil

import keras
import numpy as np
import pytest
from layer_harness import run_layer_test

import cxrkeras


def _import_all_modules():
    """Every cxrkeras module that defines layers (no heavy side effects at import), so their classes register."""
    modules = []
    for info in pkgutil.walk_packages(cxrkeras.__path__, prefix="cxrkeras."):
        if info.name.startswith(("cxrkeras.models", "cxrkeras.explain", "cxrkeras.training")):
            modules.append(importlib.import_module(info.name))
    return modules


MODULES = _import_all_modules()
REGISTERED = {name: cls for name, cls in keras.saving.get_custom_objects().items()
              if name.startswith("cxrkeras>") and isinstance(cls, type) and issubclass(cls, keras.layers.Layer)}

_X = np.random.default_rng(0).normal(size=(2, 9, 7, 6)).astype("float32")
_FEATURES = np.random.default_rng(0).normal(size=(2, 12)).astype("float32")

# registered name -> (init kwargs, input, expected output shape, trainable weights, output dtype under any policy
# [, run_layer_test options])
CASES = {
    "cxrkeras>LargeKernelAttention": [
        (dict(form="lka"), _X, _X.shape, 6, None),
        (dict(form="van"), _X, _X.shape, 10, None),
    ],
    "cxrkeras>MultiLabelDense": [
        (dict(units=3, labels=["a", "b", "c"], variant="densenet121-lka-after", preprocessing="torch",
              feature_layer="lka_after", build_args={"blocks": [1, 1, 1, 1]},
              preprocessor={"image_size": 224, "preprocessing": "torch", "equalize": "clahe",
                            "stored_size": [256, 256], "channels": 1}),
         _FEATURES, (2, 3), 2, None),
    ],
    "cxrkeras>PyramidSum": [
        (dict(units=3, stage_widths=[8, 4], levels=[4, 2], labels=["a", "b", "c"], variant="vgg16-bn",
              preprocessing="torch", feature_layer="block5_conv3_relu",
              build_args={"head": "fpsm", "head_stages": "4+2", "head_merge": "sum"}),
         _FEATURES, (2, 3), 4, None),
        # the dataset embedding's 2 columns appended to both levels (8 + 2 + 2 shared = 12 features)
        (dict(units=3, stage_widths=[8, 2], levels=[4, 2], shared_width=2, labels=["a", "b", "c"],
              build_args={"head": "fpsm", "head_stages": "4+2", "head_dataset_embedding": ["A", "B"]}),
         _FEATURES, (2, 3), 4, None),
    ],
    # fixed weights, nothing to train: the training step's "a weight moved" check does not apply
    "cxrkeras>EnsembleAverage": [
        (dict(units=4, member_weights=[0.25, 0.5, 0.25], labels=["a", "b", "c", "d"], preprocessing="torch",
              build_args={"weighting": "given"}), _FEATURES, (2, 4), 0, None, dict(run_training_check=False)),
    ],
    # training mode runs TensorFlow's fused kernel (the harness's training step), inference Keras' own call
    "cxrkeras>FusedBatchNormalization": [
        (dict(axis=3, epsilon=1e-5, momentum=0.9), _X, _X.shape, 2, None),
    ],
    "cxrkeras>MaskOutput": [
        (dict(filters=1, kernel_size=(1, 1), depth=2, width=4,
              preprocessor={"image_size": 64, "preprocessing": "torch", "equalize": None, "stored_size": None,
                            "channels": 1}),
         _X, (2, 9, 7, 1), 2, None),
    ],
}


def test_every_cxrkeras_layer_is_registered_and_has_a_case():
    defined = {f"{cls.__module__}.{cls.__name__}" for module in MODULES for _, cls in inspect.getmembers(module,
               inspect.isclass) if issubclass(cls, keras.layers.Layer) and cls.__module__.startswith("cxrkeras.")}
    registered = {f"{cls.__module__}.{cls.__name__}" for cls in REGISTERED.values()}
    assert defined - registered == set(), "layers defined but not registered under 'cxrkeras'"
    assert set(REGISTERED) == set(CASES), "registered layers without a run_layer_test case (or stale cases)"


def _params():
    for name in sorted(REGISTERED):
        for i, case in enumerate(CASES.get(name, [])):
            form = case[0].get("form")
            yield pytest.param(name, case, id=name.split(">")[-1] + (f"-{form}" if form else f"-{i}"))


@pytest.mark.parametrize("name, case", list(_params()))
def test_layer(name, case):
    kwargs, x, shape, n_trainable, output_dtype, *options = case
    run_layer_test(REGISTERED[name], kwargs, x, shape, expected_num_trainable_weights=n_trainable,
                   output_dtype_policy=output_dtype, **(options[0] if options else {}))
