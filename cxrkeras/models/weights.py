"""Initial weights for build_model: named ImageNet files, PyTorch checkpoints, or local Keras files; their origin.

The origin of the initial weights ("keras": keras.applications files; "torch": torchvision, timm, the paper's
checkpoints) decides the defaults a model is built with: batch-norm epsilon / momentum (1.001e-5 / 0.99 for
keras.applications' DenseNet121, PyTorch's 1e-5 / 0.1, i.e. Keras momentum 0.9, otherwise) and, for VGG16, the
input preprocessing ("caffe" for keras.applications' plain VGG16, "torch" = ImageNet mean/std RGB otherwise).
"""

import json
import os
import re
import warnings
import zipfile

import numpy as np

from cxrkeras.errors import ConfigError, CxrError

_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
_HF = "https://huggingface.co/timm/"
# (file name in ~/.keras/models, URL, published hash): keras.applications' include_top=False files (md5), and
# torchvision's ImageNet weights as timm republished them in safetensors (sha256 of the Hub's LFS object), so
# that no torch is needed to read them.
IMAGENET_FILES = {
    ("densenet121", "keras"): ("densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               _BASE + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                               "30ee3e1110167f948a6b9946edeeb738"),
    ("vgg16", "keras"): ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         _BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                         "6d6bbae143d832006294945121d1f1fc"),
    ("resnet50", "keras"): ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            _BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                            "4d473c1dd8becc155b73f8504c6f6626"),
    ("efficientnetb2", "keras"): ("efficientnetb2_notop.h5",
                                  "https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5",
                                  "111f8e2ac8aa800a7a99e3239f7bfb39"),
    ("densenet121", "torchvision"): (
        "timm_densenet121.tv_in1k.safetensors", _HF + "densenet121.tv_in1k/resolve/main/model.safetensors",
        "c894c6d9caa317a8ca1942986dee7a16a86c77734a4d691d2abe05389cfef358"),
    ("vgg16_bn", "torchvision"): (
        "timm_vgg16_bn.tv_in1k.safetensors",
        _HF + "vgg16_bn.tv_in1k/resolve/e00c01e7cee168262dcba6428dc4a8f41e27e965/model.safetensors",
        "88bbedbc8e780413736db38ac4efd41b06fc0e93fd5b8879b584bba63a950129"),
}
# torchvision's own .pth files (they need torch to read); the hex in the name is the start of their sha256.
TORCHVISION_PTH = {"densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
                   "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"}
NAMED = ("imagenet", "torchvision")
_TORCHVISION_NAME = re.compile(r"^[A-Za-z0-9_]+-([0-9a-f]{8,64})\.pth$")
KERAS_BN = dict(bn_epsilon=1.001e-5, bn_momentum=0.99)  # keras.applications' DenseNet121 and ResNet50
KERAS_ONLY = ("vgg16", "resnet50", "efficientnetb2")  # only keras.applications publishes their ImageNet weights
CAFFE = ("vgg16", "resnet50")  # of those, the ones whose files expect caffe input (EfficientNet's: ImageNet mean/std)
EFFICIENTNET_BN = dict(bn_epsilon=1e-3, bn_momentum=0.99)  # keras.applications' EfficientNet (Keras' defaults)
TORCH_BN = dict(bn_epsilon=1e-5, bn_momentum=0.9)  # PyTorch's BatchNorm2d defaults (momentum 0.1)


def _family(variant):
    return "vgg16_bn" if variant.backbone == "vgg16" and variant.batch_norm else variant.backbone


def _source(variant, weights):
    """("keras" | "torchvision") file a named weights value stands for."""
    if weights == "imagenet":
        return variant.imagenet_source
    if (_family(variant), "torchvision") not in IMAGENET_FILES:
        raise ConfigError(f"weights='torchvision' is for DenseNet121 and VGG16-BN variants, not {variant.name}: "
                          f"use weights='imagenet' (keras.applications' {variant.backbone.upper()} file)"
                          + (" or a vgg16-bn variant" if variant.backbone == "vgg16" else ""))
    return "torchvision"


