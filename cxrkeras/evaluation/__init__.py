"""Evaluation: metrics with patient-level bootstrap CIs, published comparison, figures and `evaluate(...)`."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "evaluate": "evaluate predict_split",
})
