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


# An int4 directory (written by quantize.py --out DIR or by quant4.hf's save_pretrained): per quantized layer
# <hf name>.qweight / .scales / .zeros (/ .bias) in quant4's stored format, HF's row order, and config.json's
# quantization_config naming the layers and their group sizes. quant4.hf.Quant4Config reads the same keys.
INT4_TENSORS = ("qweight", "scales", "zeros")
QUANT_METHOD = "quant4"


def int4_config(cfg: dict, d: Path) -> Optional[dict]:
    """config.json's quantization_config when it is quant4's (None for a float directory); another tool's is
    refused by name."""
    from quant4.ops import check_group_size
    from quant4.scheme import FORMAT_VERSION

    qc = cfg.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise CheckpointError(f"{d}: quantized by {method!r} (quantization_config); quant4 reads float "
                              f"directories and its own int4 ones")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{d}: quant4 format_version {qc.get('format_version')!r} (this quant4 reads "
                              f"{FORMAT_VERSION})")
    sizes = qc.get("group_sizes")
    if not isinstance(sizes, dict) or not sizes:
        raise CheckpointError(f"{d}: quantization_config has no group_sizes (the int4 layers)")
    for name, g in sizes.items():
        try:
            check_group_size(g)
        except ValueError as exc:
            raise CheckpointError(f"{d}: quantization_config group_sizes[{name!r}]: {exc}") from None
    return qc


def read_hf_int4(directory, report: Optional[list] = None):
    """An int4 directory -> (ModelArgs, layers {Meta name: info} as a quant4 file lists them, tensors in Meta
    names and RoPE order)."""
    d = Path(directory)
    cfg = read_config(d)
    qc = int4_config(cfg, d)
    args = args_from_config(cfg, d, report)
    layers = {}
    for hf_name, g in qc["group_sizes"].items():
        meta = _meta_name(f"{hf_name}.weight") if isinstance(hf_name, str) else None
        layer = meta[: -len(".weight")] if meta is not None else ""
        shape = _linear_shape(args, layer)
        if shape is None:
            raise CheckpointError(f"{d}: quantization_config names {hf_name!r}, not a layer of this model")
        layers[layer] = {"group_size": g, "out_features": shape[0], "in_features": shape[1]}
    tensors = dict(iter_hf_tensors(d, args, int4=True))
    return args, layers, tensors


def _linear_shape(args: ModelArgs, layer: str):
    """[out, in] of a Meta-named linear layer of this config, or None."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    m = re.fullmatch(r"layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.w[123])", layer)
    if layer == "output":
        return args.vocab_size, args.dim
    if m is None or int(m.group(1)) >= args.n_layers:
        return None
    return {"attention.wq": (q, args.dim), "attention.wk": (kv, args.dim), "attention.wv": (kv, args.dim),
            "attention.wo": (args.dim, q), "feed_forward.w1": (args.hidden_dim, args.dim),
            "feed_forward.w2": (args.dim, args.hidden_dim), "feed_forward.w3": (args.hidden_dim, args.dim)}[m.group(2)]


TOKENIZER_AND_GENERATION_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                  "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def write_hf_int4(out, source, model, args: ModelArgs, *, method: str) -> None:
    """Write `model` (Meta names, Int4Linear layers) as an int4 Hugging Face directory next to its float source
    directory: source's config.json plus quantization_config, tokenizer and generation files copied, tensors
    under HF names in HF's row order. Written into a temporary directory renamed into place."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from quant4.nn import Int4Linear
    from quant4.scheme import FORMAT_VERSION

    out, source = Path(out), Path(source)
    cfg = read_config(source)
    tensors, sizes = {}, {}
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state") or (name == "output.weight" and args.tie_embeddings):
            continue
        layer, _, suffix = name.rpartition(".")
        hf = _hf_name(f"{layer}.weight" if layer in int4 else name)
        if hf is None:
            raise ValueError(f"no Hugging Face name for {name!r}")
        if layer in int4:
            hf = hf[: -len("weight")] + suffix
            sizes[hf.rpartition(".")[0]] = int4[layer].group_size
        if ".attention.wq." in name:
            t = permute(t, args.n_heads)
        elif ".attention.wk." in name:
            t = permute(t, args.n_kv_heads)
        tensors[hf] = t.contiguous()
    cfg["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method,
        "group_size": max(set(sizes.values()), key=list(sizes.values()).count), "activation": "float",
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in sizes}), "modules_to_not_convert": None,
        "group_sizes": dict(sorted(sizes.items()))}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name in TOKENIZER_AND_GENERATION_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def iter_hf_tensors(d: Path, args: ModelArgs, int4: bool = False):
    """(Meta name, tensor) for each tensor of the directory's safetensors files, one at a time (int4: also the
    qweight / scales / zeros of an int4 directory's layers)."""
    from safetensors import SafetensorError

    files = _weight_files(d)
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors files")
    for file in files:
        try:
            yield from _read_hf_file(file, args, int4)
        except (SafetensorError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read tensors ({exc})") from None


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INT4_DTYPES = dict(_DTYPES, U8=torch.uint8)      # an int4 directory's packed codes


def read_safetensors(file, dtypes: dict = _DTYPES):
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
            dtype = dtypes[info["dtype"]]
            shape = [int(x) for x in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {key!r}: dtype {info.get('dtype') if isinstance(info, dict) else info!r}"
                                  f" is not {'/'.join(dtypes)}, or its entry is malformed") from None
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


def _read_hf_file(file, args: ModelArgs, int4: bool = False):
    for key, t in read_safetensors(file, _INT4_DTYPES if int4 else _DTYPES):
        base, _, suffix = key.rpartition(".")
        if int4 and suffix in INT4_TENSORS:
            name = _meta_name(base + ".weight")
            name = None if name is None else name[: -len("weight")] + suffix
        else:
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