def _local_path(weights):
    """The weights value as an existing local file path, else None."""
    if weights is None or weights in NAMED:
        return None
    path = os.fspath(weights)
    return path if os.path.isfile(path) else None


def weights_origin(variant, weights):
    """"keras" or "torch": who made the initial weights (a cxrkeras file's own record where it has one)."""
    from cxrkeras.models.torch_checkpoint import is_pytorch_file

    if weights in NAMED:
        return "keras" if _source(variant, weights) == "keras" else "torch"
    path = _local_path(weights)
    if path is None or path.endswith(".weights.h5"):  # no file (load_weights reports it), or no record in it
        return "keras" if _family(variant) in KERAS_ONLY else "torch"
    if is_pytorch_file(path):
        return "torch"
    if zipfile.is_zipfile(path):
        return _keras_file_settings(path).get("origin", "keras")
    return _h5_attrs(path).get("cxrkeras_origin", "keras")


def origin_defaults(variant, weights):
    """{preprocessing, bn_epsilon, bn_momentum} a model with these initial weights is built with by default (the
    batch-norm keys only where the variant has batch norm); a .keras file's own settings where it records them."""
    from cxrkeras.models.torch_checkpoint import is_pytorch_file

    origin = weights_origin(variant, weights)
    out = dict(preprocessing="caffe" if _family(variant) in CAFFE and origin == "keras" else "torch")
    if variant.backbone == "efficientnetb2":
        out.update(EFFICIENTNET_BN if origin == "keras" else TORCH_BN)
    elif variant.backbone in ("densenet121", "resnet50") or variant.batch_norm:
        out.update(KERAS_BN if variant.backbone in ("densenet121", "resnet50") and origin == "keras" else TORCH_BN)
    path = _local_path(weights)
    if path and zipfile.is_zipfile(path) and not is_pytorch_file(path):
        own = _keras_file_settings(path)
        out.update({k: own[k] for k in out if own.get(k) is not None})
    return out


def _keras_file_settings(path):
    """{origin, preprocessing, bn_epsilon, bn_momentum} recorded in a .keras file's config.json (those found)."""
    from cxrkeras.models.keras_file import batch_norm_settings, head_config, read_keras_config

    try:
        config = read_keras_config(path)
    except CxrError:
        return {}
    found = dict(batch_norm_settings(config))
    head = head_config(config) or {}
    if head.get("preprocessing"):
        found["preprocessing"] = head["preprocessing"]
    if found.get("bn_epsilon") is not None:
        found["origin"] = "torch" if abs(float(found["bn_epsilon"]) - 1e-5) < 1e-9 else "keras"
    return found


def _h5_attrs(path):
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _decode(v) if isinstance(v, (bytes, str)) else v for k, v in f.attrs.items()}
    except OSError:
        return {}


def load_weights(model, weights, variant, imagenet_ok=True, weights_labels=None):
    """Load `weights` into `model`; raise ConfigError naming the tensors/layers that do not fit. Returns a report."""
    from cxrkeras.models.torch_checkpoint import is_pytorch_file, load_torch_checkpoint

    if weights in NAMED:
        source = _source(variant, weights)
        path = _imagenet_file(variant, source, imagenet_ok)
        if source == "keras":
            return assign_by_name(model, read_legacy_h5(path), path, strict_missing=False)
        return load_torch_checkpoint(model, path, variant)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path} not found: pass None, 'imagenet', 'torchvision' or the path of a "
                          "local .keras / .h5 / .weights.h5 file or a PyTorch checkpoint (.pth/.pt/.bin/.safetensors)")
    if is_pytorch_file(path):
        _check_torchvision_hash(path)
        return load_torch_checkpoint(model, path, variant, weights_labels)
    if weights_labels is not None:
        raise ConfigError("weights_labels is for PyTorch checkpoints; a Keras file's head is loaded as saved")
    if zipfile.is_zipfile(path):
        return assign_by_name(model, read_keras_file(path), path)
    if path.endswith(".weights.h5"):
        return _load_keras3_weights(model, path)
    attrs = _h5_attrs(path)
    arrays = _reorder_head(model, read_legacy_h5(path), attrs, path)
    return assign_by_name(model, arrays, path, strict_missing=attrs.get("cxrkeras_kind") == "full")


