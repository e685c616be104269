"""Resolve what the user points at (a run folder, a stage folder, a .keras file or a Keras model) into a model
plus the run's facts (config, run_info, records folder, eval preprocessing)."""

import dataclasses
import json
import os

from cxrkeras.errors import CxrError
from cxrkeras.hashing import sha256_file

EVALUATION_DIR = "evaluation"  # <run>/evaluation/<split>/ holds `cxrkeras evaluate --run` results


@dataclasses.dataclass
class ModelSource:
    model: object
    labels: list
    image_size: int
    preprocessing: str
    equalize: object = None  # None | "hist" | "clahe"
    variant: str = None
    model_path: str = None  # the .keras file (None for an in-memory model)
    model_sha256: str = None
    run_dir: str = None  # the folder the user named (run or stage folder)
    stage_dir: str = None  # the folder holding the .keras (its config.yaml / run_info.json)
    config: dict = None  # resolved config of the run (config.yaml), if any
    run_info: dict = None
    note: str = None  # one line for the user, e.g. that a run's stage 1 model stands in for a missing stage 2

    @property
    def records_dir(self):
        """The records folder the run was trained on (run_info.json, else config.yaml), or None."""
        for value in ((self.run_info or {}).get("records"), ((self.config or {}).get("data") or {}).get("records")):
            if value:
                return value
        return None

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


def _read_yaml(path):
    import yaml

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _equalize(config, run_info):
    """The run's equalisation as the pipeline's flag (None | "hist" | "clahe")."""
    for value in ((run_info or {}).get("equalize"), ((config or {}).get("data") or {}).get("equalize")):
        if value in ("hist", "clahe"):
            return value
    return None


def load_keras_model(path):
    """keras.saving.load_model with cxrkeras' registered layers; a clear error for a missing/unreadable file."""
    import keras

    import cxrkeras.models  # noqa: F401 - registers LargeKernelAttention, MultiLabelDense

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


def resolve(model_or_run):
    """A ModelSource for a keras.Model, a .keras file, a run folder or a stage folder."""
    from cxrkeras.models import model_info

    run_dir = stage_dir = model_path = sha = note = None
    if isinstance(model_or_run, (str, os.PathLike)):
        target = os.fspath(model_or_run)
        if os.path.isdir(target):
            from cxrkeras.training.rundir import best_model_choice

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
    config = _read_yaml(os.path.join(stage_dir, "config.yaml")) if stage_dir else None
    run_info = _read_json(os.path.join(stage_dir, "run_info.json")) if stage_dir else None
    shape = info["input_shape"]
    if shape[0] != shape[1] or shape[0] is None:
        size = ((config or {}).get("data") or {}).get("image_size") or (run_info or {}).get("image_size")
        if not size:
            raise CxrError(f"model input shape {shape} is not a fixed square: cannot tell the image size")
    else:
        size = shape[0]
    return ModelSource(model=model, labels=list(info["labels"]), image_size=int(size),
                       preprocessing=info["preprocessing"], equalize=_equalize(config, run_info),
                       variant=info.get("variant"), model_path=os.path.abspath(model_path) if model_path else None,
                       model_sha256=sha, run_dir=run_dir, stage_dir=stage_dir, config=config, run_info=run_info,
                       note=note)
