"""What Grad-CAM explains: the feature layer (default from model_info) and the class indices (ints or label names)."""

import operator

import numpy as np

from cxrkeras.errors import ConfigError


def _output_rank(layer):
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # layer never called, or several inbound nodes
        return None


def spatial_layers(model):
    """Names of the model's top-level layers whose output is 4-D (batch, height, width, channels): the candidates."""
    return [layer.name for layer in model.layers if _output_rank(layer) == 4]


def _info(model):
    """model_info of a cxrkeras model, {} for a plain Keras model (the caller then searches the graph)."""
    from cxrkeras.models.build import model_info

    return model_info(model, strict=False) or {}


def _candidates_text(names, limit=20):
    if not names:
        return "the model has no layer with a 4-D (batch, height, width, channels) output"
    shown = names[-limit:]
    more = f" (and {len(names) - limit} earlier ones)" if len(names) > limit else ""
    return "layers with spatial outputs, last one first: " + ", ".join(reversed(shown)) + more


def default_layer(model):
    """The recorded feature layer (last LKA output, else last conv block), else the last layer with a 4-D output."""
    from cxrkeras.models.ensemble import ENSEMBLE_VARIANT

    info = _info(model)
    if info.get("variant") == ENSEMBLE_VARIANT:
        raise ConfigError(f"Grad-CAM explains one network's feature map; {model.name!r} is an ensemble (its members "
                          "average their probabilities): explain each member's run instead")
    name = info.get("feature_layer")
    if name:
        return resolve_layer(model, name)
    names = spatial_layers(model)
    if not names:
        raise ConfigError(f"Grad-CAM needs a convolutional feature map, but model {model.name!r} has no layer "
                          "with a 4-D output")
    return names[-1]


def resolve_layer(model, layer_name=None):
    """Check `layer_name` (or pick the default) and return it; the error lists the layers that would work."""
    if layer_name is None:
        return default_layer(model)
    names = [layer.name for layer in model.layers]
    if layer_name not in names:
        raise ConfigError(f"layer {layer_name!r} is not in model {model.name!r}; pass one of the "
                          f"{_candidates_text(spatial_layers(model))}")
    rank = _output_rank(model.get_layer(layer_name))
    if rank != 4:
        raise ConfigError(f"layer {layer_name!r} has no spatial dimensions (output rank {rank}, Grad-CAM needs "
                          "(batch, height, width, channels)); pass one of the "
                          f"{_candidates_text(spatial_layers(model))}")
    return layer_name


def model_labels(model):
    """The label names the model's outputs stand for (from model_info), or None when it does not record them."""
    labels = _info(model).get("labels")
    return list(labels) if labels else None


def resolve_classes(model, class_index, num_outputs):
    """Map an int, a label name or a list of them to a list of output indices; aliases like Infiltrate accepted."""
    from cxrkeras.labels import LABEL_ALIASES

    single = isinstance(class_index, str) or np.ndim(class_index) == 0
    items = [class_index] if single else list(class_index)  # a NumPy array gives NumPy scalars: fine below
    if not items:
        raise ConfigError("no class to explain: pass a class index or a label name")
    labels = None
    out = []
    for item in items:
        if isinstance(item, str):
            if labels is None:
                labels = model_labels(model)
            if labels is None:
                raise ConfigError(f"class {item!r} given by name, but model {model.name!r} records no label "
                                  f"names; pass an output index (0..{num_outputs - 1}) instead")
            name = LABEL_ALIASES.get(item, item)
            if name not in labels:
                raise ConfigError(f"class {item!r} is not one of the model's labels: {', '.join(labels)}")
            out.append(labels.index(name))
        else:
            try:
                idx = operator.index(item)
            except TypeError:
                raise ConfigError(f"class {item!r} is neither an output index nor a label name") from None
            if not 0 <= idx < num_outputs:
                raise ConfigError(f"class index {idx} is out of range: the model has {num_outputs} outputs "
                                  f"(0..{num_outputs - 1})")
            out.append(idx)
    return out, single