def _reorder_head(model, arrays, attrs, path):
    """A converted file records its head's label order: permute it to the model's, or refuse other labels."""
    if "cxrkeras_labels" not in attrs or "predictions" not in arrays:
        return arrays
    from cxrkeras.models.build import model_info

    file_labels, labels = list(json.loads(attrs["cxrkeras_labels"])), list(model_info(model)["labels"])
    if file_labels == labels:
        return arrays
    if sorted(file_labels) != sorted(labels):
        raise ConfigError(f"weights file {path} has a head for labels {file_labels}, the model has {labels}: build "
                          "the model with those label_names")
    perm = [file_labels.index(label) for label in labels]
    kernel, bias = arrays["predictions"]
    return {**arrays, "predictions": [kernel[:, perm], bias[perm]]}


def summary(report):
    """One text for any load report: a PyTorch mapping summary, or what a Keras file filled and left."""
    if "layout" in report:
        from cxrkeras.models.torch_checkpoint import format_report

        return format_report(report)
    return (f"weights: {len(report['loaded'])} layers from {os.path.basename(report['source'])}; kept initial "
            f"values for {', '.join(report['missing']) or 'nothing'}"
            + (f"; unused in the file: {', '.join(report['unused'][:12])}" if report["unused"] else ""))


def _check_torchvision_hash(path):
    """torchvision names its files NAME-<sha256 prefix>.pth; a file so named must match its prefix."""
    match = _TORCHVISION_NAME.match(os.path.basename(path))
    if not match:
        return
    from cxrkeras.hashing import sha256_file

    digest = sha256_file(path)
    if not digest.startswith(match.group(1)):
        raise ConfigError(f"{path}: its name says sha256 {match.group(1)}..., its bytes hash to {digest[:16]}...: "
                          "the download is incomplete or corrupt; download it again")


def _imagenet_file(variant, source, imagenet_ok):
    if not imagenet_ok:
        raise ConfigError(f"ImageNet weights need the full-width {variant.backbone} with 3 input channels; "
                          "drop width_multiplier/blocks overrides and use input_shape=(H, W, 3)")
    key = (_family(variant), source)
    if key not in IMAGENET_FILES:
        raise ConfigError(f"no {source} ImageNet weights for {variant.name}")
    fname, url, file_hash = IMAGENET_FILES[key]
    import keras

    try:
        return keras.utils.get_file(fname, url, cache_subdir="models", file_hash=file_hash)
    except Exception as exc:  # noqa: BLE001  (get_file raises plain Exception for network errors)
        local = (f"weights='/path/to/{fname}'" + (f" (or torchvision's {TORCHVISION_PTH[key[0]]}, which needs torch "
                                                  "to read)" if key[0] in TORCHVISION_PTH else ""))
        raise ConfigError(f"could not download ImageNet weights for {variant.name} from {url} ({exc}); on a machine "
                          f"without internet, copy that file here and pass {local}") from exc


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


def write_legacy_h5(path, layers, attrs=None):
    """Write `layers`' weights as a Keras-2 style .h5 (layer_names / weight_names, as keras.applications' files), so
    that it loads by layer name; `attrs` are stored as file attributes. Written to a temporary file, then renamed."""
    import h5py
    import keras

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"folder {folder} does not exist")
    from cxrkeras.fileio import replacing

    try:
        with replacing(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["layer_names"] = [layer.name.encode() for layer in layers]
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = keras.__version__.encode()
            for key, value in (attrs or {}).items():
                f.attrs[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
            for layer in layers:
                group = f.create_group(layer.name)
                names = [f"{layer.name}/{w.path.split('/', 1)[-1]}" for w in layer.weights]
                group.attrs["weight_names"] = [n.encode() for n in names]
                for name, value in zip(names, layer.get_weights()):
                    group.create_dataset(name, data=value)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return path


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
    return dict(loaded=[layer.name for layer, _ in matched], missing=missing, unused=unused, source=str(source))


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
    return dict(loaded=[layer.name for layer in model.layers if layer.weights], missing=[], unused=[], source=path)


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
