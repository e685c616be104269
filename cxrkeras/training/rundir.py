"""The run folder `<root>/<name>/stage1|stage2/`: config, run_info.json, history, checkpoints, resume state."""

import datetime
import json
import os
import platform
import shutil
import subprocess

import yaml

from cxrkeras.errors import ConfigError, CxrError, DataError
from cxrkeras.hashing import sha256_file

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
HISTORY_FILE = "history.csv"
BEST_FILE = "best.keras"
LAST_FILE = "last.keras"
TENSORBOARD_DIR = "tensorboard"
RESUME_DIR = "resume"  # weights + optimiser state and callback state after the last finished epoch

# Keys that may change between a run and its resumption without it counting as a different run.
RESUMABLE_DIFFERENCES = ("run.overwrite", "train.epochs", "train.verbose", "data.verify_records")


def stage_name(stage):
    return f"stage{int(stage)}"


def run_path(config):
    return os.path.join(config.run.root, config.run.name)


def stage_path(config, stage):
    return os.path.join(run_path(config), stage_name(stage))


def best_model_path(run_dir):
    """The best .keras of a run folder: stage 2's if present, else stage 1's; accepts a stage folder or a .keras."""
    return best_model_choice(run_dir)[0]


def best_model_choice(run_dir):
    """(best_model_path, note): the note is one line saying that a run folder's stage 1 model is used because
    stage 2 has no best.keras (None otherwise), for the commands to print."""
    if os.path.isfile(run_dir) and run_dir.endswith(".keras"):
        return run_dir, None
    candidates = [os.path.join(run_dir, BEST_FILE)]
    candidates += [os.path.join(run_dir, stage_name(s), BEST_FILE) for s in (2, 1)]
    for path in candidates:
        if os.path.isfile(path):
            note = None
            if path == candidates[2]:
                stage2 = os.path.join(run_dir, stage_name(2))
                why = ("stage 2 has no best.keras (not finished, or stopped before a good epoch)"
                       if os.path.isdir(stage2) else "the run has no stage 2")
                note = f"note: {why}: using stage 1's model {path}"
            return path, note
    raise CxrError(f"{run_dir!r} holds no {BEST_FILE} (looked in {run_dir}/stage2 and stage1): train it first with "
                   f"`cxrkeras train --config ... --stage 1`, or give a .keras file")


def atomic_write(path, text):
    """Write text so that a kill mid-write leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, data):
    atomic_write(path, json.dumps(data, indent=2, default=str) + "\n")


def manifest_sha256(records_dir):
    from cxrkeras.data.manifest import MANIFEST_NAME

    path = os.path.join(records_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{records_dir!r} has no {MANIFEST_NAME}: build the records with "
                        f"`cxrkeras build-records --out {records_dir}` first, or pass --records")
    return sha256_file(path)


def git_commit():
    """The commit of the cxrkeras checkout (with "+dirty" if it has local changes), or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def versions():
    import keras
    import numpy
    import sklearn
    import tensorflow as tf

    from cxrkeras import __version__

    return {"cxrkeras": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old, new, ignore=RESUMABLE_DIFFERENCES):
    """["key: old -> new", ...] between two resolved config dicts, leaving out `ignore`d keys."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def prepare_stage_dir(config, stage, overwrite=False):
    """Create (or reuse, for a resume) the stage folder; refuse a folder holding a different config.

    Returns (path, state) with state "new", "resume" (a previous run of this config to continue) or "finished".
    """
    path = stage_path(config, stage)
    cfg_path = os.path.join(path, CONFIG_FILE)
    state = "new"
    if os.path.isdir(path) and os.listdir(path):
        if overwrite:
            shutil.rmtree(path)
        elif not os.path.isfile(cfg_path):
            raise ConfigError(f"{path} exists but holds no {CONFIG_FILE}, so it is not a cxrkeras run folder of "
                              f"this config: pass --overwrite to replace it, or choose another --name")
        else:
            with open(cfg_path, encoding="utf-8") as f:
                old = yaml.safe_load(f) or {}
            diffs = config_differences(old, config.to_dict())
            if diffs:
                raise ConfigError(f"{path} holds a run of a different config ({'; '.join(diffs)}): pass --overwrite "
                                  f"to replace it, or choose another run name with --name")
            info_path = os.path.join(path, RUN_INFO_FILE)
            info = read_json(info_path) if os.path.isfile(info_path) else {}
            finished = info.get("finished") and info.get("epochs_requested") == config.train.epochs
            state = "finished" if finished else "resume"
    os.makedirs(path, exist_ok=True)
    return path, state


def write_config(path, config):
    from cxrkeras.config import dump_yaml

    atomic_write(os.path.join(path, CONFIG_FILE), dump_yaml(config))


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
