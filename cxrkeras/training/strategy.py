"""Device setup: the tf.distribute strategy (default / Mirrored / MultiWorkerMirrored) and mixed precision."""

import json
import os

from cxrkeras.errors import ConfigError, CxrError


def tf_config():
    """The parsed TF_CONFIG environment variable, or None when unset/empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({exc}); see the TensorFlow multi-worker guide") from exc
    if not isinstance(value, dict) or "cluster" not in value or "task" not in value:
        raise ConfigError("TF_CONFIG must have 'cluster' and 'task' keys, e.g. "
                          '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                          '"task": {"type": "worker", "index": 0}}')
    return value


def is_chief():
    """True on the one process that writes the run folder (worker 0, or the chief, or a single process)."""
    cfg = tf_config()
    if cfg is None:
        return True
    task = cfg["task"]
    if task.get("type") == "chief":
        return True
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0 and "chief" not in cfg["cluster"]


def choose_strategy(kind="auto"):
    """auto: MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy on >= 2 GPUs, else the default."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if kind == "auto":
        kind = "multi_worker" if tf_config() else "mirrored" if len(gpus) >= 2 else "default"
    if kind == "multi_worker":
        if tf_config() is None:
            raise ConfigError("train.strategy multi_worker needs the TF_CONFIG environment variable (cluster + task)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ConfigError(f"unknown train.strategy {kind!r}")


def describe_devices(strategy=None):
    """Device facts for run_info.json: visible GPUs/CPUs, strategy class and replica count."""
    import tensorflow as tf

    info = {
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "cpus": [d.name for d in tf.config.list_logical_devices("CPU")],
    }
    if strategy is not None:
        info["strategy"] = type(strategy).__name__
        info["replicas"] = int(strategy.num_replicas_in_sync)
    cfg = tf_config()
    if cfg:
        info["tf_config"] = {"workers": sum(len(v) for v in cfg["cluster"].values()), "task": cfg["task"]}
    return info


def visible_gpu_count():
    """GPUs TensorFlow sees (CUDA_VISIBLE_DEVICES applies)."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def resolve_mixed_precision(setting):
    """auto -> on when a GPU is visible; "on" on CPU is allowed (slow) but said in the log."""
    import tensorflow as tf

    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return setting == "on"


class precision_policy:
    """Context manager: set Keras's global dtype policy (mixed_float16 or float32), restore it on exit."""

    def __init__(self, mixed):
        self.mixed = mixed

    def __enter__(self):
        import keras

        self._old = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy("mixed_float16" if self.mixed else "float32")
        return self

    def __exit__(self, *exc):
        import keras

        keras.mixed_precision.set_global_policy(self._old)
        return False


def is_multi_worker(strategy):
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and \
        strategy.extended._num_workers > 1  # noqa: SLF001  (no public accessor for the worker count)


# Keras releases whose private keras.src.backend.tensorflow.trainer has the two functions the multi-worker patch
# uses, with these signatures (read in each minor release's source, 3.3 to 3.15; the 2-worker test ran on 3.15).
# A newer Keras is refused for multi-worker training until it is checked and this range extended.
KERAS_PATCH_RANGE = ((3, 3), (3, 15))
_PATCH_TARGETS = {"reduce_per_replica": ("values", "strategy", "reduction"),
                  "_collective_all_reduce_multi_worker": ("strategy",)}


def keras_version():
    import keras

    return tuple(int(part) for part in keras.__version__.split(".")[:2])


def check_keras_patch_targets():
    """The private Keras trainer module the multi-worker patch replaces a function of, checked to be the one it was
    written for (version in KERAS_PATCH_RANGE, functions present with their signatures); a CxrError naming what
    differs otherwise: never a silently unpatched (hanging or failing) multi-worker fit."""
    import inspect

    import keras

    low, high = KERAS_PATCH_RANGE
    version = keras_version()
    advice = (f"multi-worker training needs Keras {low[0]}.{low[1]} to {high[0]}.{high[1]} "
              f"(pip install 'keras>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}'); single-process training works "
              "with any Keras 3")
    if not low <= version <= high:
        raise CxrError(f"Keras {keras.__version__} is not a version cxrkeras' multi-worker fix (keras-team/keras"
                       f"#20585) was checked on: {advice}")
    try:
        from keras.src.backend.tensorflow import trainer as tf_trainer
    except ImportError as exc:
        raise CxrError(f"Keras {keras.__version__} has no keras.src.backend.tensorflow.trainer: {advice}") from exc
    for name, params in _PATCH_TARGETS.items():
        fn = getattr(tf_trainer, name, None)
        got = tuple(inspect.signature(fn).parameters) if callable(fn) else None
        if got != params:
            raise CxrError(f"Keras {keras.__version__} changed keras.src.backend.tensorflow.trainer.{name} "
                           f"(expected parameters {params}, found {got}): {advice}")
    return tf_trainer


def _patch_keras_multi_worker_reduce():
    """Keras 3's fit reduces per-replica scalar logs with strategy.reduce("MEAN", v, axis=0), which fails under a
    multi-worker MultiWorkerMirroredStrategy (keras-team/keras#20585, tensorflow/tensorflow#72388). Reduce them
    with axis=None (a mean over replicas) instead; gradients are all-reduced by the optimizer as usual."""
    tf_trainer = check_keras_patch_targets()
    if getattr(tf_trainer, "_cxrkeras_patched", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction == "auto" and tf_trainer._collective_all_reduce_multi_worker(strategy):  # noqa: SLF001
            import tensorflow as tf

            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer._cxrkeras_patched = True  # noqa: SLF001


class fit_scope:
    """Context for model.fit. Multi-worker: work around Keras 3 (#20585): its symbolic build reduces a data batch
    across workers and fails, so the model forgets its strategy (`_distribute_strategy = None`) and fit runs inside
    `strategy.scope()`, where Keras picks the same strategy up through tf.distribute.get_strategy()."""

    def __init__(self, model, strategy):
        self.model, self.strategy = model, strategy
        self._scope = None

    def __enter__(self):
        if is_multi_worker(self.strategy):
            _patch_keras_multi_worker_reduce()
            self.model._distribute_strategy = None  # noqa: SLF001
            self._scope = self.strategy.scope()
            self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        if self._scope is not None:
            self._scope.__exit__(*exc)
        return False
