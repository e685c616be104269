"""The one run-artifact loader: the run folder's layout, `RunInfo` (run_info.json), the run's typed config, and
`load_source`, which turns what a user points at (a run, a stage folder, a .keras file, a Keras model) into a
`ModelSource`: the float32 model with its labels, its `Preprocessor`, its records and its evaluations.

Every consumer goes through it: evaluate, export, predict, gradcam, localize, preview-batch and stage 2's start.
"""

import dataclasses
import os
from typing import Optional

from cxrkeras.errors import CxrError
from cxrkeras.fileio import read_json, read_json_or, write_json

# <root>/<name>/stage1|stage2/ holds these; <run>/evaluation/<split>/ the results of `cxrkeras evaluate --run`
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
HISTORY_FILE = "history.csv"
BEST_FILE = "best.keras"
LAST_FILE = "last.keras"
TENSORBOARD_DIR = "tensorboard"
RESUME_DIR = "resume"  # weights + optimiser state and callback state after the last finished epoch
EVALUATION_DIR = "evaluation"
ENSEMBLE_FILE = "ensemble.keras"  # <out>/ of `cxrkeras ensemble`: the averaging model (with evaluation/<split>/)


def stage_name(stage):
    return f"stage{int(stage)}"


# --- run_info.json ---


@dataclasses.dataclass
class RunInfo:
    """What a stage folder's run_info.json records (written by `train`, read by every consumer). Keys this version
    does not know are kept in `extra` and written back unchanged."""

    stage: Optional[int] = None
    run: Optional[str] = None
    created: Optional[str] = None
    updated: Optional[str] = None
    records: Optional[str] = None  # absolute path of the records folder
    manifest_sha256: Optional[str] = None
    records_image_size: Optional[list] = None  # [height, width] the records store (manifest image_size)
    records_channels: Optional[int] = None
    variant: Optional[str] = None
    labels: Optional[list] = None
    image_size: Optional[int] = None  # the model's input size
    preprocessing: Optional[str] = None
    equalize: Optional[str] = None
    preprocessor: Optional[dict] = None  # Preprocessor.to_config() of the model
    patient_features: Optional[dict] = None  # PatientEncoder.to_config() of a model that takes age, sex and view
    git_commit: Optional[str] = None
    versions: Optional[dict] = None
    devices: Optional[dict] = None
    mixed_precision: Optional[bool] = None
    xla: Optional[bool] = None
    global_batch_size: Optional[int] = None
    per_replica_batch_size: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    train_images: Optional[int] = None
    val_images: Optional[int] = None
    epochs_requested: Optional[int] = None
    epochs_total: Optional[int] = None  # fine_tune: frozen + unfrozen epochs
    recipe: Optional[str] = None  # train.recipe
    monitor: Optional[str] = None  # train.monitor: what picked best_epoch
    lr_find: Optional[dict] = None  # optim.lr_find: the finder's rule, suggestion and curve summary
    finished: bool = False
    init: Optional[dict] = None  # stage 2: {path, sha256, stage1_best_epoch, weights_fingerprint}
    resumes: list = dataclasses.field(default_factory=list)
    seconds: Optional[float] = None
    epochs_run: Optional[int] = None
    stopped_early: Optional[int] = None
    best_epoch: Optional[int] = None
    best_value: Optional[float] = None  # the monitored value at best_epoch
    val_loss: Optional[float] = None  # at best_epoch
    val_auc_mean: Optional[float] = None
    val_auc: Optional[dict] = None
    resumed_from: Optional[int] = None
    nan_at: Optional[dict] = None
    collapsed_at: Optional[dict] = None
    dadam: Optional[dict] = None  # online DADAM (data.dadam): options, box file sha256, donors, images made per pass
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self):
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**data, **self.extra}

    @classmethod
    def read(cls, stage_dir):
        """The RunInfo of a stage folder, or None when it has no run_info.json."""
        path = os.path.join(stage_dir, RUN_INFO_FILE)
        try:
            data = read_json(path, missing_ok=True)
        except (OSError, ValueError) as exc:
            raise CxrError(f"{path}: cannot be read as JSON ({exc}); the run folder is damaged") from exc
        if data is None:
            return None
        if not isinstance(data, dict):
            raise CxrError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def write(self, stage_dir):
        return write_json(os.path.join(stage_dir, RUN_INFO_FILE), self.to_dict())


def read_run_config(stage_dir):
    """The typed Config a stage folder's config.yaml resolves to, or None when it has none."""
    from cxrkeras.config import config_from_dict
    from cxrkeras.fileio import read_yaml

    path = os.path.join(stage_dir, CONFIG_FILE)
    data = read_yaml(path, what="run config", missing_ok=True)
    return None if data is None else config_from_dict(data, source=path)


