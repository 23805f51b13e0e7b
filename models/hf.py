"""Hugging Face Llama directories: config.json + *.safetensors (+ tokenizer.model).

Names map to Meta's; the q/k row permutation Hugging Face's conversion applies (rotate-half RoPE instead of
adjacent pairs) is undone: within each head, HF rows [0, d/2) are the even rotary components and [d/2, d)
the odd ones.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .llama import ModelArgs
from .load import CheckpointError

_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _meta_name(hf_name: str):
    for pat, rep in _NAMES:
        if re.fullmatch(pat, hf_name):
            return re.sub(pat, rep, hf_name)
    return None


def _hf_name(meta_name: str):
    for pat, rep in _NAMES:
        hf_pat = re.sub(r"\\\.", ".", pat).replace(r"(\d+)", "{}")
        meta_pat = rep.replace(r"\1", "{}")
        m = re.fullmatch(re.escape(meta_pat).replace(r"\{\}", r"(\d+)"), meta_name)
        if m:
            return hf_pat.format(*m.groups())
    return None


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> Meta's adjacent-pair order, per head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair order -> HF rotate-half row order (what HF's conversion script does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def args_from_config(cfg: dict, path) -> ModelArgs:
    try:
        return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                         n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
                         max_seq_len=min(cfg.get("max_position_embeddings", 2048), 1 << 16),
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise CheckpointError(f"{path}: config.json lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json is inconsistent: {exc}") from None


def read_hf(directory) -> tuple[ModelArgs, dict]:
    """Read a Hugging Face Llama directory -> (ModelArgs, state_dict in Meta names and RoPE order)."""
    from safetensors import SafetensorError

    d = Path(directory)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no config.json") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / 'config.json'}: not a JSON object")
    arch = cfg.get("model_type")
    if arch != "llama":
        raise CheckpointError(f"{d}: model_type {arch!r} is not 'llama'")
    args = args_from_config(cfg, d)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors files")
    sd = {}
    for file in files:
        try:
            _read_hf_file(file, args, sd)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read tensors ({exc})") from None
    if "output.weight" not in sd and args.tie_embeddings:
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    return args, sd


def _read_hf_file(file, args: ModelArgs, sd: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            name = _meta_name(key)
            if name is None:
                if _IGNORED.match(key):
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {key!r} for a llama model")
            t = f.get_tensor(key)
            if name.endswith("attention.wq.weight"):
                t = unpermute(t, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = unpermute(t, args.n_kv_heads)
            sd[name] = t


def write_hf(directory, args: ModelArgs, sd: dict) -> None:
    """Write a Hugging Face style directory (for tests and export)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in sd.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            t = permute(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute(t, args.n_kv_heads)
        out[_hf_name(name)] = t.contiguous()
    save_file(out, str(d / "model.safetensors"))
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": args.dim,
           "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
