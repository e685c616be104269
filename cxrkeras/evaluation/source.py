"""Former home of the run loader, kept as an alias: `cxrkeras.runs` owns `ModelSource` and `load_source`."""

from cxrkeras.runs import EVALUATION_DIR, ModelSource, as_float32, load_keras_model, load_source  # noqa: F401

resolve = load_source
