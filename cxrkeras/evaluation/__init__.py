"""Evaluation: metrics with patient-level bootstrap CIs, published comparison, figures and `evaluate(...)`."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {"evaluate": "cxrkeras.evaluation.evaluate", "predict_split": "cxrkeras.evaluation.evaluate"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
