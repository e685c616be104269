"""Records and the input pipeline: `build_records`, `inspect_records`, `build_dataset`, the one `Preprocessor`."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {
    "build_dataset": "cxrkeras.data.pipeline", "count_images": "cxrkeras.data.pipeline",
    "label_statistics": "cxrkeras.data.pipeline",
    "build_records": "cxrkeras.data.records", "inspect_records": "cxrkeras.data.inspect",
    "load_manifest": "cxrkeras.data.manifest",
    "Preprocessor": "cxrkeras.data.preprocessor",
    "preview_batch": "cxrkeras.data.preview",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