# --- which model a run folder means ---


def best_model_choice(run_dir):
    """(best_model_path, note): stage 2's best.keras if present, else stage 1's; accepts a stage folder, an ensemble
    folder (`cxrkeras ensemble --out`: its ensemble.keras) or a .keras.
    The note is one line saying that a run folder's stage 1 model is used because stage 2 has no best.keras (None
    otherwise), for the commands to print."""
    if os.path.isfile(run_dir) and run_dir.endswith(".keras"):
        return run_dir, None
    candidates = [os.path.join(run_dir, BEST_FILE), os.path.join(run_dir, ENSEMBLE_FILE)]
    candidates += [os.path.join(run_dir, stage_name(s), BEST_FILE) for s in (2, 1)]
    for path in candidates:
        if os.path.isfile(path):
            note = None
            if path == candidates[-1]:
                stage2 = os.path.join(run_dir, stage_name(2))
                why = ("stage 2 has no best.keras (not finished, or stopped before a good epoch)"
                       if os.path.isdir(stage2) else "the run has no stage 2")
                note = f"note: {why}: using stage 1's model {path}"
            return path, note
    raise CxrError(f"{run_dir!r} holds no {BEST_FILE} (looked in {run_dir}/stage2 and stage1): train it first with "
                   f"`cxrkeras train --config ... --stage 1`, or give a .keras file")


def best_model_path(run_dir):
    """The best .keras of a run folder (see `best_model_choice`)."""
    return best_model_choice(run_dir)[0]


# --- loading a model ---


def load_keras_model(path):
    """keras.saving.load_model with cxrkeras' registered layers; a clear error for a missing/unreadable file."""
    import keras

    import cxrkeras.models.ensemble  # noqa: F401 - registers EnsembleAverage
    import cxrkeras.models.fpsm  # noqa: F401 - registers PyramidSum
    import cxrkeras.models.head  # noqa: F401 - registers MultiLabelDense
    import cxrkeras.models.lka  # noqa: F401 - registers LargeKernelAttention
    import cxrkeras.models.unet  # noqa: F401 - registers MaskOutput

    if not os.path.isfile(path):
        raise CxrError(f"model file {path!r} does not exist")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises ValueError/OSError/zipfile errors for a bad file
        raise CxrError(f"{path}: cannot be loaded as a Keras model ({type(exc).__name__}: {exc})") from exc


def _float32_config(obj):
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _float32_config(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float32_config(v) for v in obj]
    return obj


