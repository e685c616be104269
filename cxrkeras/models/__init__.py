"""VGG16 / DenseNet121 classifiers with Large Kernel Attention, by variant name (`build_model`, `list_variants`)."""

from cxrkeras.models.build import build_model, build_options, model_info
from cxrkeras.models.flops import count_multiply_adds, fvcore_flops, gflops, trainable_params
from cxrkeras.models.head import MultiLabelDense
from cxrkeras.models.lka import LargeKernelAttention, lka_param_count
from cxrkeras.models.registry import VARIANTS, Variant, get_variant, list_variants
from cxrkeras.models.torch_checkpoint import convert_weights

__all__ = ["build_model", "build_options", "model_info", "list_variants", "get_variant", "Variant", "VARIANTS",
           "LargeKernelAttention", "MultiLabelDense", "lka_param_count", "count_multiply_adds", "fvcore_flops",
           "gflops", "trainable_params", "convert_weights"]

