"""TF Serving export (`export`: SavedModel taking image bytes) and `predict` for image/DICOM files."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "savedmodel": "export",
    "predict": "predict load_predictor",
})
