"""The config-style API: quantize_(model, Int4Config(...)), in the shape torchao made familiar.

    quant4.quantize_(model, quant4.Int4Config(group_size=32, method="search",
                                              overrides={"lm_head": None, "*.down_proj": {"group_size": 64}}))

One call works on quant4's / Meta's models (wq wk wv wo w1 w2 w3) and on Hugging Face ones (q_proj k_proj v_proj
o_proj gate_proj up_proj down_proj): the default `targets` is both presets. quantize_model_ is the short form
with one setting for every layer.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

from torch import nn

from quant4 import ops
from quant4.options import ACTIVATIONS, DEFAULT_METHOD, METHODS
from quant4.swap import PROJECTION_NAMES, LayerSettings, swap_layers_

META_NAMES = PROJECTION_NAMES
HF_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {"meta": META_NAMES, "hf": HF_NAMES, "all": META_NAMES + HF_NAMES}
_FIELDS = ("group_size", "method", "activation", "num_threads")


@dataclass(frozen=True)
class Int4Config:
    """What quantize_ does to a model.

    group_size, method ("rtn" | "search"), activation ("float" | "int8" | "bf16"), num_threads: as for
    quantize_model_, for every selected layer.
    targets: the nn.Linear attribute names quantized: a preset name ("all": Meta and Hugging Face projection
    names, the default; "meta"; "hf") or a sequence of names.
    overrides: {fully-qualified name or glob pattern: None | dict | Int4Config}: None keeps the matching layers
    in float, a dict changes some of the four settings above for them (e.g. {"group_size": 64}), an
    Int4Config gives all four. A name matched by an override is quantized even when it is not a target (e.g.
    {"lm_head": {}}). When several patterns match, the last one in the mapping wins.
    """
    group_size: int = 32
    method: str = DEFAULT_METHOD
    activation: str = "float"
    num_threads: Optional[int] = None
    targets: Union[str, tuple] = "all"
    overrides: Mapping[str, Union[None, dict, "Int4Config"]] = field(default_factory=dict)

    def __post_init__(self):
        ops.check_group_size(self.group_size)
        if self.method not in METHODS:
            raise ValueError(f"Int4Config method must be one of {METHODS}, got {self.method!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Int4Config activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        ops.check_num_threads(self.num_threads, allow_none=True)
        targets = self.targets
        if isinstance(targets, str):
            if targets not in PRESETS:
                raise ValueError(f"Int4Config targets {targets!r}: expected one of {sorted(PRESETS)} or a "
                                 f"sequence of attribute names")
        elif not all(isinstance(t, str) for t in targets):
            raise TypeError(f"Int4Config targets must be a preset name or a sequence of str, got {targets!r}")
        else:
            object.__setattr__(self, "targets", tuple(targets))
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"Int4Config overrides must be a mapping, got {type(self.overrides).__name__}")
        for pattern, value in self.overrides.items():
            self._override_settings(pattern, value)      # checked now, not at the first matching layer

    def settings(self) -> LayerSettings:
        return LayerSettings(self.group_size, self.method, self.activation, self.num_threads)

    def _override_settings(self, pattern, value) -> Optional[LayerSettings]:
        if not isinstance(pattern, str):
            raise TypeError(f"Int4Config overrides: keys are module names or patterns, got {pattern!r}")
        if value is None:
            return None
        if isinstance(value, Int4Config):
            return value.settings()
        if not isinstance(value, Mapping):
            raise TypeError(f"Int4Config overrides[{pattern!r}]: expected None, a dict or an Int4Config, "
                            f"got {type(value).__name__}")
        unknown = set(value) - set(_FIELDS)
        if unknown:
            raise ValueError(f"Int4Config overrides[{pattern!r}]: unknown settings {sorted(unknown)}; "
                             f"expected some of {list(_FIELDS)}")
        return dataclasses.replace(self, targets="all", overrides={}, **value).settings()

    def target_names(self) -> tuple:
        return PRESETS[self.targets] if isinstance(self.targets, str) else self.targets

    def chooser(self, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None):
        """choose(module, fqn) -> LayerSettings, None or the reason a layer is kept, as swap_layers_ takes it."""
        names = set(self.target_names())
        default = self.settings()
        overrides = [(p, self._override_settings(p, v)) for p, v in self.overrides.items()]

        def choose(module: nn.Module, fqn: str) -> Optional[LayerSettings]:
            if not isinstance(module, nn.Linear):
                return None
            chosen = None
            if fqn.rsplit(".", 1)[-1] in names and (filter_fn is None or filter_fn(module, fqn)):
                chosen = default
            for pattern, settings in overrides:
                if fqn == pattern or fnmatch.fnmatchcase(fqn, pattern):
                    chosen = settings if settings is not None else f"kept in float by overrides[{pattern!r}]"
            return chosen

        return choose


def quantize_(model: nn.Module, config: Optional[Int4Config] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, *, verbose: bool = False,
              progress: bool = False) -> nn.Module:
    """Quantize `model`'s linear layers in place as `config` says (default Int4Config()); return the model.

    filter_fn(module, fqn) -> bool narrows the targets further (overrides still apply). Everything else as
    quantize_model_: all layers are quantized before any is swapped, the report is model.quant4_report."""
    config = Int4Config() if config is None else config
    if not isinstance(config, Int4Config):
        raise TypeError(f"quantize_ expects an Int4Config, got {type(config).__name__}")
    why = ("not a target (" + " ".join(config.target_names()) + ")" if filter_fn is None
           else "not a target or not selected by filter_fn")
    return swap_layers_(model, config.chooser(filter_fn), why, verbose=verbose, progress=progress)
