"""Feature Pyramid Sum head (FPSM): per pyramid level, global average pooling -> Dense(n) logits; the prediction is
one sigmoid of the summed logits, the training loss the sum of the per-level losses (`cxrkeras.losses`)."""

import keras

from cxrkeras.errors import ConfigError
from cxrkeras.models.head import HeadMetadata, MultiLabelDense

HEADS = ("linear", "fpsm")
MERGES = ("sum", "concat")  # concat: one Dense over the concatenated pooled levels (the system's variant)
DEFAULT_LEVELS = "4+3+2"  # the system's best mAP
LEVELS = (1, 2, 3, 4)
LAYER_PREFIX = "fpsm"  # fpsm<level>_pool, fpsm_concat: head layers (cxrkeras.models.parts)
DATASET_INPUT = "dataset"  # the second input of a model with the dataset embedding: int32 [batch, 1]


def parse_levels(value):
    """"4+3+2" | "4,3,2" | [4, 3, 2] -> (4, 3, 2): distinct pyramid levels 1-4, highest first."""
    text = value if isinstance(value, str) else None
    items = text.replace(",", "+").split("+") if text is not None else value
    try:
        levels = [int(str(v).strip()) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"head_stages must be pyramid levels 1-4 joined by '+', e.g. '4+3+2', got {value!r}") from None
    if not levels or any(v not in LEVELS for v in levels) or len(set(levels)) != len(levels):
        raise ConfigError(f"head_stages must be distinct pyramid levels 1-4 joined by '+' (e.g. '4+3+2' or "
                          f"'4+3+2+1'), got {value!r}")
    return tuple(sorted(levels, reverse=True))


def format_levels(levels):
    return "+".join(str(v) for v in levels)


def check_head(head, merge):
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    if merge not in MERGES:
        raise ConfigError(f"unknown head_merge {merge!r}; valid: {', '.join(MERGES)}")


def loss_levels(overrides):
    """The pyramid levels whose losses a run sums (build_model overrides of its config), or None: one loss."""
    overrides = overrides or {}
    if overrides.get("head", "linear") != "fpsm" or overrides.get("head_merge", "sum") != "sum":
        return None
    return parse_levels(overrides.get("head_stages", DEFAULT_LEVELS))


@keras.saving.register_keras_serializable(package="cxrkeras")
class PyramidSum(HeadMetadata, keras.layers.Layer):
    """The FPSM output: input = the pooled features of the levels, concatenated (widths `stage_widths`, in the order
    of `levels`); level s has its own Dense(units) logits z_s = x_s W_s + b_s.

    With `shared_width` > 0 the input's last `shared_width` columns (the dataset embedding) are appended to every
    level's features: z_s = [x_s, e] W_s + b_s, W_s of (width_s + shared_width) rows.

    Inference: sigmoid(sum_s z_s), [batch, units]. Training (`training=True`, i.e. inside `fit`): the per-level
    logits stacked, [batch, levels, units], which `cxrkeras.losses.PyramidLoss` turns into the sum of the per-level
    losses. `logits(x)` is the summed score Grad-CAM explains. Carries the model's metadata (`HeadMetadata`).
    """

    def __init__(self, units, stage_widths, levels=None, labels=(), variant=None, preprocessing=None,
                 feature_layer=None, build_args=None, preprocessor=None, patient_features=None, shared_width=0,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.stage_widths = [int(w) for w in stage_widths]
        self.shared_width = int(shared_width)
        self.levels = [int(v) for v in (levels or range(len(self.stage_widths), 0, -1))]
        if len(self.levels) != len(self.stage_widths):
            raise ValueError(f"{len(self.levels)} levels for {len(self.stage_widths)} stage widths")
        self._set_metadata(labels, variant, preprocessing, feature_layer, build_args, preprocessor, patient_features)

    def build(self, input_shape):
        total = sum(self.stage_widths) + self.shared_width
        if input_shape[-1] is not None and int(input_shape[-1]) != total:
            raise ValueError(f"PyramidSum expects {total} features ({self.stage_widths} + {self.shared_width} "
                             f"shared), got {input_shape[-1]}")
        self.kernels = [self.add_weight(name=f"kernel_{level}", shape=(width + self.shared_width, self.units),
                                        initializer="glorot_uniform")
                        for level, width in zip(self.levels, self.stage_widths)]
        self.biases = [self.add_weight(name=f"bias_{level}", shape=(self.units,), initializer="zeros")
                       for level in self.levels]

    def stage_logits(self, x):
        """[batch, levels, units]: each level's logits."""
        ops = keras.ops
        cuts, total = [], 0
        for width in self.stage_widths[:-1] + ([self.stage_widths[-1]] if self.shared_width else []):
            total += width
            cuts.append(total)
        parts = ops.split(x, cuts, axis=-1) if cuts else [x]
        if self.shared_width:
            shared = parts.pop()
            parts = [ops.concatenate([p, shared], axis=-1) for p in parts]
        return ops.stack([ops.matmul(p, ops.cast(k, p.dtype)) + ops.cast(b, p.dtype)
                          for p, k, b in zip(parts, self.kernels, self.biases)], axis=1)

    def logits(self, x):
        """[batch, units]: the summed logits, the model's score before its sigmoid."""
        return keras.ops.sum(self.stage_logits(x), axis=1)

    def call(self, inputs, training=None):
        z = self.stage_logits(inputs)
        return z if training else keras.ops.sigmoid(keras.ops.sum(z, axis=1))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "stage_widths": list(self.stage_widths),
                "levels": list(self.levels), "shared_width": self.shared_width, **self.metadata_config()}


