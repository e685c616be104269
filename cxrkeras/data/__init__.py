"""Records and the input pipeline: `build_records`, `inspect_records`, `build_dataset`, the one `Preprocessor`."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "pipeline": "build_dataset count_images label_statistics",
    "records": "build_records",
    "inspect": "inspect_records",
    "manifest": "load_manifest",
    "preprocessor": "Preprocessor",
    "preview": "preview_batch",
})
