"""Rotary position embedding frequencies, with the context-extension schemes Llama-family checkpoints use.

`scaling` is the checkpoint's RoPE scaling description, normalised by `check_scaling` to a dict with a
"rope_type" and that type's fields (the names Hugging Face's config.json uses):
  linear    factor                               positions divided by factor
  dynamic   factor, original_max_position_embeddings
                                                 NTK-aware: the base grows once a sequence is longer than the
                                                 original context (so the tables depend on the sequence length)
  llama3    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings   (Llama 3.1+)
  yarn      factor, original_max_position_embeddings, beta_fast (32), beta_slow (1), mscale, mscale_all_dim,
            attention_factor, truncate (true)
  freqs     factors: one divisor per frequency (what llama.cpp stores as the rope_freqs tensor of a Llama 3.1
            GGUF, computed by its converter from the llama3 fields)
Any other type is refused by name: running a model with the wrong frequencies gives worse text, silently.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

TYPES = ("linear", "dynamic", "llama3", "yarn", "freqs")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor", "original_max_position_embeddings"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings"), "freqs": ("factors",)}
_OPTIONAL = {"yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")}


def check_scaling(scaling, head_dim: int) -> Optional[dict]:
    """A RoPE scaling dict as stored in a checkpoint -> the normalised dict (None: no scaling). ValueError names
    the field that is missing, unknown or out of range."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be an object, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in TYPES:
        raise ValueError(f"rope_scaling rope_type {kind!r} is not supported (supported: {', '.join(TYPES)})")
    out = {"rope_type": kind}
    for key in _REQUIRED[kind] + _OPTIONAL.get(kind, ()):
        if key not in scaling or scaling[key] is None:
            if key in _REQUIRED[kind]:
                raise ValueError(f"rope_scaling ({kind}) lacks {key!r}")
            continue
        v = scaling[key]
        if key == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"rope_scaling {key}={v!r} must be true or false")
        elif key == "factors":
            if not isinstance(v, (list, tuple)) or len(v) != head_dim // 2:
                raise ValueError(f"rope_scaling factors must be a list of {head_dim // 2} numbers")
            v = [float(f) for f in v]
            if not all(math.isfinite(f) and f > 0 for f in v):
                raise ValueError("rope_scaling factors must be finite and > 0")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"rope_scaling {key}={v!r} must be a finite number")
            if key in ("factor", "original_max_position_embeddings") and v <= 0:
                raise ValueError(f"rope_scaling {key}={v!r} must be > 0")
        out[key] = v
    if kind == "llama3" and out["low_freq_factor"] == out["high_freq_factor"]:
        raise ValueError("rope_scaling (llama3) low_freq_factor equals high_freq_factor")
    return out


def _default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(head_dim: int, theta: float, scaling: Optional[dict], seq_len: int) -> tuple[torch.Tensor, float]:
    """-> (inverse frequencies [head_dim/2] in float64, attention factor multiplying cos and sin)."""
    base = _default_inv_freq(head_dim, theta)
    if scaling is None:
        return base, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return base / scaling["factor"], 1.0
    if kind == "freqs":
        return base / torch.tensor(scaling["factors"], dtype=torch.float64), 1.0
    if kind == "dynamic":
        orig = scaling["original_max_position_embeddings"]
        if seq_len <= orig:
            return base, 1.0
        factor = scaling["factor"]
        theta = theta * ((factor * seq_len / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return _default_inv_freq(head_dim, theta), 1.0
    if kind == "llama3":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > low_wavelen, base / factor, base)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    attention = scaling.get("attention_factor")
    if attention is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention = _yarn_mscale(factor, scaling["mscale"]) / _yarn_mscale(factor, scaling["mscale_all_dim"])
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations):
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    extrapolation = 1 - ramp
    return base / factor * (1 - extrapolation) + base * extrapolation, float(attention)


def depends_on_length(scaling: Optional[dict]) -> bool:
    return scaling is not None and scaling["rope_type"] == "dynamic"


def tables(head_dim: int, n: int, theta: float, scaling: Optional[dict], seq_len: Optional[int] = None):
    """cos, sin: [n, head_dim/2] float32 for positions 0..n-1 (adjacent-pair rotation). seq_len: the length
    of the sequence being run, for the scaling types whose frequencies depend on it (default n)."""
    freqs, attention = inv_freq(head_dim, theta, scaling, seq_len or n)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs)
    return (angles.cos() * attention).float(), (angles.sin() * attention).float()