def _level_tensor(graph, backbone, level, blocks):
    """The output of pyramid level 1-3 (level 4 is the backbone's final features): DenseNet's dense block `level`
    after its LKA (before the transition); VGG16's block `level`+1 after its max-pool (its LKA sits before the
    pool); ResNet-50's stage conv`level+1`_x after its LKA."""
    names = {layer.name for layer in graph.layers}
    if backbone == "vgg16":
        name = f"block{level + 1}_pool"
    else:
        from cxrkeras.models.resnet import RESNET50_STAGES

        last = blocks[level - 1] if backbone == "densenet121" else RESNET50_STAGES[level - 1][1]
        name = f"conv{level + 1}_lka" if f"conv{level + 1}_lka" in names else \
            f"conv{level + 1}_block{last}_{'concat' if backbone == 'densenet121' else 'out'}"
    return graph.get_layer(name).output


def apply_fpsm_head(inputs, x, backbone, levels, merge, num_classes, dropout, metadata, blocks=None, dataset=None,
                    n_datasets=0):
    """Pooled features of each level (`fpsm<level>_pool`) -> concatenated (`fpsm_concat`) -> `head_dropout` ->
    PyramidSum (merge "sum") or one MultiLabelDense over them (merge "concat"), named "predictions".
    `dataset` (an int input [batch, 1]): its learned Embedding(n_datasets, n_datasets) (`fpsm_dataset_embedding`)
    is appended to each level's features before its Dense (merge "concat": once, to the concatenated features)."""
    graph = keras.Model(inputs, x)  # only to find the levels' tensors by layer name; not kept
    pooled = []
    for level in levels:
        tensor = x if level == 4 else _level_tensor(graph, backbone, level, blocks)
        pooled.append(keras.layers.GlobalAveragePooling2D(name=f"{LAYER_PREFIX}{level}_pool")(tensor))
    h = keras.layers.Concatenate(name=f"{LAYER_PREFIX}_concat")(pooled) if len(pooled) > 1 else pooled[0]
    h = keras.layers.Dropout(dropout, name="head_dropout")(h)
    shared = 0
    if dataset is not None:
        e = keras.layers.Embedding(n_datasets, n_datasets, name=f"{LAYER_PREFIX}_dataset_embedding")(dataset)
        e = keras.layers.Flatten(name=f"{LAYER_PREFIX}_dataset_flatten")(e)
        h = keras.layers.Concatenate(name=f"{LAYER_PREFIX}_dataset_concat")([h, e])
        shared = n_datasets
    if merge == "concat":
        return MultiLabelDense(num_classes, dtype="float32", name="predictions", **metadata)(h)
    return PyramidSum(num_classes, [int(p.shape[-1]) for p in pooled], levels=list(levels), dtype="float32",
                      name="predictions", shared_width=shared, **metadata)(h)
