"""GGUF (llama.cpp) llama models in and out, through the `gguf` package.

Import (read_gguf): general.architecture must be "llama". Q4_0 and Q4_1 projections become quant4 int4
layers with group size 32 without re-quantization; F32/F16/BF16 tensors load as float32; any other type is
dequantized and re-quantized to int4 g32 if it is one of the seven projections, kept in float otherwise
(embeddings, norms, output). The tensor conversion itself is quant4.interop.ggml. The tokenizer comes from the file: the
original SentencePiece model if quant4 wrote it (key quant4.tokenizer.sentencepiece, base64), else rebuilt
from tokenizer.ggml.tokens / scores / token_type (needs the protobuf package).

Export (write_gguf): int4 layers whose in_features is a multiple of 32 become Q4_1 (d = scale exactly, m =
zero - 8 scale rounded to float16; any group size maps onto its 32-blocks), every other tensor F32; the
metadata keys and tensor names are llama.cpp's for architecture "llama"; tied embeddings are written once
(llama.cpp falls back to token_embd for a missing output.weight). Q/K rows stay in Meta's interleaved RoPE
order, which is what llama.cpp's "llama" architecture expects.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

from .llama import ModelArgs
from .load import CheckpointError
from quant4.interop import ggml
from quant4.serialization import TOKENIZER_KEY, tokenizer_from_header, tokenizer_header

PROJECTIONS = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3"}
BLOCK_NAMES = {**PROJECTIONS, "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}


def meta_name(gguf_name: str) -> Optional[str]:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in BLOCK_NAMES:
        return f"layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in TOP_NAMES:
        return TOP_NAMES[m.group(1)]
    return None


def gguf_name(meta: str) -> str:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", meta)
    if m:
        inv = {v: k for k, v in BLOCK_NAMES.items()}
        return f"blk.{m.group(1)}.{inv[m.group(2)]}.weight"
    return f"{ {v: k for k, v in TOP_NAMES.items()}[meta]}.weight"


def _field(reader, key, default=None):
    f = reader.get_field(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as exc:
        raise CheckpointError(f"GGUF key {key} cannot be read ({exc})") from None


def read_gguf(path, *, report: Optional[list] = None):
    """-> (ModelArgs, layers, tensors, TokenizerSource or None) in quant4's format (see module doc)."""
    import gguf

    path = Path(path)
    note = report.append if report is not None else (lambda s: None)
    _check_header(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:     # the package raises ValueError, struct.error, IndexError, ... on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not 'llama'")

    def num(key, default=None, kind=int):
        v = _field(reader, f"llama.{key}", default)
        if v is None:
            raise CheckpointError(f"{path}: GGUF key llama.{key} is missing")
        try:
            if kind is str:
                if not isinstance(v, str):
                    raise TypeError
                return v
            return kind(v) if kind is int else float(f"{float(v):.7g}")   # stored as float32: 1e-5 not 9.99e-6
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: GGUF key llama.{key} = {v!r} is not a number") from None

    dim, n_layers, n_heads = num("embedding_length"), num("block_count"), num("attention.head_count")
    n_kv = num("attention.head_count_kv", n_heads)
    hidden = num("feed_forward_length")
    for key, v in (("embedding_length", dim), ("block_count", n_layers), ("attention.head_count", n_heads),
                   ("attention.head_count_kv", n_kv), ("feed_forward_length", hidden)):
        if not 0 < v <= 1 << 20:
            raise CheckpointError(f"{path}: GGUF key llama.{key} = {v} is out of range")
    head_dim = num("attention.key_length", dim // n_heads if n_heads else 0)
    if num("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{path}: attention.key_length != attention.value_length is not supported")
    if (head_dim == dim // n_heads and dim % n_heads) or n_heads % n_kv or not 0 < head_dim <= 1 << 16:
        raise CheckpointError(f"{path}: dim {dim}, heads {n_heads}, kv heads {n_kv}, head dim {head_dim} are "
                              f"inconsistent")
    if num("rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"{path}: partial RoPE (rope.dimension_count != head dim) is not supported")
    context = num("context_length", 2048)
    if not 0 < context <= 1 << 20:
        raise CheckpointError(f"{path}: GGUF key llama.context_length = {context} is out of range")

    tensors, layers, requant, floats, eight = {}, {}, [], [], []
    rope_freqs = None
    for t in reader.tensors:
        if not t.name or not t.name.isprintable():
            raise CheckpointError(f"{path}: a tensor has the name {t.name!r}: the tensor table is damaged")
        if t.name == "rope_freqs.weight":        # Llama 3.1+ rotary frequency divisors (llama.cpp's converter)
            if int(t.n_elements) != head_dim // 2 or int(t.tensor_type) != 0:
                raise CheckpointError(f"{path}: rope_freqs.weight must be {head_dim // 2} F32 values")
            rope_freqs = [float(f) for f in np.asarray(t.data, dtype=np.float32).reshape(-1)]
            continue
        name = meta_name(t.name)
        if name is None:
            note(f"ignored tensor {t.name}")
            continue
        try:
            import gguf

            shape = tuple(int(x) for x in reversed([int(s) for s in t.shape]))    # numpy order [rows, cols]
            is_proj = any(name.endswith(p) for p in PROJECTIONS.values())
            type_name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
            # the output head and the token embeddings: int4 where the file holds them in Q4_0 / Q4_1 (no loss),
            # 8 bits in another quantized type, float in a float type; the projections are int4 whatever the type
            if (name in ("output", "tok_embeddings") and type_name not in ("F32", "F16", "BF16", "Q4_0", "Q4_1")
                    and len(shape) == 2 and shape[1] % 32 == 0):
                # a head or table in another quantized type (Q6_K, Q8_0, ...): 8 bits, not 32
                # (quant4.int8_linear.Int8Linear, quant4.embedding.Int8Embedding)
                tensors[f"{name}.codes"], tensors[f"{name}.scales"] = ggml.to_int8(t.data, type_name, shape)
                layers[name] = {"in_features": shape[1], "out_features": shape[0],
                                "kind": "int8" if name == "output" else "int8-embedding"}
                eight.append(f"{'head' if name == 'output' else 'token table'} {type_name}")
                _release(reader, t)
                continue
            c = ggml.to_quant4(t.data, type_name, shape,
                               is_proj or (name in ("output", "tok_embeddings") and type_name in ("Q4_0", "Q4_1")))
        except Exception as exc:     # short data, bad shapes, unknown types: all mean a damaged file
            raise CheckpointError(f"{path}: tensor {t.name}: {type(exc).__name__}: {exc}") from None
        _release(reader, t)
        if c.weight is not None:
            tensors[f"{name}.weight"] = c.weight
            if any(name.endswith(p) for p in PROJECTIONS.values()):    # a projection the file holds in float
                floats.append(name)
        else:
            tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = \
                c.qweight, c.scales, c.zeros
            layers[name] = {"in_features": shape[1], "out_features": shape[0], "group_size": 32}
            if name == "tok_embeddings":
                layers[name]["kind"] = "embedding"
            if c.requantized:
                requant.append(name)
    for what in eight:
        note(f"{what} held in 8 bits ({'exactly' if what.endswith('Q8_0') else 'Q8_0 rounding of its values'})")
    if requant:
        note(f"{len(requant)} projections in other GGML types were dequantized and re-quantized to int4 g32")
    if floats:
        note(f"{len(floats)} projections are float in the file (F32/F16/BF16; quant4 exports int4 layers whose "
             f"in_features is not a multiple of 32 that way), e.g. {floats[0]}: they stay float")
    if "tok_embeddings.weight" in tensors:
        vocab = tensors["tok_embeddings.weight"].shape[0]
    elif "tok_embeddings" in layers:
        vocab = layers["tok_embeddings"]["out_features"]
    else:
        raise CheckpointError(f"{path}: no token_embd.weight")
    tied = "output.weight" not in tensors and "output" not in layers
    try:
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
                         hidden_dim=hidden, norm_eps=num("attention.layer_norm_rms_epsilon", 1e-5, float),
                         rope_theta=num("rope.freq_base", 10000.0, float), rope_scaling=_rope_scaling(num, rope_freqs, path),
                         head_dim=head_dim if head_dim != dim // n_heads else None,
                         max_seq_len=context, tie_embeddings=tied)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    n_linear = sum(1 for info in layers.values() if "kind" not in info)
    table = ", the token table int4" if layers.get("tok_embeddings", {}).get("kind") == "embedding" else ""
    note(f"{n_linear} int4 layers (Q4_0/Q4_1 kept as is){table}, "
         f"{sum(1 for k in tensors if k.endswith('.weight'))} float tensors")
    return args, layers, tensors, _tokenizer(reader, path)


def _release(reader, t) -> None:
    """Drop the file pages of a tensor already converted (the reader's read-only memory map keeps every page it
    read resident until the map closes: loading a 5.1 GB 7B file peaked at 11.3 GB). The pages are read again
    from the file if anything touches them."""
    import mmap

    m = getattr(reader.data, "_mmap", None)
    if m is None or not hasattr(m, "madvise"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = int(t.data_offset) + int(t.n_bytes)
    try:
        m.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError, AttributeError):
        pass


def _rope_scaling(num, rope_freqs, path):
    """rope_scaling from llama.rope.scaling.* keys (linear, yarn) or the rope_freqs tensor (Llama 3.1+)."""
    kind = num("rope.scaling.type", "none", str)
    if rope_freqs is not None:
        if kind not in ("none", "linear"):
            raise CheckpointError(f"{path}: rope_freqs together with rope.scaling.type {kind!r}")
        return {"rope_type": "freqs", "factors": rope_freqs}
    if kind == "none":
        return None
    factor = num("rope.scaling.factor", 1.0, float)
    if kind == "linear":
        return None if factor == 1.0 else {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": factor,
                "original_max_position_embeddings": num("rope.scaling.original_context_length")}
    raise CheckpointError(f"{path}: GGUF rope.scaling.type {kind!r} is not supported (linear, yarn)")


def _check_header(path: Path) -> None:
    """Magic, version and counts, before the gguf package walks the file."""
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {head[:4]!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise CheckpointError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys")


def _tokenizer(reader, path):
    """The tokenizer the file carries: quant4's own keys (the exact tokenizer quant4 wrote) first, else the
    tokenizer.ggml.* vocabulary (models/gguf_vocab.py); None if neither."""
    from .gguf_vocab import read_vocab
    from .load import _carried

    try:
        carried = tokenizer_from_header(lambda key: _field(reader, key))
        if carried is not None:
            return _carried(carried, path)
        return read_vocab(lambda key: _field(reader, key), path)
    except (TypeError, ValueError, IndexError) as exc:     # fields of the wrong type or length
        raise CheckpointError(f"{path}: GGUF tokenizer fields are malformed ({exc})") from None


def write_gguf(model, args: ModelArgs, path, *, tokenizer=None, tokenizer_path=None, overwrite: bool = False,
               report: Optional[list] = None) -> Path:
    """Write `model` (float and/or Int4Linear layers; a float, Int4Embedding or 8-bit table; an 8-bit head) as a
    GGUF llama model, atomically (see module doc): int4 as Q4_1, 8-bit as F32 values. tokenizer: a
    TokenizerSource to write (or tokenizer_path: a tokenizer file)."""
    if tokenizer is None and tokenizer_path is not None:
        from .tokenizer import open_tokenizer

        tokenizer = open_tokenizer(tokenizer_path)
    import gguf

    from quant4 import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
    from quant4.serialization import atomic_write

    note = report.append if report is not None else (lambda s: None)
    int4 = {n: m for n, m in model.named_modules() if isinstance(m, (Int4Linear, Int4Embedding))}
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))}
    if args.tie_embeddings:
        int4.pop("output", None)        # a tied head is the embedding table, written once
        int8.pop("output", None)
    items = []          # (gguf name, numpy array, raw dtype or None)
    max_round = 0.0
    sd = model.state_dict()
    written = set()
    for key, t in sd.items():
        if key.endswith("_extra_state"):
            continue
        base = key.rsplit(".", 1)[0]
        if base in int8:
            if base not in written:
                written.add(base)
                note(f"{base}: 8-bit {'head' if base == 'output' else 'table'} written as F32 (its exact values)")
                items.append((gguf_name(base), int8[base].dequantize().numpy(), None))
            continue
        if base in int4:
            if base in written:
                continue
            written.add(base)
            m = int4[base]
            if getattr(m, "bias", None) is not None:
                raise ValueError(f"{base}: GGUF llama layers have no bias")
            if m.in_features % 32 == 0:
                blocks, err = ggml.from_int4(m)
                max_round = max(max_round, err)
                items.append((gguf_name(base), blocks, gguf.GGMLQuantizationType.Q4_1))
            else:
                note(f"{base}: in_features {m.in_features} is not a multiple of 32; written as F32 "
                     f"(its exact int4 values)")
                items.append((gguf_name(base), m.dequantize().numpy().astype(np.float32), None))
            continue
        if key.startswith("output.") and args.tie_embeddings:
            continue
        if key.startswith("rope_"):
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        items.append((gguf_name(name), t.detach().float().contiguous().numpy(), None))
    note(f"Q4_1 offsets rounded to float16: largest change of a weight {max_round:.3g}")
    freqs = rope_freq_factors(args)
    if freqs is not None:
        items.append(("rope_freqs.weight", freqs, None))

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch="llama")
        w.add_name("quant4 export")
        add_llama_metadata(w, args)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if int4 else gguf.LlamaFileType.ALL_F32)
        if tokenizer is not None:
            _add_tokenizer(w, tokenizer)
        for name, arr, raw in items:
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write, overwrite=overwrite)


