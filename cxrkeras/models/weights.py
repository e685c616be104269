"""Initial weights for build_model: ImageNet (Keras-hosted files) or a local .keras / .weights.h5 / .h5 file."""

import logging
import os
import warnings
import zipfile

import numpy as np

from cxrkeras.errors import ConfigError, CxrError

log = logging.getLogger(__name__)

_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
# (file name, URL, md5) of the include_top=False files keras.applications uses.
IMAGENET_FILES = {
    "densenet121": ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    _BASE + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "30ee3e1110167f948a6b9946edeeb738"),
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              _BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "6d6bbae143d832006294945121d1f1fc"),
}


def load_weights(model, weights, variant, imagenet_ok=True):
    """Load `weights` into `model` by layer name; raise ConfigError naming the layers that do not fit."""
    if weights == "imagenet":
        path = _imagenet_file(variant, imagenet_ok)
        return assign_by_name(model, read_legacy_h5(path), path, strict_missing=False)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path} not found: pass None, 'imagenet' or the path of a local "
                          ".keras / .weights.h5 / .h5 file")
    if zipfile.is_zipfile(path):
        return assign_by_name(model, read_keras_file(path), path)
    if path.endswith(".weights.h5"):
        return _load_keras3_weights(model, path)
    return assign_by_name(model, read_legacy_h5(path), path)


def _imagenet_file(variant, imagenet_ok):
    if not variant.imagenet_available:
        raise ConfigError(f"Keras provides no ImageNet weights for {variant.name} (VGG16 with batch norm): use "
                          "weights=None, a vgg16-plain* variant, or the path of a local weights file "
                          "(e.g. converted from torchvision's vgg16_bn)")
    if not imagenet_ok:
        raise ConfigError(f"ImageNet weights need the full-width {variant.backbone} with 3 input channels; "
                          "drop width_multiplier/blocks overrides and use input_shape=(H, W, 3)")
    fname, url, md5 = IMAGENET_FILES[variant.backbone]
    import keras

    try:
        return keras.utils.get_file(fname, url, cache_subdir="models", file_hash=md5)
    except Exception as exc:  # noqa: BLE001  (get_file raises plain Exception for network errors)
        raise ConfigError(f"could not download ImageNet weights for {variant.name} from {url} ({exc}); on a machine "
                          f"without internet, copy that file here and pass weights='/path/to/{fname}'") from exc


def _decode(value):
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_legacy_h5(path):
    """{layer name: [arrays]} from a Keras 2 style .h5 file (weights-only or full model, as keras.applications')."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
            if "layer_names" not in group.attrs:
                raise ConfigError(f"{path} is not a Keras .h5 weights file (no 'layer_names'); Keras 3 weight "
                                  "files must be named *.weights.h5")
            out = {}
            for name in map(_decode, group.attrs["layer_names"]):
                weight_names = [_decode(w) for w in group[name].attrs.get("weight_names", [])]
                if weight_names:
                    out[name] = [np.asarray(group[name][w]) for w in weight_names]
            return out
    except OSError as exc:
        raise ConfigError(f"cannot read weights file {path}: {exc}") from exc


def read_keras_file(path):
    """{layer name: [arrays]} of every layer (nested models flattened) of a saved .keras model."""
    import keras

    try:
        saved = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001  (any deserialisation failure means the file cannot be used)
        raise ConfigError(f"cannot load model file {path}: {exc}") from exc
    out = {}

    def walk(layers):
        for layer in layers:
            if isinstance(layer, keras.Model):
                walk(layer.layers)
            elif layer.weights:
                out[layer.name] = [np.asarray(w) for w in layer.get_weights()]

    walk(saved.layers)
    return out


def assign_by_name(model, arrays_by_name, source, strict_missing=False):
    """Set each layer's weights from the file's layer of the same name; all-or-nothing.

    Shape mismatches always fail (listed by layer). Layers of the model absent from the file (a new head, new LKA
    blocks) keep their initial values and are logged, unless strict_missing.
    """
    failed, matched, missing = [], [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = arrays_by_name.get(layer.name)
        if arrays is None:
            missing.append(layer.name)
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(a.shape) for a in arrays]
        if expected != got:
            failed.append(f"{layer.name}: model {expected} vs file {got}")
        else:
            matched.append((layer, arrays))
    listing = "; ".join(failed[:20]) + (" ..." if len(failed) > 20 else "")
    if not matched:
        raise ConfigError(f"no layer of weights file {source} fits the model {model.name}: it was made for another "
                          f"architecture (file layers: {', '.join(list(arrays_by_name)[:8])} ...)"
                          + (f"; {len(failed)} layer(s) share a name but not the shapes: {listing}" if failed else ""))
    if failed:
        raise ConfigError(f"weights file {source} does not match the model {model.name}: {len(failed)} layer(s) "
                          f"failed: {listing}")
    if missing and strict_missing:
        raise ConfigError(f"weights file {source} lacks layers {', '.join(missing)} of the model {model.name}")
    for layer, arrays in matched:
        layer.set_weights(arrays)
    unused = sorted(set(arrays_by_name) - {layer.name for layer, _ in matched})
    log.info("loaded %d layers from %s; kept initial values for %s; unused in file: %s", len(matched), source,
             missing or "none", unused or "none")
    return dict(loaded=[layer.name for layer, _ in matched], missing=missing, unused=unused)


def _load_keras3_weights(model, path):
    """Keras 3 .weights.h5 files are addressed by structure, not layer names: the architecture must match."""
    try:
        with warnings.catch_warnings():
            # Keras 3.15 warns about the functional graph's internal bookkeeping container, which holds no weights.
            warnings.filterwarnings("ignore", message="Skipping nested container at '_operations_by_depth")
            model.load_weights(path)
    except Exception as exc:  # noqa: BLE001
        detail = _structure_mismatch(model, path) or str(exc)
        raise ConfigError(f"weights file {path} does not match the model {model.name} (a .weights.h5 file only fits "
                          f"the exact architecture it was saved from; use a .keras file to load by layer name): "
                          f"{detail}") from exc
    return dict(loaded=[layer.name for layer in model.layers if layer.weights], missing=[], unused=[])


def _structure_mismatch(model, path):
    """Name the model layers whose entry in a Keras 3 weights file is absent or has other shapes."""
    import h5py
    from keras.src.utils import naming

    def shapes(group):
        found = []
        group.visititems(lambda _, obj: found.append(tuple(obj.shape)) if isinstance(obj, h5py.Dataset) else None)
        return sorted(found)

    problems, counts = [], {}
    try:
        with h5py.File(path, "r") as f:
            layers_group = f.get("layers", {})
            for layer in model.layers:
                key = naming.to_snake_case(layer.__class__.__name__)
                n = counts.get(key, 0)
                counts[key] = n + 1
                key = key if n == 0 else f"{key}_{n}"
                if not layer.weights:
                    continue
                want = sorted(tuple(w.shape) for w in layer.weights)
                if key not in layers_group:
                    problems.append(f"{layer.name}: not in file")
                elif shapes(layers_group[key]) != want:
                    problems.append(f"{layer.name}: model {want} vs file {shapes(layers_group[key])}")
    except (OSError, CxrError):
        return None
    if not problems:
        return None
    return f"{len(problems)} layer(s) failed: " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else "")