def as_float32(model):
    """(model, original policy): a float32 copy, same weights, of a model built under mixed precision.

    A GPU run saves its layers with the mixed_float16 policy; evaluation and a CPU SavedModel should compute in
    float32 (float16 on CPU is slow, and a served model should not depend on where it was trained).
    """
    policies = {getattr(layer.dtype_policy, "name", "float32") for layer in model.layers}
    if policies <= {"float32"}:
        return model, "float32"
    clone = model.__class__.from_config(_float32_config(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone, ",".join(sorted(policies - {"float32"}))


def _records_facts(run_info, config):
    """(stored size, channels) of the run's records: run_info.json, else the records' manifest; (None, None)."""
    if run_info and run_info.records_image_size:
        return tuple(run_info.records_image_size), run_info.records_channels
    records = (run_info and run_info.records) or (config.data.records if config else None)
    if records and os.path.isfile(os.path.join(records, "manifest.json")):
        from cxrkeras.data.manifest import load_manifest

        try:
            manifest = load_manifest(records)
        except CxrError:
            return None, None
        if manifest.get("image_size"):
            return tuple(manifest["image_size"]), int(manifest.get("channels", 1))
    return None, None


def preprocessor_for(info, run_info=None, config=None, input_shape=None):
    """(Preprocessor, note) of a model from its `model_info`: the one it stores (models trained since the records'
    size is stored), else rebuilt from its run (run_info.json, config.yaml, the records' manifest); the note says
    what had to be assumed (None when nothing was)."""
    from cxrkeras.data.preprocessor import Preprocessor

    if info.get("preprocessor"):
        return Preprocessor.from_config(info["preprocessor"], where="the model's stored preprocessor"), None
    shape = input_shape or info["input_shape"]
    size = shape[0] if shape[0] is not None and shape[0] == shape[1] else None
    size = size or (run_info and run_info.image_size) or (config.data.image_size if config else None)
    if not size:
        raise CxrError(f"model input shape {shape} is not a fixed square: cannot tell the image size")
    equalize = (run_info and run_info.equalize) or (config.data.equalize if config else None)
    stored, channels = _records_facts(run_info, config)
    note = None
    if stored is None:
        note = ("note: the model records no stored image size (trained before cxrkeras stored it) and its records "
                "are not at hand: files are resized straight to the model size, as such models were served; "
                "re-export it from its run folder with the records present for the build-records resize")
    return Preprocessor(image_size=int(size), preprocessing=info["preprocessing"], equalize=equalize,
                        stored_size=stored, channels=channels), note


@dataclasses.dataclass
class ModelSource:
    model: object
    labels: list
    preprocessor: object  # cxrkeras.data.preprocessor.Preprocessor
    variant: str = None
    model_path: str = None  # the .keras file (None for an in-memory model)
    model_sha256: str = None
    run_dir: str = None  # the folder the user named (run or stage folder)
    stage_dir: str = None  # the folder holding the .keras (its config.yaml / run_info.json)
    config: object = None  # the run's typed Config (config.yaml), if any
    run_info: RunInfo = None
    note: str = None  # one line for the user, e.g. that a run's stage 1 model stands in for a missing stage 2
    preprocessor_note: str = None  # what had to be assumed about the preprocessing (models that do not store it)
    patient: object = None  # cxrkeras.data.patient.PatientEncoder of a model that takes age, sex and view
    datasets: list = None  # source dataset names of a model with the FPSM dataset embedding (its "dataset" input)

    @property
    def image_size(self):
        return self.preprocessor.image_size

    @property
    def preprocessing(self):
        return self.preprocessor.preprocessing

    @property
    def equalize(self):
        return self.preprocessor.equalize

    @property
    def records_dir(self):
        """The records folder the run was trained on (run_info.json, else config.yaml), or None."""
        if self.run_info and self.run_info.records:
            return self.run_info.records
        return self.config.data.records if self.config else None

    def evaluation_dirs(self):
        """Existing <run>/evaluation/<split>/ folders (newest first) that may hold thresholds for this model."""
        roots = {d for d in (self.run_dir, os.path.dirname(self.stage_dir or "") or None) if d}
        if self.stage_dir:
            roots.add(self.stage_dir)
        found = []
        for root in roots:
            base = os.path.join(root, EVALUATION_DIR)
            if os.path.isdir(base):
                found += [os.path.join(base, d) for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))]
        return sorted(found, key=os.path.getmtime, reverse=True)

    def evaluation_files(self, name):
        """[(path, document, of_this_model)] of every readable <run>/evaluation/<split>/`name` (thresholds.json,
        metrics.json), newest first; of_this_model: written for this very .keras file (same sha256)."""
        out = []
        for folder in self.evaluation_dirs():
            path = os.path.join(folder, name)
            doc = read_json_or(path)  # missing or damaged: not this model's evaluation (evaluate again)
            if isinstance(doc, dict):
                out.append((path, doc, bool(self.model_sha256) and doc.get("model_sha256") == self.model_sha256))
        return out


def load_source(model_or_run):
    """A ModelSource for a keras.Model, a .keras file, a run folder or a stage folder (a ModelSource: itself, so a
    loaded model can be handed on without reading its files again)."""
    from cxrkeras.hashing import sha256_file
    from cxrkeras.models.build import model_info

    if isinstance(model_or_run, ModelSource):
        return model_or_run

    run_dir = stage_dir = model_path = sha = note = None
    if isinstance(model_or_run, (str, os.PathLike)):
        target = os.fspath(model_or_run)
        if os.path.isdir(target):
            run_dir = target
            model_path, note = best_model_choice(target)
        elif os.path.isfile(target):
            model_path = target
        else:
            raise CxrError(f"{target!r} does not exist: give a run folder (runs/<name>), a stage folder or a .keras "
                           f"file")
        stage_dir = os.path.dirname(os.path.abspath(model_path))
        model = load_keras_model(model_path)
        sha = sha256_file(model_path)
    else:
        model = model_or_run
    model, _ = as_float32(model)
    info = model_info(model)
    config = read_run_config(stage_dir) if stage_dir else None
    run_info = RunInfo.read(stage_dir) if stage_dir else None
    preprocessor, assumed = preprocessor_for(info, run_info, config)
    from cxrkeras.data.patient import PatientEncoder

    patient = PatientEncoder.of(info.get("patient_features"))
    return ModelSource(model=model, labels=list(info["labels"]), preprocessor=preprocessor,
                       variant=info.get("variant"), model_path=os.path.abspath(model_path) if model_path else None,
                       model_sha256=sha, run_dir=run_dir, stage_dir=stage_dir, config=config, run_info=run_info,
                       note=note, preprocessor_note=assumed, patient=patient, datasets=info.get("datasets"))


resolve = load_source  # the name evaluation.source used
