"""Grad-CAM / Grad-CAM++ heatmaps, overlays, a TensorBoard callback and a localisation score on NIH's boxes."""

_EXPORTS = {
    "GradCAM": "cxrkeras.explain.gradcam",
    "HeatmapEngine": "cxrkeras.explain.gradcam",
    "compute_heatmaps": "cxrkeras.explain.gradcam",
    "GradCAMCallback": "cxrkeras.explain.callback",
    "overlay_figure": "cxrkeras.explain.overlay",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # lazy: importing cxrkeras.explain must not import TensorFlow (the CLI imports it inside commands)
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cxrkeras.explain' has no attribute {name!r}")