def rope_freq_factors(args: ModelArgs):
    """The rope_freqs tensor llama.cpp reads for Llama 3.1-style scaling (divisors of the base frequencies),
    None for plain RoPE and the types GGUF keys describe; ValueError for types llama.cpp cannot represent."""
    from . import rope

    sc = args.rope_scaling
    if sc is None or sc["rope_type"] in ("linear", "yarn"):
        return None
    if sc["rope_type"] == "dynamic":
        raise ValueError("dynamic (NTK) RoPE scaling has no GGUF representation")
    scaled, _ = rope.inv_freq(args.head_dim, args.rope_theta, sc, 1)
    base, _ = rope.inv_freq(args.head_dim, args.rope_theta, None, 1)
    return (base / scaled).float().numpy()


def add_llama_metadata(w, args: ModelArgs) -> None:
    """The llama.* hyperparameter keys llama.cpp reads for architecture "llama"."""
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    sc = args.rope_scaling
    if sc is not None and sc["rope_type"] in ("linear", "yarn"):
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if sc["rope_type"] == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(sc["factor"])
        if sc["rope_type"] == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)


def _add_tokenizer(w, source) -> None:
    """The tokenizer as llama.cpp reads it (tokenizer.ggml.*) and, exactly, under quant4's own keys."""
    from .gguf_vocab import write_vocab

    write_vocab(w, source)
    for key, value in tokenizer_header(source.kind, source.data, source.settings).items():
        w.add_string(key, value)
