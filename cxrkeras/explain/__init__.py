"""Grad-CAM / Grad-CAM++ heatmaps, overlays, a TensorBoard callback and a localisation score on NIH's boxes."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {
    "GradCAM": "cxrkeras.explain.gradcam",
    "HeatmapEngine": "cxrkeras.explain.engine", "get_engine": "cxrkeras.explain.engine",
    "compute_heatmaps": "cxrkeras.explain.engine",
    "GradCAMCallback": "cxrkeras.explain.callback",
    "overlay_figure": "cxrkeras.explain.overlay",
    "explain_files": "cxrkeras.explain.files",
    "localize": "cxrkeras.explain.localize",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
