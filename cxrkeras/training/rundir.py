"""Writing the run folder `<root>/<name>/stage1|stage2/`: creating or resuming a stage folder (refusing another
config), its config.yaml, and the facts run_info.json records (git commit, versions, the records' fingerprint).
Its layout and every reader live in cxrkeras.runs."""

import os
import platform
import shutil
import subprocess

from cxrkeras.errors import ConfigError, DataError
from cxrkeras.fileio import atomic_write, read_yaml
from cxrkeras.hashing import sha256_file
from cxrkeras.runs import (BEST_FILE, CONFIG_FILE, HISTORY_FILE, LAST_FILE, RESUME_DIR, RUN_INFO_FILE,  # noqa: F401
                           TENSORBOARD_DIR, RunInfo, best_model_choice, best_model_path, stage_name)

# Keys that may change between a run and its resumption without it counting as a different run.
RESUMABLE_DIFFERENCES = ("run.overwrite", "train.epochs", "train.verbose", "data.verify_records")


def run_path(config):
    return os.path.join(config.run.root, config.run.name)


def stage_path(config, stage):
    return os.path.join(run_path(config), stage_name(stage))


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
    if not a.get("loss.apply_class_balancing") and not b.get("loss.apply_class_balancing"):
        ignore = tuple(ignore) + ("loss.alpha",)  # a class weight that was not applied changes nothing
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def _resolved(old):
    """A stage folder's config.yaml with today's defaults for the keys it predates (so adding a config key does
    not make every earlier run folder "a different config"); as written when it no longer loads."""
    from cxrkeras.config import config_from_dict

    try:
        return config_from_dict(old, source="config.yaml").to_dict()
    except Exception:  # a key renamed or a value now refused: compare what was written
        return old


def stage_state(config, stage):
    """"new", "resume" (a run of this config to continue) or "finished", without changing anything; a ConfigError
    for a folder that holds no run or a run of another config."""
    path = stage_path(config, stage)
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not (os.path.isdir(path) and os.listdir(path)):
        return "new"
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path} exists but holds no {CONFIG_FILE}, so it is not a cxrkeras run folder of "
                          f"this config: pass --overwrite to replace it, or choose another --name")
    diffs = config_differences(_resolved(read_yaml(cfg_path, what="run config")), config.to_dict())
    if diffs:
        raise ConfigError(f"{path} holds a run of a different config ({'; '.join(diffs)}): pass --overwrite "
                          f"to replace it, or choose another run name with --name")
    info = RunInfo.read(path) or RunInfo()
    return "finished" if info.finished and info.epochs_requested == config.train.epochs else "resume"


def prepare_stage_dir(config, stage, overwrite=False):
    """Create (or reuse, for a resume) the stage folder; refuse a folder holding a different config.

    Returns (path, state) with state "new", "resume" (a previous run of this config to continue) or "finished".
    """
    path = stage_path(config, stage)
    if overwrite and os.path.isdir(path) and os.listdir(path):
        shutil.rmtree(path)
    state = stage_state(config, stage)
    os.makedirs(path, exist_ok=True)
    return path, state


def write_config(path, config):
    from cxrkeras.config import dump_yaml

    atomic_write(os.path.join(path, CONFIG_FILE), dump_yaml(config))
