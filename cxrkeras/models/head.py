"""Classification head (GAP -> dropout -> [patient branch] -> sigmoid Dense) whose output layer also carries the
model's metadata."""

import keras

METADATA_FIELDS = ("labels", "variant", "preprocessing", "feature_layer", "build_args", "preprocessor",
                   "patient_features")


class HeadMetadata:
    """The model's metadata, kept by its output layer (named "predictions") in the layer config.

    Keeping them there (instead of a Model subclass) means they survive a .keras save/load and TF export with no
    custom Model class: `cxrkeras.models.model_info` reads them back. Every cxrkeras output layer (the linear head,
    the feature-pyramid sum, an ensemble's average) mixes this in.
    """

    def _set_metadata(self, labels=(), variant=None, preprocessing=None, feature_layer=None, build_args=None,
                      preprocessor=None, patient_features=None):
        self.labels = [str(label) for label in labels]
        self.variant = variant
        self.preprocessing = preprocessing
        self.feature_layer = feature_layer
        self.build_args = dict(build_args or {})
        # Preprocessor.to_config() of the data the model was trained on (records' size and channels, equalisation):
        # serving and Grad-CAM rebuild the same chain from it. None for models built outside training.
        self.preprocessor = dict(preprocessor) if preprocessor else None
        # PatientEncoder.to_config() (age mean/sd of the training split, missing-value policy) of a model whose
        # second input is the encoded age, sex and view; None for image-only models.
        self.patient_features = dict(patient_features) if patient_features else None

    def metadata_config(self):
        return dict(labels=list(self.labels), variant=self.variant, preprocessing=self.preprocessing,
                    feature_layer=self.feature_layer, build_args=dict(self.build_args),
                    preprocessor=dict(self.preprocessor) if self.preprocessor else None,
                    patient_features=dict(self.patient_features) if self.patient_features else None)


@keras.saving.register_keras_serializable(package="cxrkeras")
class MultiLabelDense(HeadMetadata, keras.layers.Dense):
    """Dense(n, sigmoid) that stores the label names and model metadata in its config (`HeadMetadata`)."""

    def __init__(self, units, labels=(), variant=None, preprocessing=None, feature_layer=None, build_args=None,
                 preprocessor=None, patient_features=None, activation="sigmoid", **kwargs):
        super().__init__(units, activation=activation, **kwargs)
        self._set_metadata(labels, variant, preprocessing, feature_layer, build_args, preprocessor, patient_features)

    def get_config(self):
        return {**super().get_config(), **self.metadata_config()}


PATIENT_UNITS = 3  # the attention study's branch: Dense(3) + ReLU on the encoded age, sex and view


def apply_head(x, num_classes, dropout, metadata, patient=None, name="predictions"):
    """[GAP of a feature map] -> Dropout -> [concatenated with Dense(3)+ReLU of the `patient` input] ->
    MultiLabelDense; float32 output under mixed precision (stable sigmoid and losses)."""
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    if patient is not None:
        branch = keras.layers.Dense(PATIENT_UNITS, activation="relu", name="patient_dense")(patient)
        x = keras.layers.Concatenate(name="head_concat")([x, branch])
    return MultiLabelDense(num_classes, dtype="float32", name=name, **metadata)(x)
