"""TF Serving export (`export`: SavedModel taking image bytes) and `predict` for image/DICOM files."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {"export": "cxrkeras.export.savedmodel", "predict": "cxrkeras.export.predict",
            "load_predictor": "cxrkeras.export.predict"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
