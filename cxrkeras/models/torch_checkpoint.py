"""PyTorch checkpoints in: torchvision / timm ImageNet files and the paper's own modules, mapped tensor by tensor.

Layouts read (after unwrapping fastai's {'model': ..., 'opt': ...}, a {'state_dict': ...} wrapper and a `module.`
prefix): torchvision's `densenet121` (current and legacy `norm.1` keys; timm's `densenet121.tv_in1k` has the same
keys) and `vgg16_bn` (`features.<i>`, `classifier.0/3/6`; timm's `vgg16_bn.tv_in1k`: `pre_logits.*`, `head.fc.*`);
the paper's modules: DenseNet `features.*` + `att_block1..4.*` / `lka.*` + `classifier.*`, VGG `block1..5.<i>.*`
(slices of `vgg16_bn().features`) + `lka1..5.*`, or `features.<i>.*` + `lka.*`, + `classifier.*`; LKA tensors as
`dw_conv1/dw_conv2/pw_conv` (the paper's names) or `conv0/conv_spatial/conv1` (VAN's).

A file without LKA tensors and without a head for this model is a backbone file: it must fill the whole backbone,
its ImageNet classifier is skipped, and the LKA blocks and head keep their initial values (the report says so).
Any other file is a full checkpoint: every tensor must map and every layer must be filled. A tensor that maps to
no layer, a missing tensor or a shape mismatch is an error naming the tensor and the layer.
"""

import os
import re
import zipfile

import numpy as np

from cxrkeras.errors import ConfigError
from cxrkeras.labels import NIH_LABELS, PAPER_LABEL_ORDER
from cxrkeras.models.torch_names import HEAD_PREFIXES, densenet_names, describe_layout, imagenet_head, vgg_names

TORCH_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_EXTENSION = ".safetensors"
BOOKKEEPING = "num_batches_tracked"
# torchvision's DenseNet._load_state_dict: old checkpoints name the dense-layer modules "norm.1", "conv.2", ...
_LEGACY_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                              r"running_var|num_batches_tracked))$")
_MAX_LISTED = 12


def is_pytorch_file(path):
    """True for .pth/.pt/.bin/.ckpt/.safetensors, and for torch.save's zip format under any other name."""
    lower = os.fspath(path).lower()
    if lower.endswith(TORCH_EXTENSIONS + (SAFETENSORS_EXTENSION,)):
        return True
    if lower.endswith((".keras", ".h5")) or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/data.pkl") for name in z.namelist())


# --- reading ---

def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("reading a PyTorch .pth/.pt/.bin checkpoint needs torch, which is not installed: "
                          "`pip install torch` (CPU build: `pip install torch --index-url "
                          "https://download.pytorch.org/whl/cpu`), or convert the file once on a machine that has "
                          "torch: `cxrkeras convert-weights FILE --variant V --out FILE.h5`, then pass the .h5; "
                          ".safetensors files need no torch") from None
    return torch


def _to_numpy(value, torch):
    t = value.detach().cpu()
    return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).numpy()  # NumPy has no bfloat16


def _read_torch(path):
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle errors come in many types)
        raise ConfigError(f"cannot read PyTorch checkpoint {path}: {exc}. Only tensors, dicts and plain values are "
                          "read (torch.load(weights_only=True)); save `model.state_dict()` (fastai: `learn.save`), "
                          "not a whole pickled model or Learner") from exc
    return obj, torch


