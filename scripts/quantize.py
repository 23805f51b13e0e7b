"""Quantize a checkpoint to quant4's int4 format, layer by layer.

    python scripts/quantize.py --checkpoint ../shared/models/stories260K/stories260K.bin \
        --tokenizer ../shared/models/stories260K/tok512.model --out stories260K-int4.safetensors

Reads any checkpoint models.load understands (float weights are memory-mapped where the format allows),
quantizes the selected nn.Linear layers one at a time (each float weight is released as soon as its int4
copy exists), prints each layer's SQNR and the sizes, and writes one safetensors file atomically
(temporary file + rename). An existing --out is kept unless --force.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import add_layer_args, add_thread_arg, apply_threads, peak_rss_mb

import torch
from torch import nn


def tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="input checkpoint (default: the embedded model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer .model to reference from the output")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_layer_args(ap)
    add_thread_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)

    from pathlib import Path

    from tqdm import tqdm

    from models.load import load_model, relative_tokenizer_ref
    from quant4 import Int4Linear, projection_filter
    from quant4.serialization import save_quantized

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise SystemExit(f"--out must end in .safetensors, got {out}")
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    t0 = time.perf_counter()
    loaded = load_model(args.checkpoint, tokenizer=args.tokenizer)
    model = loaded.model
    if loaded.kind == "quant4":
        raise SystemExit(f"{loaded.path} is already quantized")
    before = tensor_bytes(model)
    select = projection_filter(args.include, args.exclude)
    targets = [(n, m) for n, m in model.named_modules() if n and select(m, n)]
    if not targets:
        raise SystemExit("no layers selected")
    print(f"{loaded.path} ({loaded.kind}): {len(targets)} layers to int4 g{args.group_size} ({args.method})")
    rows = []
    for name, lin in tqdm(targets, desc="quantize", unit="layer", file=sys.stderr):
        q = Int4Linear.from_linear(lin, args.group_size, method=args.method)
        w = lin.weight.detach().float()
        err = (w - q.dequantize()).norm()
        sqnr = float(20 * torch.log10(w.norm() / err)) if err > 0 else float("inf")
        rows.append((name, tuple(w.shape), sqnr))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q)
        del lin, w
    for name, shape, sqnr in rows:
        print(f"  {name:40s} {str(shape):14s} SQNR {sqnr:6.2f} dB")
    worst = min(rows, key=lambda r: r[2])
    print(f"  mean SQNR {sum(r[2] for r in rows) / len(rows):.2f} dB, worst {worst[2]:.2f} dB ({worst[0]})")
    info = {"type": "llama", "config": dict(loaded.args.to_dict(), dropout=0.0), "source": str(loaded.path)}
    save_quantized(model, out, model_info=info, tokenizer=relative_tokenizer_ref(loaded.tokenizer_path, out),
                   overwrite=args.force)
    after = out.stat().st_size
    print(f"size: {before / 1e6:.2f} MB float -> {after / 1e6:.2f} MB ({after / before:.1%}); "
          f"wrote {out} in {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
