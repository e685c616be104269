"""`build_model(variant, ...)` and `model_info(model)`: the models package's public entry points."""

import keras

from cxrkeras.errors import ConfigError, CxrError
from cxrkeras.labels import NIH_LABELS
from cxrkeras.models import densenet, efficientnet, fpsm, resnet, vgg
from cxrkeras.models.attention import FEATURE_LAYER as ATTENTION_FEATURE_LAYER
from cxrkeras.models.attention import apply_attention_head, check_attention
from cxrkeras.models.head import HeadMetadata, apply_head
from cxrkeras.models.lka import FORMS
from cxrkeras.models.registry import get_variant

OVERRIDES = ("lka_blocks", "lka_form", "dropout", "width_multiplier", "blocks", "name", "preprocessing", "bn_epsilon",
             "bn_momentum", "final_relu", "attention", "head", "head_stages", "head_merge", "head_dataset_embedding",
             "lstm_units", "attention_heads", "attention_key_dim")
MODULES = {"densenet121": densenet, "vgg16": vgg, "resnet50": resnet, "efficientnetb2": efficientnet}
SEQUENCE_OPTIONS = dict(lstm_units=(256, 4096), attention_heads=(4, 64), attention_key_dim=(64, 1024))  # default, max
IMAGE_INPUT, PATIENT_INPUT = "image", "patient"  # the model's input names
ORIGIN_OPTIONS = ("preprocessing", "bn_epsilon", "bn_momentum")  # None: the default for the initial weights


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


def build_options(variant, weights=None, **overrides):
    """The origin-dependent build_model options (preprocessing, bn_epsilon, bn_momentum) that initial `weights` give
    `variant`, with `overrides` on top. Passing them with weights=None rebuilds the same model, e.g. for stage 2."""
    from cxrkeras.models.weights import origin_defaults

    spec = get_variant(variant)
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown build_model option(s) {', '.join(unknown)}; valid: {', '.join(OVERRIDES)}")
    given = {k: v for k, v in overrides.items() if v is not None or k not in ORIGIN_OPTIONS}
    return {**origin_defaults(spec, weights), **given}


def _sequence_options(spec, options, overrides):
    """{lstm_units, attention_heads, attention_key_dim} of a sequence-head variant, checked; None for the others."""
    given = sorted(k for k in SEQUENCE_OPTIONS if overrides.get(k) is not None)
    if not spec.sequence_head:
        if given:
            raise ConfigError(f"{', '.join(given)}: {spec.name} has no LSTM / attention head (use "
                              "efficientnetb2-lstm-mha)")
        return None
    out = {}
    for key, (default, maximum) in SEQUENCE_OPTIONS.items():
        value = options.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
            raise ConfigError(f"{key} must be an integer in [1, {maximum}], got {value!r}")
        out[key] = value
    return out


def _batch_norm(spec, options, overrides):
    if spec.backbone == "vgg16" and not spec.batch_norm:
        given = sorted(k for k in ("bn_epsilon", "bn_momentum") if k in overrides)
        if given:
            raise ConfigError(f"{', '.join(given)}: {spec.name} has no batch norm (use a vgg16-bn variant)")
        return None
    try:
        epsilon, momentum = float(options["bn_epsilon"]), float(options["bn_momentum"])
    except (TypeError, ValueError):
        raise ConfigError(f"bn_epsilon and bn_momentum must be numbers, got {options['bn_epsilon']!r}, "
                          f"{options['bn_momentum']!r}") from None
    if not 0.0 < epsilon <= 1.0:
        raise ConfigError(f"bn_epsilon must be in (0, 1], got {epsilon}")
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"bn_momentum must be in [0, 1) (Keras' convention: 1 - PyTorch's momentum), got {momentum}")
    return dict(epsilon=epsilon, momentum=momentum)


