"""VGG16 / DenseNet121 classifiers with Large Kernel Attention, by variant name (`build_model`, `list_variants`)."""

from cxrkeras.lazy import lazy_exports

_EXPORTS = {
    "build_model": "cxrkeras.models.build", "build_options": "cxrkeras.models.build",
    "model_info": "cxrkeras.models.build",
    "list_variants": "cxrkeras.models.registry", "get_variant": "cxrkeras.models.registry",
    "Variant": "cxrkeras.models.registry", "VARIANTS": "cxrkeras.models.registry",
    "LargeKernelAttention": "cxrkeras.models.lka", "lka_param_count": "cxrkeras.models.lka",
    "MultiLabelDense": "cxrkeras.models.head",
    "count_multiply_adds": "cxrkeras.models.flops", "fvcore_flops": "cxrkeras.models.flops",
    "gflops": "cxrkeras.models.flops", "trainable_params": "cxrkeras.models.flops",
    "convert_weights": "cxrkeras.models.torch_checkpoint",
    "keras_file_info": "cxrkeras.models.keras_file",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
