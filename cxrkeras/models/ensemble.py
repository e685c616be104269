"""An ensemble as one Keras model: the members (nested models) on one image input, their probabilities averaged with
fixed weights by `EnsembleAverage`, which carries the metadata, so evaluate, export and serve take it as any model."""

import keras
import numpy as np

from cxrkeras.errors import ConfigError
from cxrkeras.models.head import HeadMetadata

ENSEMBLE_VARIANT = "ensemble"
MEMBER_PREFIX = "member_"
MAX_MEMBERS = 32


@keras.saving.register_keras_serializable(package="cxrkeras")
class EnsembleAverage(HeadMetadata, keras.layers.Layer):
    """Input: the members' probabilities concatenated, [batch, members x units] (member i's at i*units...);
    output: sum_i w_i p_i, [batch, units], with the fixed `member_weights` w (>= 0, summing to 1)."""

    def __init__(self, units, member_weights, labels=(), variant=ENSEMBLE_VARIANT, preprocessing=None,
                 feature_layer=None, build_args=None, preprocessor=None, patient_features=None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.member_weights = [float(w) for w in member_weights]
        self._set_metadata(labels, variant, preprocessing, feature_layer, build_args, preprocessor, patient_features)

    def call(self, inputs):
        probs = keras.ops.reshape(inputs, (-1, len(self.member_weights), self.units))
        weights = keras.ops.convert_to_tensor(np.asarray(self.member_weights)[None, :, None], dtype=probs.dtype)
        return keras.ops.sum(probs * weights, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "member_weights": list(self.member_weights),
                **self.metadata_config()}


def normalise_weights(weights, n):
    """n weights >= 0 with a positive sum -> numbers summing to 1; a ConfigError saying what is wrong."""
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ConfigError(f"ensemble weights must be numbers, got {weights!r}") from None
    if len(values) != n:
        raise ConfigError(f"{len(values)} ensemble weights for {n} members: give one weight per member")
    if not all(np.isfinite(values)) or min(values) < 0 or sum(values) <= 0:
        raise ConfigError(f"ensemble weights must be finite, >= 0 and not all 0, got {values}")
    return [v / sum(values) for v in values]


def _differences(first, other):
    """What `other` (a ModelSource) does not share with `first`: labels, input size, the preprocessing chain."""
    out = []
    if list(other.labels) != list(first.labels):
        out.append(f"labels {other.labels} vs {first.labels}")
    a, b = first.preprocessor.to_config(), other.preprocessor.to_config()
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            what = "input size" if key == "image_size" else key
            out.append(f"{what} {b.get(key)!r} vs {a.get(key)!r}")
    if other.patient or first.patient:
        out.append("patient features (ensembles take image-only members)")
    return out


def check_members(sources, names):
    """Refuse members that do not share labels, input size and preprocessing, naming the member and the field."""
    if not 2 <= len(sources) <= MAX_MEMBERS:
        raise ConfigError(f"an ensemble needs 2 to {MAX_MEMBERS} members, got {len(sources)}")
    for source, name in zip(sources, names):
        if source.patient:
            raise ConfigError(f"{name}: takes patient features; ensembles take image-only members")
        if source.datasets:
            raise ConfigError(f"{name}: takes a dataset input (FPSM head_dataset_embedding); ensembles take "
                              "image-only members")
    for source, name in zip(sources[1:], names[1:]):
        problems = _differences(sources[0], source)
        if problems:
            raise ConfigError(f"ensemble members must share labels, input size and preprocessing: {name} differs "
                              f"from {names[0]}: {'; '.join(problems)}")


def build_ensemble(sources, weights, names=None, build_args=None):
    """One functional model: each member model (a ModelSource's float32 model) on the shared image input, its
    probabilities concatenated (`ensemble_concat`) and averaged with `weights` (normalised) by the layer
    "predictions". `build_args`: what to record about the members (stored with the model, model_info)."""
    names = list(names or [f"member {i + 1}" for i in range(len(sources))])
    check_members(sources, names)
    weights = normalise_weights(weights, len(sources))
    first = sources[0]
    shape = tuple(first.model.inputs[0].shape[1:])
    inputs = keras.Input(shape=shape, name="image")
    outputs = []
    for i, source in enumerate(sources):
        member = keras.Model(source.model.inputs[0], source.model.outputs[0], name=f"{MEMBER_PREFIX}{i + 1}")
        outputs.append(member(inputs))
    merged = keras.layers.Concatenate(name="ensemble_concat")(outputs)
    head = EnsembleAverage(len(first.labels), weights, labels=first.labels, preprocessing=first.preprocessing,
                           build_args={**(build_args or {}), "weights": weights},
                           preprocessor=first.preprocessor.to_config(), dtype="float32",
                           name="predictions")(merged)
    return keras.Model(inputs, head, name="ensemble")
