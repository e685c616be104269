"""Evaluation: metrics with patient-level bootstrap CIs, published comparison, figures and `evaluate(...)`."""

from cxrkeras.evaluation.evaluate import evaluate, predict_split

__all__ = ["evaluate", "predict_split"]
