"""llama2.c `.bin` checkpoints: read (legacy v0, fp32 v1, int8 v2) and write (v0, v1).

All integers little-endian.
  legacy (v0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); vocab_size < 0
      means an unshared classifier. Then fp32: tok_embeddings [V, D]; attention_norm [L, D]; wq [L, D, D];
      wk, wv [L, KV, D]; wo [L, D, D]; ffn_norm [L, D]; w1 [L, H, D]; w2 [L, D, H]; w3 [L, H, D]; norm [D];
      two RoPE tables [seq_len, head_size/2] (ignored); output [V, D] if unshared.
  v1: 256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version = 1, the 7 int32 params,
      uint8 shared_classifier, zero padding. Then fp32: attention_norm x L, ffn_norm x L, norm, tok_embeddings,
      wq x L, wk x L, wv x L, wo x L, w1 x L, w2 x L, w3 x L, output (if not shared).
  v2: as v1 with version = 2 and int32 group_size after shared_classifier; fp32 norms (attention x L,
      ffn x L, final), then for tok_embeddings, wq x L, ..., w3 x L, [output]: int8 codes then fp32 scales
      per group (w = q * scale). Loaded dequantized to fp32.
fp32 tensors are views of a copy-on-write memory map: nothing is read until used, and the file is never
modified.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from .llama import MAX_DIM, MAX_LAYERS, MAX_SEQ, MAX_VOCAB, ModelArgs
from .load import CheckpointError

MAGIC = 0x616B3432
HEADER_BYTES = 256


def _args_from_header(path, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) -> ModelArgs:
    checks = [("dim", dim, MAX_DIM), ("hidden_dim", hidden, MAX_DIM * 8), ("n_layers", n_layers, MAX_LAYERS),
              ("n_heads", n_heads, MAX_DIM), ("n_kv_heads", n_kv, MAX_DIM), ("vocab_size", vocab, MAX_VOCAB),
              ("seq_len", seq_len, MAX_SEQ)]
    for name, v, limit in checks:
        if not 0 < v <= limit:
            raise CheckpointError(f"{path}: header {name}={v} is out of range (1..{limit})")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointError(f"{path}: header dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} are inconsistent")
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                     hidden_dim=hidden, max_seq_len=seq_len)


def _fp32_layout(a: ModelArgs, order: str, shared: bool):
    """[(name, shape)] in file order for the fp32 formats."""
    L, D, H, V = a.n_layers, a.dim, a.hidden_dim, a.vocab_size
    KV = a.n_kv_heads * a.head_dim
    per_layer = {
        "attention_norm": (D,), "attention.wq": (D, D), "attention.wk": (KV, D), "attention.wv": (KV, D),
        "attention.wo": (D, D), "ffn_norm": (D,), "feed_forward.w1": (H, D), "feed_forward.w2": (D, H),
        "feed_forward.w3": (H, D),
    }

    def stack(kind):
        suffix = ".weight"
        return [(f"layers.{i}.{kind}{suffix}", per_layer[kind]) for i in range(L)]

    proj = ["attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    if order == "v0":
        out = [("tok_embeddings.weight", (V, D))] + stack("attention_norm")
        out += sum((stack(k) for k in proj[:4]), []) + stack("ffn_norm") + sum((stack(k) for k in proj[4:]), [])
        out += [("norm.weight", (D,)), ("_rope_cos", (a.max_seq_len, a.head_dim // 2)),
                ("_rope_sin", (a.max_seq_len, a.head_dim // 2))]
    else:
        out = stack("attention_norm") + stack("ffn_norm") + [("norm.weight", (D,)), ("tok_embeddings.weight", (V, D))]
        out += sum((stack(k) for k in proj), [])
    if not shared:
        out.append(("output.weight", (V, D)))
    return out


def read_llama2c(path) -> tuple[ModelArgs, dict]:
    """Read a llama2.c checkpoint -> (ModelArgs, state_dict in Meta names)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < 28:
        raise CheckpointError(f"{path}: file too short for a llama2.c header ({size} bytes)")
    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic == MAGIC:
        if len(head) < HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated header ({size} bytes, need {HEADER_BYTES})")
        params = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        args = _args_from_header(path, *params)
        args.tie_embeddings = shared
        if version == 1:
            return args, _read_fp32(path, args, "v1", shared, HEADER_BYTES, size)
        if version == 2:
            (group_size,) = struct.unpack_from("<i", head, 37)
            return args, _read_int8(path, args, shared, group_size, size)
        raise CheckpointError(f"{path}: unknown llama2.c version {version} (this reader knows 1 and 2)")
    params = list(struct.unpack_from("<7i", head, 0))
    shared = params[5] > 0
    params[5] = abs(params[5])
    args = _args_from_header(path, *params)
    args.tie_embeddings = shared
    return args, _read_fp32(path, args, "v0", shared, 28, size)


