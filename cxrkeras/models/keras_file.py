"""What a .keras file says about itself, read from its config.json without building the model."""

import json
import zipfile

from cxrkeras.errors import CxrError

HEAD_NAME = "predictions"
HEAD_CLASSES = ("MultiLabelDense", "PyramidSum", "EnsembleAverage")  # the layers carrying HeadMetadata
HEAD_FIELDS = ("variant", "labels", "preprocessing", "feature_layer", "build_args", "preprocessor",
               "patient_features")


def read_keras_config(path):
    """The model config (config.json) of a .keras file; a CxrError for anything else."""
    try:
        with zipfile.ZipFile(path) as zf:
            return json.loads(zf.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CxrError(f"{path}: not a readable .keras model file ({type(exc).__name__}: {exc})") from exc


def _walk(node):
    """Every layer entry ({class_name, config}) of a Keras config, nested models included."""
    if isinstance(node, dict):
        if "class_name" in node and isinstance(node.get("config"), dict):
            yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def head_config(config):
    """The config of the cxrkeras head (the output layer named "predictions" that carries the model's metadata), or
    None. The model's own layers first: an ensemble's members are nested models with heads of their own."""
    own = (config.get("config") or {}).get("layers") if isinstance(config, dict) else None
    for layer in [*(own if isinstance(own, list) else []), *_walk(config)]:
        if isinstance(layer, dict) and str(layer.get("class_name")).endswith(HEAD_CLASSES) and \
                isinstance(layer.get("config"), dict) and layer["config"].get("name") == HEAD_NAME:
            return layer["config"]
    return None


def keras_file_info(path):
    """{variant, labels, preprocessing, feature_layer, build_args, preprocessor, patient_features} of a .keras file, as
    `model_info` would give after loading it; a CxrError for a file not made by cxrkeras."""
    head = head_config(read_keras_config(path))
    if head is None:
        raise CxrError(f"{path}: not a cxrkeras model (no cxrkeras output layer named {HEAD_NAME!r}); build it with "
                       f"cxrkeras")
    info = {key: head.get(key) for key in HEAD_FIELDS}
    info["labels"] = list(info["labels"] or [])
    info["build_args"] = dict(info["build_args"] or {})
    return info


def batch_norm_settings(config):
    """{bn_epsilon, bn_momentum} of the first BatchNormalization layer of a Keras config ({} when it has none)."""
    for layer in _walk(config):
        if layer["class_name"] in ("BatchNormalization", "FusedBatchNormalization"):
            return {"bn_epsilon": layer["config"].get("epsilon"), "bn_momentum": layer["config"].get("momentum")}
    return {}