def build_model(variant, num_classes=14, weights=None, input_shape=(224, 224, 3), label_names=None,
                weights_labels=None, preprocessor=None, patient_features=None, **overrides):
    """Build a registered variant as a functional keras.Model ending in a sigmoid layer named "predictions".

    overrides: lka_blocks ("none" | "after" | "last2"/"last3" | "full" | list of block numbers and/or "after"),
    lka_form ("lka" the paper's | "van"), dropout (head rate; default the variant's: 0.5 as the paper's code for
    its six variants, 0.2 for the baselines), width_multiplier (thin test models), blocks (DenseNet layers per dense
    block), name (model name), preprocessing ("torch" | "caffe"), bn_epsilon / bn_momentum (Keras momentum =
    1 - PyTorch's), final_relu (DenseNet: ReLU after norm5; default for the `densenet121` baseline and the
    attention variants), attention (DenseNet: "none" | "a" | "b", the "learn to pay attention" gates on the
    outputs of transitions 1-3; default the variant's), head ("linear" | "fpsm": the Feature Pyramid Sum head, one
    GAP -> Dense(n) logits per pyramid level, prediction sigmoid(sum of the logits); levels 1-4 are DenseNet's dense
    blocks 1-4, VGG16's blocks 2-5, ResNet-50's stages conv2-conv5, each after its LKA), head_stages (the levels,
    "4+3+2" by default or e.g. "4+3+2+1"), head_merge ("sum" | "concat": one Dense over the concatenated levels),
    head_dataset_embedding (fpsm: the source datasets' names, or their number N: a second input "dataset", the
    int index of each image's source, through a learned Embedding(N, N) appended to each level's features before
    its Dense; training sets the names of the records' manifest),
    lstm_units / attention_heads / attention_key_dim (efficientnetb2-lstm-mha: the LSTM's width and the
    self-attention's heads and key size; 256, 4, 64).
    patient_features: None, True (the study's age normalisation) or a `cxrkeras.data.patient.PatientEncoder` (or its
    config): the model takes a second input "patient" (the encoded age, sex and view, 5 values) through a
    Dense(3) + ReLU branch concatenated before the classifier; the encoder is stored with the model (model_info).
    Defaults of preprocessing and batch norm follow the origin of `weights` (see `build_options`); the choices are
    stored with the model (model_info).
    weights: None; "imagenet" (keras.applications' DenseNet121 / VGG16 files; for VGG16-BN torchvision's
    vgg16_bn); "torchvision" (torchvision's ImageNet DenseNet121 / VGG16-BN, as timm's safetensors: the paper's
    initialisation); a PyTorch checkpoint (.pth/.pt/.bin/.safetensors: torchvision, timm, the paper's modules,
    fastai files); or a local .keras / .h5 (by layer name) / .weights.h5 (same architecture) file.
    weights_labels: the output order of a full PyTorch checkpoint's head (a list, "paper" or "nih"); default: the
    paper's order for files in the paper's layout, else the file's order is taken as `label_names`.
    preprocessor: a `cxrkeras.data.Preprocessor` (or its config) of the data the model is trained on; stored with
    the model (model_info) so that serving and Grad-CAM rebuild the evaluation's preprocessing. Its normalisation
    and image size must be the model's.
    """
    from cxrkeras.data.normalize import check_mode

    spec = get_variant(variant)
    options = build_options(spec.name, weights, **overrides)
    labels = _labels(num_classes, label_names)
    lka_blocks = options.get("lka_blocks", spec.lka_blocks)
    lka_form = options.get("lka_form", "lka")
    if lka_form not in FORMS:
        raise ConfigError(f"unknown lka_form {lka_form!r}; valid: {', '.join(FORMS)}")
    dropout = float(spec.dropout if options.get("dropout") is None else options["dropout"])
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    width = float(options.get("width_multiplier", 1.0))
    if not 0.0 < width <= 4.0:
        raise ConfigError(f"width_multiplier must be in (0, 4], got {width}")
    blocks = options.get("blocks")
    if blocks is not None and spec.backbone != "densenet121":
        raise ConfigError(f"option 'blocks' applies to DenseNet variants only, not {spec.name}")
    if "final_relu" in overrides and spec.backbone != "densenet121":
        raise ConfigError(f"option 'final_relu' applies to DenseNet variants only, not {spec.name}")
    final_relu = options.get("final_relu", spec.final_relu)
    if not isinstance(final_relu, bool):
        raise ConfigError(f"final_relu must be true or false, got {final_relu!r}")
    attention = check_attention(options.get("attention", spec.attention))
    if attention != "none" and spec.backbone != "densenet121":
        raise ConfigError(f"attention gates are defined on DenseNet121's transition outputs, not on {spec.name}: "
                          "use a densenet121 variant")
    preprocessing = check_mode(options["preprocessing"])
    bn = _batch_norm(spec, options, overrides)
    sequence = _sequence_options(spec, options, overrides)
    if spec.backbone == "efficientnetb2" and lka_blocks not in ("none", [], ()):
        raise ConfigError(f"LKA blocks are not placed in {spec.name}: use lka_blocks='none'")
    from cxrkeras.data.patient import PatientEncoder

    encoder = PatientEncoder.of(patient_features)
    head, merge = options.get("head", "linear"), options.get("head_merge", "sum")
    fpsm.check_head(head, merge)
    levels = fpsm.parse_levels(options.get("head_stages", fpsm.DEFAULT_LEVELS)) if head == "fpsm" else None
    if head == "fpsm" and attention != "none":
        raise ConfigError(f"head fpsm replaces the classifier, but the attention gates (attention: {attention}) have "
                          "their own classifier over the attended vectors: use one or the other")
    if head == "fpsm" and encoder:
        raise ConfigError("head fpsm does not take patient features (model.patient_features): use the linear head")
    if head == "fpsm" and spec.backbone == "efficientnetb2":
        raise ConfigError(f"head fpsm is defined on DenseNet121, VGG16 and ResNet-50's stages, not on {spec.name} "
                          "(its head reads the last feature map as a sequence): use the linear head")
    from cxrkeras.data.datasets import embedding_names

    dataset_names = embedding_names(options.get("head_dataset_embedding"))
    if head != "fpsm" and (any(k in overrides for k in ("head_stages", "head_merge")) or dataset_names):
        raise ConfigError("head_stages, head_merge and head_dataset_embedding apply to head: fpsm only")

    module = MODULES[spec.backbone]
    shape = _check_input_shape(input_shape, spec, module.MIN_INPUT_SIZE)
    inputs = keras.Input(shape=shape, name=IMAGE_INPUT)
    if spec.backbone == "densenet121":
        blocks = tuple(int(b) for b in (blocks or densenet.DENSENET121_BLOCKS))
        if len(blocks) != 4 or min(blocks) < 1:
            raise ConfigError(f"blocks must be four positive layer counts, got {blocks!r}")
        x, feature_layer, transitions = densenet.apply_densenet_features(
            inputs, lka_blocks, lka_form, blocks=blocks, growth_rate=max(1, round(32 * width)),
            stem_filters=max(1, round(64 * width)), final_relu=final_relu, bn=bn)
        if attention != "none":  # the classifier sees the attended local features; g only steers the gates
            g = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
            x = apply_attention_head(transitions, g, attention)
            feature_layer = ATTENTION_FEATURE_LAYER
    elif spec.backbone == "efficientnetb2":
        x, feature_layer = efficientnet.apply_efficientnet_features(inputs, width_multiplier=width, bn=bn)
    elif spec.backbone == "resnet50":
        x, feature_layer = resnet.apply_resnet50_features(inputs, lka_blocks, lka_form, width_multiplier=width,
                                                          bn=bn)
    else:
        x, feature_layer = vgg.apply_vgg_features(inputs, lka_blocks, lka_form, batch_norm=spec.batch_norm,
                                                  width_multiplier=width, bn=bn or vgg.TORCH_BN)
    build_args = dict(lka_blocks=list(lka_blocks) if not isinstance(lka_blocks, str) else lka_blocks,
                      lka_form=lka_form, dropout=dropout, width_multiplier=width,
                      blocks=list(blocks) if blocks else None,
                      bn_epsilon=bn and bn["epsilon"], bn_momentum=bn and bn["momentum"],
                      final_relu=final_relu if spec.backbone == "densenet121" else None)
    if attention != "none":
        build_args["attention"] = attention
    if head == "fpsm":
        build_args.update(head=head, head_stages=fpsm.format_levels(levels), head_merge=merge)
        if dataset_names:
            build_args["head_dataset_embedding"] = list(dataset_names)
    if sequence:
        build_args.update(sequence)
        x = efficientnet.apply_sequence_attention(x, sequence["lstm_units"], sequence["attention_heads"],
                                                  sequence["attention_key_dim"])
    metadata = dict(labels=labels, variant=spec.name, preprocessing=preprocessing,
                    feature_layer=feature_layer, build_args=build_args,
                    preprocessor=_preprocessor_config(preprocessor, preprocessing, shape),
                    patient_features=encoder.to_config() if encoder else None)
    patient = keras.Input(shape=(encoder.width,), name=PATIENT_INPUT) if encoder else None
    dataset = keras.Input(shape=(1,), dtype="int32", name=fpsm.DATASET_INPUT) if dataset_names else None
    if head == "fpsm":
        outputs = fpsm.apply_fpsm_head(inputs, x, spec.backbone, levels, merge, len(labels), dropout, metadata,
                                       blocks=blocks, dataset=dataset, n_datasets=len(dataset_names or ()))
    else:
        outputs = apply_head(x, len(labels), dropout, metadata, patient=patient)
    extra = patient if encoder else dataset
    model = keras.Model([inputs, extra] if extra is not None else inputs, outputs,
                        name=options.get("name") or spec.name.replace("-", "_"))
    if weights is not None:
        from cxrkeras.models.weights import load_weights, summary

        report = load_weights(model, weights, spec, weights_labels=weights_labels,
                              imagenet_ok=(width == 1.0 and blocks in (None, densenet.DENSENET121_BLOCKS)
                                           and shape[2] == 3))
        model.weights_report = summary(report)  # what was loaded and what kept its initial values (not saved)
    elif weights_labels is not None:
        raise ConfigError("weights_labels needs weights (a PyTorch checkpoint)")
    return model


