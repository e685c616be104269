"""The server's one door to the model: `predict`'s predictor, its file reader and the Grad-CAM of `explain`.

Every call into cxrkeras.export / cxrkeras.explain / cxrkeras.evaluation made by `cxrkeras serve` is in this module,
so the server follows those packages without a copy of their preprocessing or prediction code.
"""

import base64
import io
import os
import re

import numpy as np

from cxrkeras.errors import CxrError
from cxrkeras.fileio import read_json_or

NOTICE = ("Research tool, not a medical device: its outputs are not a diagnosis and must not guide the care of a "
          "patient.")
PREVIEW_SIDE = 512  # the page shows the upload at most this large (the overlays are drawn at the original size)
WARM_UP_PATIENT = (50.0, "F", "PA")  # any valid values: the warm-up only traces the graph


class ItemError(Exception):
    """One bad item of a batch: `index` in the batch (None when the message names none) and the `reason`."""

    def __init__(self, index, reason):
        super().__init__(reason)
        self.index, self.reason = index, reason


class FileProblem(Exception):
    """An uploaded file that cannot be read as an image; the message says why, never quoting its bytes."""


def model_name(model_arg):
    """A URL-safe default model name: the export's base folder, the run folder, or the .keras file's stem."""
    path = os.path.normpath(os.path.abspath(model_arg))
    base = os.path.basename(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")) and re.fullmatch(r"\d+", base):
        base = os.path.basename(os.path.dirname(path))  # a version folder: exports/<name>/<version>
    elif os.path.isfile(path):
        base = os.path.splitext(base)[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return name or "model"


class Backend:
    """One model in memory: predictions from `load_predictor` (the SavedModel of an export, else the Keras model),
    Grad-CAM from the Keras model (an export's own .keras, found through export_info.json and checked by sha256).

    Not thread-safe by design: the server calls it from one worker thread (cxrkeras.serve.worker)."""

    def __init__(self, model, keras_model=None, log=print):
        from cxrkeras.export.predict import load_predictor

        self.predictor = load_predictor(model, log)
        if getattr(self.predictor, "datasets", None):  # the page and REST API have no dataset field yet
            raise CxrError(f"{model} takes the source dataset of each image (FPSM dataset embedding): `cxrkeras "
                           "serve` does not send one; serve its SavedModel with TF Serving (the signatures take "
                           "`dataset` beside `image_bytes`) or use `cxrkeras predict --dataset NAME`")
        self.takes_patient = bool(self.predictor.takes_patient)  # the model also takes age, sex and view
        self.labels = list(self.predictor.labels)
        self.thresholds = np.asarray(self.predictor.thresholds, dtype=np.float64)
        self.warning = self.predictor.warning
        self.note = self.predictor.note
        self.is_export = getattr(self.predictor, "source", None) is None
        self.version = self._version()
        self.threshold_info = self._threshold_info()
        self.heatmap_source, self.heatmap_reason = self._heatmap_source(keras_model, log)

    # --- facts about the model ---

    def _version(self):
        if self.is_export:
            base = os.path.basename(os.path.normpath(self.predictor.path))
            return int(base) if base.isdigit() else 1
        return 1

    def _threshold_info(self):
        """What the export's thresholds.json says about how the thresholds were chosen (empty for a Keras model)."""
        if not self.is_export:
            return {}
        doc = read_json_or(os.path.join(self.predictor.path, "assets", "thresholds.json")) or {}
        return {k: doc[k] for k in ("method", "source", "chosen_on") if doc.get(k) is not None}

    def _heatmap_source(self, keras_model, log):
        """(ModelSource or None, reason): Grad-CAM needs the Keras model; an export records which file it was."""
        from cxrkeras.hashing import sha256_file
        from cxrkeras.runs import load_source

        if not self.is_export:
            if keras_model:
                raise CxrError("--keras-model is for an export folder; a run or .keras model is its own Grad-CAM "
                               "model")
            return _explainable(self.predictor.source)
        info = read_json_or(os.path.join(self.predictor.path, "assets", "export_info.json")) or {}
        recorded, sha = info.get("model"), info.get("model_sha256")
        path = keras_model or recorded
        if not path:
            return None, ("the export does not record the .keras file it was made from; pass --keras-model "
                          "FILE.keras to show heatmaps")
        if not os.path.isfile(path):
            return None, (f"the export was made from {path}, which no longer exists; pass --keras-model "
                          f"FILE.keras (the same file: its sha256 is checked) to show heatmaps")
        if sha and sha256_file(path) != sha:
            return None, (f"{path} is not the file this export was made from (sha256 differs from export_info.json): "
                          f"its heatmaps would explain another model")
        try:
            source = load_source(path)
        except CxrError as exc:
            return None, f"the Keras model cannot be loaded for heatmaps: {exc}"
        if list(source.labels) != self.labels:
            return None, f"{path} has other labels than the export: its heatmaps would explain another model"
        source, reason = _explainable(source)
        if source is not None:
            log(f"heatmaps from {path}")
        return source, reason

    def patient_encoder(self):
        """The model's PatientEncoder config (a Keras model's, or the one the export recorded), or None."""
        if not self.takes_patient:
            return None
        if not self.is_export:
            return self.predictor.source.patient.to_config()
        info = read_json_or(os.path.join(self.predictor.path, "assets", "export_info.json")) or {}
        return info.get("patient_features")

    @property
    def heatmap_model_path(self):
        return self.heatmap_source.model_path if self.heatmap_source is not None else None

    # --- work (called from the one worker thread) ---

    def warm_up(self):
        """One prediction and, when heatmaps are available, one Grad-CAM, so the first request pays no tracing."""
        import tempfile

        from cxrkeras.data.images import encode_png

        blob = encode_png(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1)))
        values = WARM_UP_PATIENT if self.takes_patient else None
        self.predict([(blob, values)] if values else [blob])
        if self.heatmap_source is None:
            return
        with tempfile.TemporaryDirectory(prefix="cxrkeras-warmup-") as folder:
            path = os.path.join(folder, "warmup.png")
            with open(path, "wb") as f:
                f.write(blob)
            self.heatmaps(path, self.labels[:1], os.path.join(folder, "out"), values)

    def predict(self, items):
        """(probabilities [N, L] float64, findings [N, L] bool) of PNG/JPEG bytes (for a model with patient
        features: (bytes, (age, sex, view)) pairs); ItemError for a bad item (its image or one of its values)."""
        import tensorflow as tf

        from cxrkeras.export.serving import item_error

        items = list(items)
        try:
            if self.takes_patient:
                probs, found = self.predictor([b for b, _ in items], [v for _, v in items])
            else:
                probs, found = self.predictor(items)
        except tf.errors.InvalidArgumentError as exc:
            index, reason = item_error(exc.message)
            raise ItemError(index, reason) from None
        return np.asarray(probs, dtype=np.float64), np.asarray(found, dtype=bool)

    def heatmaps(self, path, class_names, out_dir, patient=None):
        """[{label, probability, rank, png}] Grad-CAM overlays of one file (drawn by explain_files); `patient`: its
        (age, sex, view) for a model that takes them."""
        from cxrkeras.explain.files import explain_files

        entries = explain_files(self.heatmap_source, [path], out_dir, class_names=list(class_names), batch_size=1,
                                log=lambda *_: None, patient=[patient] if patient is not None else None)
        out = []
        for e in entries:
            with open(e["overlay"], "rb") as f:
                png = f.read()
            out.append({"label": e["label"], "probability": e["probability"], "rank": e["rank"],
                        "heatmap_max": e["heatmap_max"], "png": png})
        return out


