"""quant4: group-wise int4 weight-only quantization for Llama-style models on the CPU."""
from quant4.gptq import gptq_quantize, quantize_model_gptq_
from quant4.nn import Int4Linear
from quant4.ops import (dequantize, get_num_threads, kernel_isa, matmul, openmp_enabled, quantize,
                        set_num_threads, unpack)
from quant4.scheme import FORMAT_VERSION, GROUP_SIZES
from quant4.swap import (MODEL_METHODS, SwapRecord, format_report, is_projection, projection_filter, quantize_model_,
                         set_activation_)

__version__ = "0.1.0"
__all__ = [
    "Int4Linear", "quantize_model_", "set_activation_", "quantize_model_gptq_", "gptq_quantize", "is_projection", "projection_filter", "SwapRecord", "quantize", "dequantize", "unpack",
    "matmul", "openmp_enabled", "kernel_isa", "set_num_threads", "get_num_threads", "FORMAT_VERSION",
    "GROUP_SIZES", "MODEL_METHODS", "format_report",
]