def _preprocessor_config(preprocessor, preprocessing, shape):
    """The stored form of `preprocessor`, checked against the model it goes with (None stays None)."""
    if preprocessor is None:
        return None
    from cxrkeras.data.preprocessor import Preprocessor

    if not isinstance(preprocessor, Preprocessor):
        preprocessor = Preprocessor.from_config(dict(preprocessor))
    if preprocessor.preprocessing != preprocessing or (preprocessor.image_size,) * 2 != tuple(shape[:2]):
        raise ConfigError(f"preprocessor ({preprocessor.describe()}) does not fit the model: its input is "
                          f"{shape[0]}x{shape[1]} with {preprocessing} normalisation")
    return preprocessor.to_config()


def model_info(model, strict=True):
    """dict(variant, labels, preprocessing, feature_layer, input_shape, build_args, preprocessor, patient_features,
    datasets)
    of a model made by build_model (preprocessor: its stored Preprocessor config, or None; patient_features: its
    stored PatientEncoder config, or None for an image-only model; datasets: the source dataset names of a model
    with the FPSM dataset embedding (its "dataset" input is their index), else None; input_shape: the image
    input's).

    Works on a model reloaded from .keras: everything is read from its "predictions" layer's config. A model not
    made by build_model raises CxrError, or gives None with strict=False (a plain Keras model in the API).
    """
    try:
        head = model.get_layer("predictions")
    except (ValueError, AttributeError):
        head = None
    if not isinstance(head, HeadMetadata):
        if not strict:
            return None
        raise CxrError(f"model {getattr(model, 'name', model)!r} was not built by cxrkeras.models.build_model "
                       "(no MultiLabelDense layer named 'predictions'); rebuild it with build_model")
    return dict(variant=head.variant, labels=list(head.labels), preprocessing=head.preprocessing,
                feature_layer=head.feature_layer, input_shape=tuple(model.inputs[0].shape[1:]),
                build_args=dict(head.build_args), preprocessor=getattr(head, "preprocessor", None),
                patient_features=getattr(head, "patient_features", None),
                datasets=list(head.build_args.get("head_dataset_embedding") or []) or None)