def _unwrap(obj, path, notes):
    """The state_dict inside fastai's {'model', 'opt'} files or a {'state_dict': ...} wrapper."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        extra = sorted(k for k in obj if k != "model")
        notes.append("fastai file: read its 'model' state_dict" + (f"; ignored {', '.join(map(str, extra))} "
                                                                   "(optimizer state)" if extra else ""))
        return obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        notes.append("read the checkpoint's 'state_dict' entry")
        return obj["state_dict"]
    if isinstance(obj, dict):
        return obj
    raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors): save "
                      "`model.state_dict()` with torch.save")


def read_checkpoint(path):
    """({tensor name: NumPy array}, notes) of a PyTorch checkpoint or safetensors file, unwrapped and renamed."""
    path = os.fspath(path)
    notes = []
    if path.lower().endswith(SAFETENSORS_EXTENSION):
        from safetensors.numpy import load_file

        try:
            state = load_file(path)
        except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types)
            raise ConfigError(f"cannot read safetensors file {path}: {exc}") from exc
        state = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in state.items()}
    else:
        obj, torch = _read_torch(path)
        raw = _unwrap(obj, path, notes)
        state = {}
        for key, value in raw.items():
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor: the file is not "
                                  "a model state_dict")
            state[str(key)] = _to_numpy(value, torch)
    if not state:
        raise ConfigError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("stripped the 'module.' prefix (a DataParallel model)")
    renamed = {}
    for key in list(state):
        match = _LEGACY_DENSENET.match(key)
        if match:
            renamed[match.group(1) + match.group(2)] = state.pop(key)
    if renamed:
        state.update(renamed)
        notes.append(f"renamed {len(renamed)} legacy DenseNet keys (e.g. 'norm.1' -> 'norm1'), as torchvision does")
    return dict(sorted(state.items())), notes


# --- mapping ---

def _target(model, layer_name, sub):
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        return None
    return getattr(layer, sub, None) if sub else layer


def _expected_params(layer):
    import keras

    if isinstance(layer, keras.layers.BatchNormalization):
        return ["weight", "bias", "running_mean", "running_var"]
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        return ["weight"] + (["bias"] if layer.use_bias else [])
    raise ConfigError(f"layer {layer.name} ({type(layer).__name__}) cannot be loaded from a PyTorch checkpoint")


def _to_keras(layer, name, array):
    """A PyTorch tensor in the Keras variable layout of `layer` (conv OIHW -> HWIO, depthwise -> HWC1, dense -> IO)."""
    import keras

    if name == "weight" and isinstance(layer, keras.layers.DepthwiseConv2D) and array.ndim == 4:
        return array.transpose(2, 3, 0, 1)
    if name == "weight" and isinstance(layer, keras.layers.Conv2D) and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if name == "weight" and isinstance(layer, keras.layers.Dense) and array.ndim == 2:
        return array.T
    return array


def _label_order(weights_labels, layout_is_paper, num_outputs):
    if weights_labels is None:
        return list(PAPER_LABEL_ORDER) if layout_is_paper and num_outputs == len(PAPER_LABEL_ORDER) else None
    if isinstance(weights_labels, str):
        presets = {"paper": PAPER_LABEL_ORDER, "nih": NIH_LABELS}
        if weights_labels.lower() in presets:
            return list(presets[weights_labels.lower()])
        weights_labels = [n.strip() for n in weights_labels.split(",") if n.strip()]
    return [str(n) for n in weights_labels]


def _group(state):
    """{module prefix: {param name: array}}; num_batches_tracked counters dropped (counted)."""
    groups, counters = {}, 0
    for key, value in state.items():
        prefix, _, param = key.rpartition(".")
        if param == BOOKKEEPING:
            counters += 1
            continue
        groups.setdefault(prefix, {})[param] = value
    return groups, counters


def map_state_dict(model, state, variant, source, weights_labels=None):
    """Plan the assignment of `state` to `model` without assigning anything: (list of (layer, arrays), report)."""
    from cxrkeras.models.build import model_info
    from cxrkeras.models.densenet import DENSENET121_BLOCKS
    from cxrkeras.models.vgg import VGG16_BLOCKS

    from cxrkeras.models.lka import LargeKernelAttention

    if variant.backbone not in ("densenet121", "vgg16"):
        raise ConfigError(f"PyTorch checkpoints map onto DenseNet121 and VGG16 variants, not {variant.name}: give it "
                          "keras.applications' weights (weights='imagenet') or a Keras file (.keras / .h5)")
    info = model_info(model)
    if variant.backbone == "densenet121":
        names = densenet_names(tuple((info.get("build_args") or {}).get("blocks") or DENSENET121_BLOCKS))
    else:
        names = vgg_names(VGG16_BLOCKS, variant.batch_norm)
    by_prefix = {p: target for target, candidates in names.items() for p in candidates}
    groups, counters = _group(state)
    labels = list(info["labels"])
    layout = describe_layout(set(groups), variant.backbone)
    paper_layout = any(re.match(r"^(att_block\d|lka\d?|block\d)(\.|$)", p) for p in groups)
    lka_names = [layer.name for layer in model.layers if isinstance(layer, LargeKernelAttention)]

    problems, skipped_head, plan, absent = [], [], {}, {}
    for prefix, params in groups.items():
        if imagenet_head(prefix, params, len(labels), groups):
            skipped_head.append(prefix)
            continue
        target = by_prefix.get(prefix)
        if target is None:
            hint = (" (the file has batch-norm tensors: use a VGG16-BN variant)"
                    if "running_mean" in params and not variant.batch_norm else "")
            problems.append(f"tensors {prefix}.{{{','.join(sorted(params))}}} map to no layer of {variant.backbone}"
                            f"{hint}")
            continue
        layer_name, sub = target
        where = f"{layer_name}/{sub}" if sub else layer_name
        layer = _target(model, layer_name, sub)
        if layer is None:
            absent.setdefault(layer_name, prefix.rsplit(".", 1)[0] if sub else prefix)
            continue
        expected = _expected_params(layer)
        missing, extra = [p for p in expected if p not in params], sorted(set(params) - set(expected))
        if missing or extra:
            problems.append(f"layer {where} takes {', '.join(f'{prefix}.{p}' for p in expected)}"
                            + (f"; the file lacks {', '.join(f'{prefix}.{p}' for p in missing)}" if missing else "")
                            + (f"; unexpected {', '.join(f'{prefix}.{p}' for p in extra)}" if extra else ""))
            continue
        arrays = [_to_keras(layer, p, params[p]) for p in expected]
        misfits = [f"{prefix}.{p} {tuple(params[p].shape)}" for p, array, weight in zip(expected, arrays, layer.weights)
                   if tuple(array.shape) != tuple(weight.shape)]
        if misfits:
            needs = ", ".join(str(tuple(w.shape)) for w in layer.weights)
            verb = "do" if len(misfits) > 1 else "does"
            problems.append(f"tensor {', '.join(misfits)} {verb} not fit layer {where} (it needs {needs} in Keras "
                            "layout)")
        if where in plan:
            problems.append(f"layer {where} is given twice: by {plan[where][0]}.* and by {prefix}.*")
        plan[where] = (prefix, layer, arrays)

    problems += [f"tensors {module}.* belong to layer {layer_name}, which model {model.name} does not have (its LKA "
                 f"blocks: {', '.join(lka_names) or 'none'})" for layer_name, module in absent.items()]
    notes, order = [], None
    if "predictions" in plan and not problems:
        kernel, bias = plan["predictions"][2]
        order = _label_order(weights_labels, paper_layout, kernel.shape[1])
        if order is not None and sorted(order) != sorted(labels):
            problems.append(f"the checkpoint's outputs are in the order {order}, which is not an order of the "
                            f"model's labels {labels}: pass weights_labels (the file's output order) or label_names")
        elif order is not None and order != labels:
            perm = [order.index(label) for label in labels]
            plan["predictions"][2][:] = [kernel[:, perm], bias[perm]]
            notes.append("head outputs reordered from the checkpoint's label order"
                         + (" (the paper's code: PAPER_LABEL_ORDER)" if order == list(PAPER_LABEL_ORDER) else "")
                         + " to the model's")
        elif order is None:
            notes.append("head outputs taken in the file's order as the model's labels; pass weights_labels if "
                         "the file's outputs are in another order")
    elif weights_labels is not None and "predictions" not in plan:
        notes.append("weights_labels ignored: the file has no head for this model")
    if problems:
        listing = "; ".join(problems[:_MAX_LISTED]) + (f"; ... ({len(problems)} problems in all)"
                                                       if len(problems) > _MAX_LISTED else "")
        raise ConfigError(f"weights file {source} ({layout}) does not fit model {model.name}: {listing}")

    # Full: LKA tensors, or a head of this model's size that is not ImageNet's 1000 classes.
    full = any("/" in where for where in plan) or ("predictions" in plan and plan["predictions"][2][1].shape[0] != 1000)
    unfilled = [name for name in _all_targets(model) if name not in plan]
    if full and unfilled:
        raise ConfigError(f"weights file {source} ({layout}) is a full checkpoint (it has LKA or head tensors) but "
                          f"has nothing for layers {_listing(unfilled)} of model {model.name}: build the variant "
                          "and placement it was saved from")
    new_layers = _new_layers(model)
    backbone_missing = [name for name in unfilled if name.split("/")[0] not in new_layers]
    if backbone_missing:
        raise ConfigError(f"weights file {source} ({layout}) lacks backbone layers of model {model.name}: "
                          f"{_listing(backbone_missing)}")
    report = dict(source=os.path.basename(os.fspath(source)), layout=layout, kind="full" if full else "backbone",
                  tensors=len(state), mapped=sum(len(arrays) for _, _, arrays in plan.values()),
                  layers=sorted({where.split("/")[0] for where in plan}),
                  kept_initial=sorted({name.split("/")[0] for name in unfilled}, key=_model_order(model)),
                  skipped_head=sorted(skipped_head), counters=counters, notes=notes,
                  skipped_head_tensors=sum(len(groups[p]) for p in skipped_head),
                  mapping=[(prefix, where) for where, (prefix, _, _) in plan.items()])
    return [(layer, arrays) for _, layer, arrays in plan.values()], report


def _listing(names):
    return ", ".join(names[:_MAX_LISTED]) + (f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _model_order(model):
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    return lambda name: index.get(name, len(index))


def _new_layers(model):
    """Layers a backbone file never fills: the LKA blocks, attention gates, patient branch and head."""
    from cxrkeras.models.parts import added_layers

    return set(added_layers(model)) | {"predictions"}


def _all_targets(model):
    """Everything that has weights: top-level layers, and LKA blocks as <lka>/conv0, /conv_spatial, /conv1 (+ VAN's)."""
    from cxrkeras.models.lka import LargeKernelAttention

    out = []
    for layer in model.layers:
        if isinstance(layer, LargeKernelAttention):
            out += [f"{layer.name}/{s}" for s in ("conv0", "conv_spatial", "conv1", "proj_1", "proj_2")
                    if hasattr(layer, s)]
        elif layer.weights:
            out.append(layer.name)
    return out


# --- loading, reporting, converting ---

def load_torch_checkpoint(model, path, variant, weights_labels=None, state=None, notes=()):
    """Map a PyTorch checkpoint onto `model` (all or nothing) and return the report (`format_report` prints it)."""
    from cxrkeras.models.build import model_info

    if state is None:
        state, notes = read_checkpoint(path)
    plan, report = map_state_dict(model, state, variant, path, weights_labels)
    report["notes"] = list(notes) + report["notes"]
    if model_info(model)["preprocessing"] != "torch":
        report["notes"].append(f"PyTorch weights expect ImageNet mean/std RGB input, but this model uses "
                               f"{model_info(model)['preprocessing']!r} preprocessing: build it with "
                               "preprocessing='torch'")
    for layer, arrays in plan:
        layer.set_weights([np.asarray(a, dtype=w.dtype) for a, w in zip(arrays, layer.weights)])
    return report


def format_report(report):
    """The mapping summary as lines of text (printed by `cxrkeras convert-weights`, logged by build_model)."""
    lines = [f"source: {report['source']} ({report['layout']})",
             f"mapped: {report['mapped']} of {report['tensors']} tensors onto {len(report['layers'])} layers"]
    if report["kind"] == "backbone":
        lines.append("backbone-only file: the backbone is filled; kept initial values for "
                     + (", ".join(report["kept_initial"]) or "nothing"))
    else:
        lines.append("full checkpoint: every layer filled, every tensor used")
    skipped = []
    if report["skipped_head"]:
        skipped.append(f"{report['skipped_head_tensors']} tensors of the ImageNet classifier "
                       f"({', '.join(report['skipped_head'])})")
    if report["counters"]:
        skipped.append(f"{report['counters']} num_batches_tracked counters")
    if skipped:
        lines.append("not used: " + "; ".join(skipped))
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _head_outputs(state):
    """Outputs of the file's own classifier (None for none, or for ImageNet's 1000)."""
    for key in (f"{p}.weight" for p in HEAD_PREFIXES):
        weight = state.get(key)
        if weight is not None and weight.ndim == 2 and weight.shape[0] != 1000:
            return int(weight.shape[0])
    return None


def convert_weights(src, variant, out, num_classes=None, label_names=None, weights_labels=None, **overrides):
    """Convert a PyTorch checkpoint once into a Keras weights file (legacy .h5, loaded by layer name, no torch needed).

    The file holds the layers the checkpoint filled (a backbone file: the backbone only, so it initialises any
    variant of that backbone), the source's name, sha256 and layout, and the label order of a converted head.
    num_classes: default, the checkpoint's head size (14 for a backbone file). Returns the mapping report.
    """
    from cxrkeras.hashing import sha256_file
    from cxrkeras.models.build import build_model, build_options
    from cxrkeras.models.registry import get_variant
    from cxrkeras.models.weights import read_legacy_h5, write_legacy_h5

    spec = get_variant(variant)
    src, out = os.fspath(src), os.fspath(out)
    if not os.path.isfile(src):
        raise ConfigError(f"checkpoint {src} not found")
    if not is_pytorch_file(src):
        raise ConfigError(f"{src} is not a PyTorch checkpoint (.pth/.pt/.bin/.ckpt or .safetensors)")
    if not out.endswith(".h5") or out.endswith(".weights.h5"):
        raise ConfigError(f"--out {out}: give a NAME.h5 file (Keras weights by layer name, as keras.applications "
                          "writes them; not .weights.h5, which fits only one exact architecture)")
    if os.path.abspath(out) == os.path.abspath(src):
        raise ConfigError("--out must differ from the checkpoint")
    state, notes = read_checkpoint(src)
    if num_classes is None:
        num_classes = _head_outputs(state) or (len(label_names) if label_names else len(NIH_LABELS))
    model = build_model(spec.name, num_classes=num_classes, input_shape=(32, 32, 3), label_names=label_names,
                        **build_options(spec.name, src, **overrides))
    report = load_torch_checkpoint(model, src, spec, weights_labels, state, notes)
    from cxrkeras.models.build import model_info

    layers = [layer for layer in model.layers if layer.name in set(report["layers"])]
    attrs = dict(cxrkeras_origin="torch", cxrkeras_variant=spec.name, cxrkeras_kind=report["kind"],
                 cxrkeras_source=report["source"], cxrkeras_source_sha256=sha256_file(src),
                 cxrkeras_layout=report["layout"])
    if "predictions" in report["layers"]:
        attrs["cxrkeras_labels"] = list(model_info(model)["labels"])
    write_legacy_h5(out, layers, attrs)
    written = read_legacy_h5(out)
    for layer in layers:  # read back: the file holds exactly what the model was given
        if not all(np.array_equal(a, b) for a, b in zip(written[layer.name], layer.get_weights())):
            raise ConfigError(f"{out}: layer {layer.name} reads back different values; the disk may be full")
    report.update(out=out, num_classes=num_classes, sha256=attrs["cxrkeras_source_sha256"])
    return report
