"""VGG16 / DenseNet121 classifiers with Large Kernel Attention, by variant name (`build_model`, `list_variants`)."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "build": "build_model build_options model_info",
    "registry": "list_variants get_variant Variant VARIANTS",
    "lka": "LargeKernelAttention lka_param_count",
    "head": "MultiLabelDense",
    "flops": "count_multiply_adds fvcore_flops gflops trainable_params",
    "torch_checkpoint": "convert_weights",
    "keras_file": "keras_file_info",
})
