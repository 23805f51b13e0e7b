"""quant4: group-wise int4 weight-only quantization for Llama-style models on the CPU.

The names below are imported on first use (PEP 562), so `import quant4` alone, and the command-line tools'
--help, do not import torch.
"""
from quant4.options import ACTIVATIONS, DEFAULT_METHOD, GROUP_SIZES, METHODS, MODEL_METHODS

__version__ = "0.1.0"

_LAZY = {
    "gptq_quantize": "quant4.gptq", "quantize_model_gptq_": "quant4.gptq", "tune_model_": "quant4.tune",
    "Int4Config": "quant4.config", "quantize_": "quant4.config",
    "Int4Linear": "quant4.nn", "Int4Embedding": "quant4.embedding",
    "Int8Embedding": "quant4.embedding", "Int8Linear": "quant4.int8_linear",
    "dequantize": "quant4.ops", "get_num_threads": "quant4.ops", "kernel_isa": "quant4.ops",
    "matmul": "quant4.ops", "openmp_enabled": "quant4.ops", "quantize": "quant4.ops",
    "set_num_threads": "quant4.ops", "unpack": "quant4.ops",
    "FORMAT_VERSION": "quant4.scheme",
    "SwapRecord": "quant4.swap", "format_report": "quant4.swap", "is_projection": "quant4.swap",
    "projection_filter": "quant4.swap", "quantize_model_": "quant4.swap", "set_activation_": "quant4.swap",
}
__all__ = sorted(_LAZY) + ["ACTIVATIONS", "DEFAULT_METHOD", "GROUP_SIZES", "METHODS", "MODEL_METHODS"]


_SUBMODULES = {"awq", "config", "decode", "embedding", "int8_linear", "gptq", "tune", "interop", "models", "nn", "ops", "reference", "scheme", "serialization", "swap", "torch_ops"}


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"quant4.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quant4' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
