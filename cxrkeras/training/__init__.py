"""Two-stage training (`train(config, stage)`), run folders and device strategy; TensorFlow loads on first use."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "trainer": "train TrainResult",
    "stage": "StageRun",
    "rundir": "best_model_path",
})
