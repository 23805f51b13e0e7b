"""quant4 inside Hugging Face transformers (optional: `pip install quant4[hf]`).

    import quant4.hf
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant4.hf.Quant4Config(group_size=32))
    model.save_pretrained(out)                      # quant4's stored format, HF tensor names, no pickle
    model = AutoModelForCausalLM.from_pretrained(out)   # back, same logits

Importing this module registers the config and the quantizer under the name "quant4" with transformers' public
hooks. From a float checkpoint each targeted nn.Linear's weight is quantized as it is read (one tensor at a time:
the float model never exists in RAM) into an Int4Linear; a saved directory holds, for every quantized layer,
`<name>.qweight` / `.scales` / `.zeros` (/ `.bias`) exactly as quant4's own files, and config.json's
`quantization_config` names the layers and their group sizes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from quant4 import ops
from quant4.options import DEFAULT_METHOD
from quant4.config import HF_NAMES, Int4Config
from quant4.memory import page_out
from quant4.nn import Int4Linear
from quant4.scheme import FORMAT_VERSION
from quant4.swap import arrange_layouts_

QUANT_METHOD = "quant4"
# transformers' own classes whose forward quant4 has been checked against (tests/test_hf_integration.py)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class HfInt4Linear(Int4Linear):
    """Int4Linear as a transformers model holds it: the same buffers and bytes, no extra state (safetensors stores
    tensors only; the format version and group sizes are in config.json's quantization_config)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state


class Quant4Config(QuantizationConfigMixin):
    """from_pretrained(..., quantization_config=Quant4Config(...)).

    group_size, method ("rtn" | "search"), activation ("float" | "int8" | "bf16"): as quant4.Int4Config.
    target_modules: the nn.Linear attribute names quantized (default q/k/v/o/gate/up/down_proj).
    modules_to_not_convert: names or patterns kept in float, on top of transformers' default (the output head and
    tied weights).
    group_sizes: {layer name: group size} overriding group_size for some layers (e.g. "model.layers.0.mlp.down_proj":
    64). A saved model's config lists every quantized layer here; `layers` is that list and is written, not set.
    """

    def __init__(self, group_size: int = 32, method: str = DEFAULT_METHOD, activation: str = "float",
                 target_modules: Optional[list] = None, modules_to_not_convert: Optional[list] = None,
                 group_sizes: Optional[dict] = None, format_version: int = FORMAT_VERSION, **kwargs):
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"Quant4Config: unknown settings {sorted(unknown)}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"quantization_config format_version {format_version!r}: this quant4 reads "
                             f"{FORMAT_VERSION}")
        Int4Config(group_size=group_size, method=method, activation=activation)      # the checks, in one place
        self.quant_method = QUANT_METHOD
        self.group_size, self.method, self.activation = group_size, method, activation
        self.target_modules = list(target_modules) if target_modules is not None else list(HF_NAMES)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.group_sizes = dict(group_sizes or {})
        for name, g in self.group_sizes.items():
            if not isinstance(name, str):
                raise ValueError(f"Quant4Config group_sizes: keys are layer names, got {name!r}")
            ops.check_group_size(g)
        self.format_version = format_version

    def group_size_for(self, fqn: str) -> int:
        return self.group_sizes.get(fqn, self.group_size)


class _QuantizeWeight(ConversionOps):
    """Called by transformers with each targeted float weight as it is read: quantize it and put an HfInt4Linear
    in the model in place of its nn.Linear."""

    def __init__(self, hf_quantizer: "Quant4HfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rsplit(".", 1)[0]
        linear = model.get_submodule(module_name)
        cfg = self.hf_quantizer.quantization_config
        group_size = cfg.group_size_for(module_name)
        try:
            qweight, scales, zeros = ops.quantize(weight, group_size, method=cfg.method)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{full_layer_name}: {exc}") from exc
        bias = linear.bias if linear.bias is not None and not linear.bias.is_meta else None
        q = HfInt4Linear.from_packed(qweight, scales, zeros, in_features=linear.in_features, group_size=group_size,
                                     bias=None if bias is None else bias.detach(), activation=cfg.activation)
        if linear.bias is not None and bias is None:        # its bias is read after the weight: a slot for it
            q.register_buffer("bias", torch.zeros(linear.out_features))
        model.set_submodule(module_name, q)
        page_out(weight)      # transformers' tensors are views of the file's memory map: drop the float pages
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        self.hf_quantizer.quantized[module_name] = group_size
        return {}


class Quant4HfQuantizer(HfQuantizer):
    """The quantizer transformers runs for quant_method "quant4" (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: Quant4Config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.quantized: dict = {}          # layer name -> group size, as layers are converted

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and any(str(d) not in ("cpu", "disk") for d in device_map.values()):
            raise ValueError(f"quant4 runs on the CPU: device_map {device_map!r} places layers elsewhere")
        if isinstance(device_map, str) and device_map not in ("cpu", "auto"):
            raise ValueError(f"quant4 runs on the CPU: device_map={device_map!r}")

    def _targets(self, model) -> dict:
        """name -> nn.Linear of every layer to quantize (or, pre-quantized, that was quantized)."""
        cfg = self.quantization_config
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"quant4 quantizes transformers models of type {SUPPORTED_MODEL_TYPES}; this one is "
                             f"{model_type!r}")
        if self.pre_quantized:
            missing = [n for n in cfg.group_sizes if not isinstance(_get(model, n), nn.Linear)]
            if missing:
                raise ValueError(f"quantization_config names layers this model has no nn.Linear for: {missing[:5]}")
            return {n: model.get_submodule(n) for n in cfg.group_sizes}
        skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert, model._keep_in_fp32_modules,
                                               add_default_skips=True)
        names = set(cfg.target_modules)
        return {fqn: mod for fqn, mod in model.named_modules()
                if isinstance(mod, nn.Linear) and fqn.rsplit(".", 1)[-1] in names and should_convert_module(fqn, skip)}

    def _process_model_before_weight_loading(self, model, **kwargs):
        targets = self._targets(model)
        self.targets = set(targets)
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        for fqn, linear in targets.items():       # the meta skeleton gets the stored layout's buffers
            with torch.device("meta"):
                q = HfInt4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 group_size=cfg.group_sizes[fqn], activation=cfg.activation)
            model.set_submodule(fqn, q)
            self.quantized[fqn] = cfg.group_sizes[fqn]
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        return tensor_name == "weight" and module_name in self.targets

    def get_quantize_ops(self):
        return _QuantizeWeight(self)

    def get_new_dtype(self, converter, param, dtype):
        # stored tensors keep their stored dtypes (uint8 codes, float16 scales and zeros, float32 bias)
        return None if self.pre_quantized else super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        left = sorted(n for n in self.targets if not isinstance(model.get_submodule(n), Int4Linear))
        if left:
            raise ValueError(f"quant4: no weight was read for {left[:5]}")
        for fqn in self.targets:
            mod = model.get_submodule(fqn)
            for name, buf in mod.named_buffers():
                # transformers flags what it read from the checkpoint; a missing int4 tensor would otherwise be
                # left as uninitialized memory with only a warning in its loading report
                if buf.is_meta or (self.pre_quantized and not getattr(buf, "_is_hf_initialized", False)):
                    raise ValueError(f"quant4: the checkpoint has no {fqn}.{name}")
        cfg.group_sizes = dict(sorted(self.quantized.items()))
        arrange_layouts_(model)         # activation "int8": the layers in the layout of its kernels (slab16)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _get(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# registered once, even if this module is imported again (e.g. importlib.reload)
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(Quant4Config)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(Quant4HfQuantizer)
