"""The one door for the project's small files: JSON/YAML reading, atomic writes (strict JSON), UTC timestamps."""

import contextlib
import datetime
import json
import math
import os

from cxrkeras.errors import CxrError


def utc_now():
    """The current time as ISO 8601 UTC to the second (every `created` / `updated` field)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def replacing(path, suffix=""):
    """Yield a temporary path beside `path` (`<path>.tmp-<pid><suffix>`) to write the file to; it replaces `path`
    only when the block ends without an error, and is removed otherwise: a kill or an error mid-write leaves the
    old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, text):
    """Write `text` to `path` through `replacing`; returns the path."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return path


def jsonable(obj):
    """NaN/inf -> None, NumPy scalars and arrays -> Python, tuples -> lists: what strict JSON can hold."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def json_text(data):
    """Strict JSON text (indent 2, NaN written as null, other objects as their str) with a final newline."""
    return json.dumps(jsonable(data), indent=2, allow_nan=False, default=str) + "\n"


def write_json(path, data):
    """Atomically write `data` as strict JSON; returns the path."""
    return atomic_write(path, json_text(data))


def read_json(path, default=None, missing_ok=False):
    """The JSON in `path`. missing_ok: `default` when the file does not exist. Other errors (unreadable, not JSON)
    raise OSError / ValueError for the caller to word."""
    if missing_ok and not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_or(path, default=None):
    """The JSON in `path`, or `default` when it is missing, unreadable or not JSON (bookkeeping files that are
    simply rebuilt when damaged: shard receipts, an earlier manifest)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return default


def read_yaml(path, what="YAML file", missing_ok=False):
    """The YAML mapping in `path` ({} for an empty file); a CxrError naming the file when it is not valid YAML.
    missing_ok: None when the file does not exist."""
    import yaml

    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise CxrError(f"{what} {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise CxrError(f"{path}: not valid YAML ({exc})") from exc
    return {} if data is None else data


def yaml_text(data):
    """YAML text of a mapping, keys in their order, block style."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_yaml(path, data):
    """Atomically write `data` as YAML; returns the path."""
    return atomic_write(path, yaml_text(data))
