"""Grad-CAM / Grad-CAM++ heatmaps, overlays, a TensorBoard callback and a localisation score on NIH's boxes."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "gradcam": "GradCAM",
    "engine": "HeatmapEngine get_engine compute_heatmaps",
    "callback": "GradCAMCallback",
    "overlay": "overlay_figure",
    "files": "explain_files",
    "localize": "localize",
})