def _explainable(source):
    """(source, None) when Grad-CAM can explain its model, else (None, why not: e.g. an ensemble, whose members
    average their probabilities), by explain's own rule for the feature layer."""
    from cxrkeras.errors import ConfigError
    from cxrkeras.explain.target import default_layer

    try:
        default_layer(source.model)
    except ConfigError as exc:
        return None, f"no heatmaps: {exc}"
    return source, None


# --- file reading (any thread: no model involved) ---

def file_bytes(path):
    """PNG/JPEG bytes of an uploaded file, as `cxrkeras predict` makes them (DICOM through build-records' reader:
    pixels only, no tag is kept); FileProblem with the reason."""
    from cxrkeras.export.predict import FileError, read_file_bytes

    try:
        return read_file_bytes(path)
    except FileError as exc:
        raise FileProblem(str(exc)) from None


def preview(blob, max_side=PREVIEW_SIDE):
    """(data URL of a PNG at most max_side a side, width, height) of PNG/JPEG bytes already accepted by predict."""
    from PIL import Image

    from cxrkeras.data.images import ImageError, read_image

    try:  # 16-bit stretched to its own range, RGBA to gray: as build-records and Grad-CAM read it
        gray = read_image("upload", channels=1, data=blob)
    except ImageError as exc:
        raise FileProblem(exc.reason) from None
    height, width = gray.shape[:2]
    img = Image.fromarray(gray)
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return data_url(buf.getvalue()), width, height


def data_url(png):
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


