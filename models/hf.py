"""Hugging Face Llama-family directories: config.json + *.safetensors (one file, or shards listed by
model.safetensors.index.json) + tokenizer.json or tokenizer.model.

model_type llama, mistral (contexts up to its sliding window) and qwen2 (q/k/v biases). Names map to Meta's;
the q/k row permutation Hugging Face's conversion applies (rotate-half RoPE instead of adjacent pairs) is
undone: within each head, HF rows [0, d/2) are the even rotary components and [d/2, d) the odd ones.
Config fields that would change the computation and are not implemented are refused by name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

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
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", r"layers.\1.attention.wq.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", r"layers.\1.attention.wk.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", r"layers.\1.attention.wv.bias"),
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
    """HF rotate-half row order -> Meta's adjacent-pair order, per head (a weight [rows, cols] or a bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair order -> HF rotate-half row order (what HF's conversion script does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


MODEL_TYPES = ("llama", "mistral", "qwen2")


def _refuse(cfg: dict, path, key: str, ok) -> None:
    if key in cfg and not ok(cfg[key]):
        raise CheckpointError(f"{path}: config.json {key}={cfg[key]!r} is not supported", option=None)


def rope_config(cfg: dict) -> tuple:
    """(rope_theta, scaling dict or None) from a config.json: the `rope_scaling` + `rope_theta` of most
    checkpoints, or the `rope_parameters` object transformers 5 writes."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and cfg.get("rope_scaling") is None:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0) if isinstance(params, dict) else 10000.0)
        scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind in ("yarn", "dynamic") and "original_max_position_embeddings" not in scaling:
            scaling = dict(scaling, original_max_position_embeddings=cfg.get("max_position_embeddings"))
    return theta, scaling


def args_from_config(cfg: dict, path, report: Optional[list] = None) -> ModelArgs:
    note = report.append if report is not None else (lambda s: None)
    arch = cfg.get("model_type")
    if arch not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {arch!r} is not supported ({', '.join(MODEL_TYPES)})")
    _refuse(cfg, path, "hidden_act", lambda v: v == "silu")
    _refuse(cfg, path, "mlp_bias", lambda v: not v)
    _refuse(cfg, path, "attention_bias", lambda v: not v)       # llama's: biases on all four projections
    _refuse(cfg, path, "pretraining_tp", lambda v: v in (None, 1))
    try:
        theta, scaling = rope_config(cfg)
        n_heads = cfg["num_attention_heads"]
        max_seq = cfg.get("max_position_embeddings") or 2048
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "dynamic":
            max_seq = int(max_seq * scaling.get("factor", 1))     # NTK scaling is what runs past the original
        max_seq = min(max_seq, 1 << 20)
        window = cfg.get("sliding_window")
        if window and (arch == "mistral" or cfg.get("use_sliding_window")) and window < max_seq:
            note(f"sliding-window attention ({window} tokens): the context is capped at {window} tokens, where "
                 f"it equals full attention")
            max_seq = window
        return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                         n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
                         head_dim=cfg.get("head_dim"), max_seq_len=max_seq, qkv_bias=arch == "qwen2",
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise CheckpointError(f"{path}: config.json lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json is inconsistent: {exc}") from None


def _weight_files(d: Path) -> list:
    """The safetensors files of a directory: those model.safetensors.index.json lists (all must exist), else
    every *.safetensors file."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
        if not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in names):
            raise CheckpointError(f"{index}: the weight map names files outside the directory")
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointError(f"{d}: shard {missing[0]} listed in model.safetensors.index.json is missing"
                                  f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        return [d / n for n in names]
    return sorted(d.glob("*.safetensors"))


def read_config(d: Path) -> dict:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{d / 'config.json'}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / 'config.json'}: not a JSON object")
    return cfg


def read_hf(directory, report: Optional[list] = None) -> tuple[ModelArgs, dict]:
    """Read a Hugging Face directory -> (ModelArgs, state_dict in Meta names and RoPE order), tensors in the
    dtype the files hold."""
    d = Path(directory)
    args = args_from_config(read_config(d), d, report)
    sd = {}
    for name, t in iter_hf_tensors(d, args):
        sd[name] = t
    if "output.weight" not in sd and args.tie_embeddings:
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    return args, sd


def iter_hf_tensors(d: Path, args: ModelArgs):
    """(Meta name, tensor) for each tensor of the directory's safetensors files, one at a time."""
    from safetensors import SafetensorError

    files = _weight_files(d)
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors files")
    for file in files:
        try:
            yield from _read_hf_file(file, args)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read tensors ({exc})") from None


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(file):
    """(name, tensor) for each tensor of a safetensors file, in file order, each read into its own memory.

    safetensors' reader memory-maps the file and its tensors are views of the map, so every page a reader
    touched stays resident while any tensor of the file lives: a 5 GB shard costs 5 GB of resident memory.
    Reading each tensor with plain file reads at the offsets the header gives keeps memory at one tensor.
    The header is validated first (JSON object, known dtypes, offsets inside the file and matching the shapes)."""
    from quant4.serialization import FormatError, read_safetensors_header

    file = Path(file)
    size = file.stat().st_size
    try:
        header, data_start = read_safetensors_header(file)
    except FormatError as exc:
        raise CheckpointError(str(exc)) from None
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {key!r}: dtype {info.get('dtype') if isinstance(info, dict) else info!r}"
                                  f" is not F32/F16/BF16, or its entry is malformed") from None
        numel = 1
        for x in shape:
            if x < 0:
                raise CheckpointError(f"{file}: tensor {key!r} has shape {shape}")
            numel *= x
        if end - begin != numel * dtype.itemsize or not 0 <= begin <= end <= size - data_start:
            raise CheckpointError(f"{file}: tensor {key!r}: offsets {begin}..{end} do not fit its shape "
                                  f"{shape} or the file")
        entries.append((begin, key, dtype, shape, end))
    with open(file, "rb") as f:
        for begin, key, dtype, shape, end in sorted(entries):
            t = torch.empty(shape, dtype=dtype)
            f.seek(data_start + begin)
            got = f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else bytearray(0))
            if got != end - begin:
                raise CheckpointError(f"{file}: tensor {key!r} is cut short")
            yield key, t


def _read_hf_file(file, args: ModelArgs):
    for key, t in read_safetensors(file):
        name = _meta_name(key)
        if name is None:
            if _IGNORED.match(key):
                continue
            raise CheckpointError(f"{file}: unexpected tensor {key!r} for a llama model")
        if ".attention.wq." in name:
            t = unpermute(t, args.n_heads)
        elif ".attention.wk." in name:
            t = unpermute(t, args.n_kv_heads)
        yield name, t


def write_hf(directory, args: ModelArgs, sd: dict) -> None:
    """Write a Hugging Face style directory (for tests and export)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in sd.items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if ".attention.wq." in name:
            t = permute(t, args.n_heads)
        elif ".attention.wk." in name:
            t = permute(t, args.n_kv_heads)
        out[_hf_name(name)] = t.contiguous()
    save_file(out, str(d / "model.safetensors"))
    arch = "qwen2" if args.qkv_bias else "llama"
    cfg = {"model_type": arch, "architectures": ["Qwen2ForCausalLM" if args.qkv_bias else "LlamaForCausalLM"],
           "hidden_size": args.dim, "head_dim": args.head_dim, "hidden_act": "silu",
           "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings}
    if args.rope_scaling is not None:
        cfg["rope_scaling"] = args.rope_scaling
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