def _read_fp32(path, args, order, shared, offset, size):
    layout = _fp32_layout(args, order, shared)
    need = offset + 4 * sum(int(np.prod(s)) for _, s in layout)
    if size != need:
        raise CheckpointError(f"{path}: size {size} bytes does not match its header "
                              f"({order}, {args.n_layers} layers, dim {args.dim}): expected {need}")
    mm = np.memmap(path, dtype="<f4", mode="c", offset=offset, shape=((size - offset) // 4,))
    sd, pos = {}, 0
    for name, shape in layout:
        n = int(np.prod(shape))
        if not name.startswith("_"):
            sd[name] = torch.from_numpy(mm[pos:pos + n]).view(shape)
        pos += n
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def _read_int8(path, args, shared, group_size, size):
    if group_size <= 0 or group_size > MAX_DIM:
        raise CheckpointError(f"{path}: header group_size={group_size} is out of range")
    with open(path, "rb") as f:
        data = f.read()
    pos = HEADER_BYTES
    sd = {}

    def take(n, dtype, what):
        nonlocal pos
        nbytes = n * np.dtype(dtype).itemsize
        if pos + nbytes > len(data):
            raise CheckpointError(f"{path}: truncated at byte {pos} while reading {what}")
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
        pos += nbytes
        return arr

    L, D = args.n_layers, args.dim
    for kind in ("attention_norm", "ffn_norm"):
        for i in range(L):
            sd[f"layers.{i}.{kind}.weight"] = torch.from_numpy(take(D, "<f4", kind).copy())
    sd["norm.weight"] = torch.from_numpy(take(D, "<f4", "norm").copy())
    layout = dict(_fp32_layout(args, "v1", shared))
    names = ["tok_embeddings.weight"] + [f"layers.{i}.{k}.weight" for k in
                                         ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                          "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
                                         for i in range(L)]
    if not shared:
        names.append("output.weight")
    for name in names:
        shape = layout[name]
        n = int(np.prod(shape))
        if n % group_size:
            raise CheckpointError(f"{path}: {name} has {n} values, not a multiple of group_size {group_size}")
        q = take(n, "i1", name).astype(np.float32)
        s = take(n // group_size, "<f4", name + " scales")
        sd[name] = torch.from_numpy((q.reshape(-1, group_size) * s[:, None]).reshape(shape))
    if pos != len(data):
        raise CheckpointError(f"{path}: {len(data) - pos} unexpected trailing bytes after the last tensor")
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def write_llama2c(path, args: ModelArgs, sd: dict, version: int = 1) -> None:
    """Write a float checkpoint in llama2.c's legacy (0) or v1 (1) layout (for export and tests)."""
    if version not in (0, 1):
        raise ValueError(f"version must be 0 or 1, got {version}")
    shared = "output.weight" not in sd or torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    params = [args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size,
              args.max_seq_len]
    cos, sin = (t.numpy() for t in _rope_legacy(args))
    with open(path, "wb") as f:
        if version == 0:
            params[5] = args.vocab_size if shared else -args.vocab_size
            f.write(struct.pack("<7i", *params))
        else:
            header = struct.pack("<Ii7iB", MAGIC, 1, *params, int(shared))
            f.write(header + b"\0" * (HEADER_BYTES - len(header)))
        for name, shape in _fp32_layout(args, "v0" if version == 0 else "v1", shared):
            if name == "_rope_cos":
                arr = cos
            elif name == "_rope_sin":
                arr = sin
            else:
                arr = sd[name].detach().float().numpy()
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(arr.shape)}, expected {shape}")
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


def _rope_legacy(args):
    from .rope import tables

    return tables(args.head_dim, args.max_seq_len, args.rope_theta, None)
