"""`build_model(variant, ...)` and `model_info(model)`: the models package's public entry points."""

import keras

from cxrkeras.errors import ConfigError, CxrError
from cxrkeras.labels import NIH_LABELS
from cxrkeras.models import densenet, vgg
from cxrkeras.models.head import MultiLabelDense, apply_head
from cxrkeras.models.lka import FORMS
from cxrkeras.models.registry import get_variant

OVERRIDES = ("lka_blocks", "lka_form", "dropout", "width_multiplier", "blocks", "name")
DEFAULT_DROPOUT = 0.2  # the paper gives no rate; 0.2 is the common CheXNet-style choice


def _check_input_shape(input_shape, variant, minimum):
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise ConfigError(f"input_shape must be (height, width, channels), got {input_shape!r}") from None
    if len(shape) != 3 or shape[2] < 1:
        raise ConfigError(f"input_shape must be (height, width, channels) with channels >= 1, got {input_shape!r}")
    if min(shape[:2]) < minimum:
        raise ConfigError(f"input size {shape[0]}x{shape[1]} is too small for {variant.name}: "
                          f"{variant.backbone} needs at least {minimum}x{minimum} pixels")
    return shape


def _labels(num_classes, label_names):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if label_names is None:
        return list(NIH_LABELS) if num_classes == len(NIH_LABELS) else [f"class_{i}" for i in range(num_classes)]
    label_names = [str(n) for n in label_names]
    if len(label_names) != num_classes:
        raise ConfigError(f"num_classes={num_classes} but {len(label_names)} label names were given")
    if len(set(label_names)) != len(label_names):
        raise ConfigError(f"label names must be unique, got {label_names}")
    return label_names


def build_model(variant, num_classes=14, weights=None, input_shape=(224, 224, 3), label_names=None, **overrides):
    """Build a registered variant as a functional keras.Model ending in a sigmoid layer named "predictions".

    overrides: lka_blocks ("none" | "after" | "last2"/"last3" | "full" | list of block numbers and/or "after"),
    lka_form ("lka" the paper's | "van"), dropout (head rate, default 0.2), width_multiplier (thin test models),
    blocks (DenseNet layers per dense block), name (model name).
    weights: None, "imagenet" (DenseNet121 and plain VGG16) or a local .keras / .weights.h5 / .h5 file.
    """
    spec = get_variant(variant)
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown build_model option(s) {', '.join(unknown)}; valid: {', '.join(OVERRIDES)}")
    labels = _labels(num_classes, label_names)
    lka_blocks = overrides.get("lka_blocks", spec.lka_blocks)
    lka_form = overrides.get("lka_form", "lka")
    if lka_form not in FORMS:
        raise ConfigError(f"unknown lka_form {lka_form!r}; valid: {', '.join(FORMS)}")
    dropout = float(overrides.get("dropout", DEFAULT_DROPOUT))
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    width = float(overrides.get("width_multiplier", 1.0))
    if not 0.0 < width <= 4.0:
        raise ConfigError(f"width_multiplier must be in (0, 4], got {width}")
    blocks = overrides.get("blocks")
    if blocks is not None and spec.backbone != "densenet121":
        raise ConfigError(f"option 'blocks' applies to DenseNet variants only, not {spec.name}")

    module = densenet if spec.backbone == "densenet121" else vgg
    shape = _check_input_shape(input_shape, spec, module.MIN_INPUT_SIZE)
    inputs = keras.Input(shape=shape, name="image")
    if spec.backbone == "densenet121":
        blocks = tuple(int(b) for b in (blocks or densenet.DENSENET121_BLOCKS))
        if len(blocks) != 4 or min(blocks) < 1:
            raise ConfigError(f"blocks must be four positive layer counts, got {blocks!r}")
        x, feature_layer = densenet.apply_densenet_features(
            inputs, lka_blocks, lka_form, blocks=blocks, growth_rate=max(1, round(32 * width)),
            stem_filters=max(1, round(64 * width)))
    else:
        x, feature_layer = vgg.apply_vgg_features(inputs, lka_blocks, lka_form, batch_norm=spec.batch_norm,
                                                  width_multiplier=width)
    build_args = dict(lka_blocks=list(lka_blocks) if not isinstance(lka_blocks, str) else lka_blocks,
                      lka_form=lka_form, dropout=dropout, width_multiplier=width,
                      blocks=list(blocks) if blocks else None)
    metadata = dict(labels=labels, variant=spec.name, preprocessing=spec.preprocessing,
                    feature_layer=feature_layer, build_args=build_args)
    outputs = apply_head(x, len(labels), dropout, metadata)
    model = keras.Model(inputs, outputs, name=overrides.get("name") or spec.name.replace("-", "_"))
    if weights is not None:
        from cxrkeras.models.weights import load_weights

        load_weights(model, weights, spec, imagenet_ok=(width == 1.0 and blocks in (None, densenet.DENSENET121_BLOCKS)
                                                      and shape[2] == 3))
    return model


def model_info(model):
    """dict(variant, labels, preprocessing, feature_layer, input_shape) of a model made by build_model.

    Works on a model reloaded from .keras: everything is read from its "predictions" layer's config.
    """
    try:
        head = model.get_layer("predictions")
    except ValueError:
        head = None
    if not isinstance(head, MultiLabelDense):
        raise CxrError(f"model {getattr(model, 'name', model)!r} was not built by cxrkeras.models.build_model "
                       "(no MultiLabelDense layer named 'predictions'); rebuild it with build_model")
    return dict(variant=head.variant, labels=list(head.labels), preprocessing=head.preprocessing,
                feature_layer=head.feature_layer, input_shape=tuple(model.input_shape[1:]),
                build_args=dict(head.build_args))
