"""TF Serving export (`export`: SavedModel taking image bytes) and `predict` for image/DICOM files."""

from cxrkeras.export.predict import predict
from cxrkeras.export.savedmodel import export

__all__ = ["export", "predict"]
