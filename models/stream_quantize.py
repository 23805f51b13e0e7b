"""Quantize a float checkpoint while reading it, one tensor at a time: the whole float model never exists.

The model is built on the meta device; each tensor read from the checkpoint is either quantized at once (a
selected projection: its int4 layer replaces the nn.Linear and the float tensor is dropped) or assigned to
the model as it is (embeddings, norms, layers kept in float). Peak memory is about the int4 model plus the
largest single tensor in fp32 plus what the reader holds: Hugging Face directories are read tensor by tensor
from their safetensors files (sharded or not); the other float formats through their readers (memory-mapped
where the format allows).

Methods "rtn", "search" and "refit" (the default; per layer, no calibration). GPTQ needs the activations of the layers before, so
it runs on a loaded model instead (quant4.gptq).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from quant4 import ops
from quant4.memory import release_freed_memory
from quant4.nn import Int4Linear
from quant4.options import DEFAULT_METHOD
from quant4.swap import SwapRecord, SwapReport, is_projection, weight_sqnr_db

from .llama import Transformer
from .load import CheckpointError, Loaded, _detect, check_layer_count
from .tokenizer import open_tokenizer


def _tensors(path, kind: str, report: Optional[list]):
    """(ModelArgs, iterator of (Meta name, tensor), number of tensors or None)."""
    if kind == "hf":
        from .hf import args_from_config, int4_config, iter_hf_tensors, read_config, _weight_files

        cfg = read_config(path)
        if int4_config(cfg, path) is not None:
            raise CheckpointError(f"{path} is already int4 (quant4); quantize its float checkpoint")
        args = args_from_config(cfg, path, report)
        names = None
        try:
            from safetensors import safe_open

            names = []
            for f in _weight_files(path):
                with safe_open(str(f), framework="pt") as h:
                    names += list(h.keys())
        except Exception:      # the names are for the checks below; the reader reports damage itself
            names = None
        if names is not None:   # the tensors must confirm the config's layer count before a model is built
            check_layer_count(args, [n.removeprefix("model.") for n in names], path)
        return args, iter_hf_tensors(path, args), None if names is None else len(names)
    if kind == "llama2c":
        from .llama2c import read_llama2c

        args, sd = read_llama2c(path)
    elif kind == "float-safetensors":
        from .load import read_float_safetensors

        args, sd = read_float_safetensors(path)
    else:
        raise CheckpointError(f"{path}: streaming quantization reads Hugging Face directories, llama2.c .bin "
                              f"and quant4 float files; load a {kind} checkpoint with load_model and use "
                              f"quantize_model_")

    check_layer_count(args, sd, path)

    def drain():
        while sd:                       # pop: the reader's reference goes as soon as the tensor is used
            yield sd.popitem()

    return args, drain(), len(sd)


def quantize_checkpoint(path, group_size: int = 32, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                        *, method: str = DEFAULT_METHOD, tokenizer=None, num_threads: Optional[int] = None,
                        report: Optional[list] = None, progress: bool = False) -> Loaded:
    """Read a float checkpoint and quantize its selected nn.Linear layers (filter_fn(module, name), default the
    seven projections) as their weights arrive -> Loaded with the int4 model; model.quant4_report as from
    quantize_model_. Only the checkpoint kinds listed in the module doc; others raise CheckpointError."""
    from pathlib import Path

    if method not in ops.METHODS:
        raise ValueError(f"method must be one of {ops.METHODS}, got {method!r}")
    ops.check_group_size(group_size)
    path = Path(path)
    kind = _detect(path)
    if kind in ("gguf", "quant4", "torch"):
        if kind == "torch":
            raise CheckpointError(f"{path}: .pt/.pth checkpoints are not streamed; load_model + quantize_model_")
        raise CheckpointError(f"{path}: {kind} files are already int4 or are imported whole; nothing to stream")
    args, tensors, total = _tensors(path, kind, report)
    select = filter_fn or is_projection
    with torch.device("meta"):
        model = Transformer(args)
    records, pending_bias, float_bytes = [], {}, 0
    done = set()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="quantize", unit="tensor", disable=not progress, file=sys.stderr)
    try:
        for name, t in tensors:
            float_bytes += t.numel() * t.element_size()
            owner, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(owner)
            except AttributeError:
                raise CheckpointError(f"{path}: tensor {name} has no place in the model") from None
            if attr == "weight" and isinstance(mod, nn.Linear) and select(mod, owner):
                _quantize_into(model, owner, mod, t, group_size, method, num_threads, records, path)
                done.add(owner)
            elif attr == "bias" and isinstance(mod, nn.Linear):
                pending_bias[owner] = t
            else:
                _assign(mod, attr, t, name, path)
            if owner == "tok_embeddings" and args.tie_embeddings and select(model.output, "output"):
                _quantize_into(model, "output", model.output, t, group_size, method, num_threads, records, path)
                done.add("output")
            del t
            bar.update(1)
            bar.set_postfix_str(f"{float_bytes / 1e9:.2f} GB read")
    finally:
        bar.close()
    for owner, b in pending_bias.items():
        mod = model.get_submodule(owner)
        if isinstance(mod, Int4Linear):
            mod.register_buffer("bias", b.float().contiguous())
        else:
            _assign(mod, "bias", b, f"{owner}.bias", path)
    if args.tie_embeddings and "output" not in done:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {missing[0]}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            records.append(SwapRecord(fqn, False, "not selected" if filter_fn else
                                      "not a projection (wq wk wv wo w1 w2 w3)"))
    model.eval().relayout_head_()
    release_freed_memory()
    model.quant4_report = SwapReport(records)
    model.quant4_stream = {"float_bytes": float_bytes, "seconds": time.perf_counter() - t0}
    tok = open_tokenizer(tokenizer) if tokenizer is not None else _found_tokenizer(path, kind)
    quantized = {r.name: {"in_features": m.in_features, "out_features": m.out_features, "group_size": group_size}
                 for r in records if r.swapped for m in [model.get_submodule(r.name)]}
    return Loaded(model, args, kind, path, tok, quantized)


def _found_tokenizer(path, kind):
    from .load import _tokenizer_beside

    if kind == "hf":
        return open_tokenizer(path) if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")) \
            else None
    beside = _tokenizer_beside(path)
    return open_tokenizer(beside) if beside is not None else None


def _quantize_into(model, owner, linear, t, group_size, method, num_threads, records, path):
    if tuple(t.shape) != (linear.out_features, linear.in_features):
        raise CheckpointError(f"{path}: {owner}.weight has shape {tuple(t.shape)}, the config says "
                              f"{(linear.out_features, linear.in_features)}")
    try:
        qweight, scales, zeros = ops.quantize(t, group_size, num_threads=num_threads, method=method)
    except ValueError as exc:
        raise ValueError(f"{path}: {owner}: {exc}") from None
    q = Int4Linear.from_packed(qweight, scales, zeros, in_features=linear.in_features, group_size=group_size,
                               num_threads=num_threads)
    records.append(SwapRecord(owner, True, f"int4 g{group_size} {method}", weight_sqnr_db(t, q)))
    model.set_submodule(owner, q)


def _assign(mod, attr, t, name, path):
    current = getattr(mod, attr, None)
    if not isinstance(current, torch.Tensor):
        raise CheckpointError(f"{path}: tensor {name} has no place in the model")
    if tuple(current.shape) != tuple(t.shape):
        raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the config says {tuple(current.shape)}")
    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)

