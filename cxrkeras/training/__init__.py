"""Two-stage training (`train(config, stage)`), run folders and device strategy; TensorFlow loads on first use."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {"train": "cxrkeras.training.trainer", "TrainResult": "cxrkeras.training.trainer",
            "best_model_path": "cxrkeras.runs"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
