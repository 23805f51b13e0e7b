"""Convert int4 checkpoints between quant4, other PyTorch tools' packed layouts, and GGUF.

    python scripts/migrate.py model_int4.g32.pth --inspect                 # what is in it
    python scripts/migrate.py model_int4.g32.pth --out model-int4.safetensors        # -> quant4
    python scripts/migrate.py model-int4.safetensors --out model_int4.g32.pth        # -> this torch's CPU op
    python scripts/migrate.py model-int4.safetensors --out model.gguf                # -> GGUF Q4_1
    python scripts/migrate.py model.gguf --out model-int4.safetensors                # GGUF Q4_0/Q4_1 -> quant4

Inputs: int4 state dicts of gpt-fast / torchchat / torchao (`*.weight` packed + `*.scales_and_zeros`) in any
layout of quant4.interop.layouts (torch <= 2.5 tinygemm int32 tiles, torch 2.5 uint8, torch >= 2.6 CPU bytes for
AVX-512 / AVX2 / scalar; detected from the codes where the bytes allow, else named with --layout), GGUF
llama files, quant4 files. The model's n_heads comes from params.json beside a .pth (or --params).
Outputs by --out's suffix: .safetensors (quant4's format), .pth/.pt (a torchchat/gpt-fast style state dict:
packed by this torch's _convert_weight_to_int4pack_for_cpu, or --torch-layout for another, e.g.
cuda-tiled for gpt-fast on a GPU; scales_and_zeros in --torch-dtype; a params.json written beside it unless one
is there), .gguf (llama.cpp, Q4_1). Nothing is re-quantized; the conversions are bit-exact except the
documented float16 roundings (GGUF Q4_1's offset; bf16 scales_and_zeros). Writes are atomic and never
replace an existing file without --force.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import add_thread_arg, apply_threads, run_main, torch_dtype  # (also puts the repo on sys.path)

DTYPES = ("bf16", "fp16", "fp32")


def read_any(path: Path, args, report: list):
    """-> (model, ModelArgs, kind, TokenizerSource or None)."""
    from quant4.models.load import load_model

    loaded = load_model(path, tokenizer=args.tokenizer, layout=args.layout, params=args.params, report=report)
    if not loaded.quantized and not args.inspect:
        raise SystemExit(f"error: {path} holds no int4 layers; quantize it with scripts/quantize.py")
    kinds = [info.get("kind", "linear") for info in loaded.quantized.values()]
    extra = "".join(f", {n} {what}" for n, what in ((kinds.count("embedding"), "int4 token table"),
                                                    (kinds.count("int8-embedding"), "8-bit token table"),
                                                    (kinds.count("int8"), "8-bit head")) if n)
    report.append(f"{loaded.kind}: {kinds.count('linear')} int4 layers{extra}")
    return loaded.model, loaded.args, loaded.kind, loaded.tokenizer


def summarize(model, margs, tok) -> str:
    """What a checkpoint holds, for --inspect and the conversion report: int4 and float layers, bytes, config,
    tokenizer."""
    from quant4 import Int4Linear
    from quant4.swap import model_size

    mods = [m for m in model.modules() if isinstance(m, Int4Linear)]
    size = model_size(model)
    if mods:
        gs = sorted({m.group_size for m in mods})
        shapes = sorted({(m.out_features, m.in_features) for m in mods})
        int4 = (f"{len(mods)} int4 layers, group size {'/'.join(map(str, gs))}, shapes "
                f"{', '.join(f'{n}x{k}' for n, k in shapes)}")
    else:
        int4 = "no int4 layers (a float checkpoint)"
    a = margs
    tok = (f"{'SentencePiece' if tok.kind == 'sentencepiece' else 'tokenizer.json'} from {tok.origin} "
           f"({len(tok.data):,} bytes{', chat template' if tok.settings.get('chat_template') else ''})"
           if tok is not None else "none found")
    return (f"{int4}; {size['float_params'] / 1e6:.2f} M float params; {size['bytes'] / 1e6:.2f} MB\n"
            f"  config: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} kv), hidden {a.hidden_dim}, "
            f"vocab {a.vocab_size}, context {a.max_seq_len}, rope_theta {a.rope_theta:g}, "
            f"tied embeddings {'yes' if a.tie_embeddings else 'no'}\n"
            f"  tokenizer: {tok}")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="checkpoint to convert or inspect (any kind load_model reads)")
    ap.add_argument("--out", default=None, help="output file: .safetensors, .pth/.pt or .gguf")
    ap.add_argument("--inspect", action="store_true",
                    help="only describe the input (any checkpoint, float too): config, tokenizer, int4/float layers, "
                         "bytes, layout")
    ap.add_argument("--layout", default=None, help="the input's packed layout, when it cannot be detected")
    ap.add_argument("--params", default=None, help="params.json with the model's n_heads (torch inputs)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer to carry into the output: a SentencePiece .model, a tokenizer.json or a "
                         "directory with one (default: the input's)")
    ap.add_argument("--torch-dtype", default="bf16", choices=sorted(DTYPES),
                    help="the activation dtype the .pth is for: its scales_and_zeros dtype (default: %(default)s)")
    ap.add_argument("--torch-layout", default=None, help="packed layout for .pth out (default: this torch's "
                                                          "CPU op); e.g. cuda-tiled for gpt-fast on CUDA")
    ap.add_argument("--inner-k-tiles", type=int, default=8, choices=(2, 4, 8),
                    help="cuda-tiled layout only: inner K tiles (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_thread_arg(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)

    from quant4.models.load import CheckpointError
    from quant4.interop import layouts

    src = Path(args.input)
    if not src.exists():
        raise SystemExit(f"{src}: not found")
    if args.layout is not None and args.layout not in layouts.LAYOUTS:
        raise SystemExit(f"--layout must be one of {', '.join(layouts.LAYOUTS)}, got {args.layout!r}")
    if args.torch_layout is not None and args.torch_layout not in layouts.LAYOUTS:
        raise SystemExit(f"--torch-layout must be one of {', '.join(layouts.LAYOUTS)}, got {args.torch_layout!r}")
    if not args.inspect:
        if not args.out:
            raise SystemExit("--out is required (or --inspect)")
        out = Path(args.out)
        if out.suffix.lower() not in (".safetensors", ".pth", ".pt", ".gguf"):
            raise SystemExit(f"--out must end in .safetensors, .pth, .pt or .gguf, got {out}")
        if out.exists() and not args.force:
            raise SystemExit(f"error: {out} exists; pass --force to replace it")
        side = out.with_suffix(".params.json")
        if out.suffix.lower() in (".pth", ".pt") and side.exists() and not args.force:
            raise SystemExit(f"error: {side} exists; pass --force to replace it")
        if out.resolve() == src.resolve():
            raise SystemExit("--out must differ from the input")
    t0 = time.perf_counter()
    report: list[str] = []
    try:
        model, margs, kind, tok = read_any(src, args, report)
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"{src}: {kind}; {summarize(model, margs, tok)}")
    for line in report:
        print(f"  {line}")
    if args.inspect:
        return 0
    report.clear()
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        from quant4.serialization import save_quantized

        # the output stands alone: the tokenizer goes inside it, no local paths in the header
        report.append("tokenizer carried inside the file" if tok is not None else
                      "no tokenizer found: the output carries none (pass --tokenizer)")
        info = {"type": "llama", "config": dict(margs.to_dict(), dropout=0.0), "source": src.name}
        save_quantized(model, out, model_info=info, tokenizer_source=tok, overwrite=args.force)
    elif suffix == ".gguf":
        from quant4.models.gguf import write_gguf

        write_gguf(model, margs, out, tokenizer=tok, overwrite=args.force, report=report)
        if tok is None:
            report.append("no tokenizer found: the GGUF has none (pass --tokenizer)")
    else:
        import torch

        from quant4.interop.torch_int4 import export_torch_int4
        from quant4.serialization import atomic_write

        sd = export_torch_int4(model, dtype=torch_dtype(args.torch_dtype), layout=args.torch_layout,
                               inner_k_tiles=args.inner_k_tiles, report=report)
        atomic_write(out, lambda tmp: torch.save(sd, tmp), overwrite=args.force)
        where = args.torch_layout or f"this torch's CPU op ({torch.backends.cpu.get_cpu_capability()})"
        report.append(f"packed by {where}; scales_and_zeros {args.torch_dtype}")
        params = {"dim": margs.dim, "n_layers": margs.n_layers, "n_heads": margs.n_heads,
                  "n_kv_heads": margs.n_kv_heads, "vocab_size": margs.vocab_size, "norm_eps": margs.norm_eps,
                  "rope_theta": margs.rope_theta, "max_seq_len": margs.max_seq_len}
        # the hyperparameters travel with the weights: a sidecar named after the file (read back by
        # load_model before any shared params.json), so two exports in one folder never share one
        side = out.with_suffix(".params.json")
        atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(params, indent=1)), overwrite=True)
        report.append(f"wrote {side}")
    for line in report:
        print(f"  {line}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
