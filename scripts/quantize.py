"""Quantize a checkpoint to quant4's int4 format, layer by layer.

    python scripts/quantize.py --checkpoint ../shared/models/stories260K/stories260K.bin \
        --tokenizer ../shared/models/stories260K/tok512.model --out stories260K-int4.safetensors

Reads any checkpoint quant4.models.load understands (float weights are memory-mapped where the format allows),
quantizes the selected nn.Linear layers one at a time (each float weight is released as soon as its int4
copy exists), prints each layer's SQNR and the sizes, and writes one safetensors file atomically
(temporary file + rename). An existing --out is kept unless --force.

--method gptq runs GPTQ block by block on --calib-sequences windows of --calib-len tokens drawn from
--calibration (default: ../shared/data/tinystories_train.txt), group scales chosen by the clipping search;
--method tune tunes each block's rounding, scales and zeros on the same windows for the block's output
(quant4.tune; slower than GPTQ, closer to the float model). --awq (with either) first scales each block's
input channels by their calibration activations (quant4.awq), the scales folded into the float RMSNorm
weights and the wv / w3 rows (the stored format is unchanged).
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import (TOKENIZER_FILES, add_calibration_args, add_checkpoint_args, add_layer_args, add_thread_arg,
                     advice, apply_threads, calibration_tokens,
                     load_or_exit, peak_rss_mb, run_main, tokenizer_or_exit)


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap, "input checkpoint (default: the embedded model)",
                        "tokenizer to carry inside the output: " + TOKENIZER_FILES)
    ap.add_argument("--out", required=True,
                    help="output: a .safetensors file (quant4's single file), or, from a Hugging Face directory, "
                         "a directory (int4 Hugging Face layout: loads with transformers + quant4.hf, and with "
                         "quant4's own tools)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_layer_args(ap)
    ap.add_argument("--budget", type=float, default=None, metavar="BPW",
                    help="mix group sizes per layer to fit this many bits per weight (e.g. 4.5), ranked by each "
                         "layer's measured KL on 8 windows of --calibration text (quant4.budget; instead of "
                         "--group-size; rtn, search or refit)")
    add_calibration_args(ap)
    add_thread_arg(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)

    from pathlib import Path

    from quant4 import projection_filter, quantize_model_, quantize_model_gptq_

    out = Path(args.out)
    hf_out = out.suffix != ".safetensors"
    if hf_out and not (args.checkpoint is not None and (Path(args.checkpoint) / "config.json").is_file()):
        raise SystemExit(f"error: --out must end in .safetensors, got {out} (a directory output needs a Hugging "
                         f"Face directory as --checkpoint)")
    if not hf_out and out.is_dir():
        raise SystemExit(f"error: --out {out} is a directory; give a file name ending in .safetensors")
    if hf_out and out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a directory")
    if out.exists() and not args.force:
        raise SystemExit(f"error: {out} exists; pass --force to replace it")
    if args.checkpoint is not None and out.exists() and (out.resolve() == Path(args.checkpoint).resolve()
                                                         or Path(args.checkpoint).resolve() in out.resolve().parents):
        raise SystemExit(f"error: --out {out} is the --checkpoint being read; write to another file")
    calibrated = args.method in ("gptq", "tune")
    if args.budget is not None and (calibrated or args.group_size != 32):
        raise SystemExit("error: --budget chooses the group sizes itself, for --method rtn, search or refit "
                         "(not with --group-size or --method gptq / tune)")
    if not calibrated and args.budget is None:
        given = [f for f, v, default in (("--calibration", args.calibration, None),
                                         ("--calib-sequences", args.calib_sequences, 256),
                                         ("--calib-len", args.calib_len, 256),
                                         ("--gptq-refine", args.gptq_refine, 0),
                                         ("--awq", args.awq, False)) if v != default]
        if given:
            raise SystemExit(f"error: {', '.join(given)} only apply to --method gptq or tune")
    if args.method == "tune" and args.gptq_refine:
        raise SystemExit("error: --gptq-refine applies to --method gptq only")
    if args.gptq_refine < 0:
        raise SystemExit(f"error: --gptq-refine must be >= 0, got {args.gptq_refine}")
    t0 = time.perf_counter()
    select = projection_filter(args.include, args.exclude)
    if not calibrated and args.budget is None and streamable(args.checkpoint):
        # read and quantize one tensor at a time: the float model never exists whole
        from quant4.models.stream_quantize import quantize_checkpoint

        print(f"{args.checkpoint}: quantizing to int4 g{args.group_size} ({args.method}) while reading it",
              file=sys.stderr)
        report = []
        try:
            loaded = quantize_checkpoint(args.checkpoint, args.group_size, select, method=args.method,
                                         tokenizer=args.tokenizer, report=report, progress=True)
        except (ValueError, OSError) as exc:
            raise SystemExit(f"error: {advice(exc)}")
        for line in report:
            print(f"note: {line}", file=sys.stderr)
        model = loaded.model
        if not loaded.quantized:
            raise SystemExit("error: no layers selected")
        before = model.quant4_stream["float_bytes"]
        return finish(args, out, loaded, model, before, t0)
    loaded = load_or_exit(args.checkpoint, tokenizer=args.tokenizer)
    model = loaded.model
    if loaded.quantized:
        raise SystemExit(f"error: {loaded.path} is already int4 ({loaded.kind}); quantize its float checkpoint")
    before = tensor_bytes(model)
    n_selected = sum(1 for n, m in model.named_modules() if n and select(m, n))
    if not n_selected:
        raise SystemExit("error: no layers selected")
    if args.budget is not None:
        from quant4.budget import plan_bits_per_weight, plan_group_sizes
        from quant4.config import Int4Config, quantize_

        cal = calibration_tokens(args, tokenizer_or_exit(loaded), loaded.args.max_seq_len, loaded.args.vocab_size)
        print(f"{loaded.path} ({loaded.kind}): {n_selected} layers to int4 ({args.method}) within {args.budget} "
              f"bits per weight, ranked by KL on {min(8, len(cal))} calibration windows")
        try:
            plan = plan_group_sizes(model, args.budget, select, method=args.method, kl_tokens=cal[:8])
        except ValueError as exc:
            raise SystemExit(f"error: --budget: {exc}")
        mix = ", ".join(f"g{g} x{list(plan.values()).count(g)}" for g in sorted(set(plan.values())))
        print(f"plan: {mix}, {plan_bits_per_weight(model, plan):.3f} bits per weight")
        quantize_(model, Int4Config(method=args.method, targets=[],
                                    overrides={n: {"group_size": g} for n, g in plan.items()}), progress=True)
        return finish(args, out, loaded, model, before, t0)
    print(f"{loaded.path} ({loaded.kind}): {n_selected} layers to int4 g{args.group_size} ({args.method})")
    if args.method == "tune":
        from quant4.tune import tune_model_

        cal = calibration_tokens(args, tokenizer_or_exit(loaded), loaded.args.max_seq_len, loaded.args.vocab_size)
        print(f"tuning on {cal.shape[0]} calibration windows of {cal.shape[1]} tokens")
        tune_model_(model, cal, args.group_size, select, progress=True, awq=args.awq)
    elif args.method == "gptq":
        cal = calibration_tokens(args, tokenizer_or_exit(loaded), loaded.args.max_seq_len, loaded.args.vocab_size)
        print(f"GPTQ calibration: {cal.shape[0]} windows of {cal.shape[1]} tokens")
        quantize_model_gptq_(model, cal, args.group_size, select, method="search", refine=args.gptq_refine,
                             progress=True, awq=args.awq)
    else:
        quantize_model_(model, args.group_size, select, method=args.method, progress=True)
    return finish(args, out, loaded, model, before, t0)


def streamable(checkpoint) -> bool:
    """A float checkpoint kind that quantize_checkpoint reads tensor by tensor."""
    from pathlib import Path

    if checkpoint is None:
        return False
    p = Path(checkpoint)
    return (p.is_dir() and (p / "config.json").is_file()) or p.suffix.lower() == ".bin"


def finish(args, out, loaded, model, before, t0):
    from pathlib import Path

    from quant4 import format_report
    from quant4.serialization import save_quantized

    print(format_report([r for r in model.quant4_report if r.swapped], model))
    if out.suffix != ".safetensors":
        from quant4.models.hf import write_hf_int4

        write_hf_int4(out, loaded.path, model, loaded.args, method=args.method)
        after = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
        print(f"size: {before / 1e6:.2f} MB float -> {after / 1e6:.2f} MB ({after / before:.1%}); wrote {out}/ "
              f"(Hugging Face layout, int4 in quant4's format) in {time.perf_counter() - t0:.1f} s, peak RSS "
              f"{peak_rss_mb():.0f} MB")
        return
    # the file stands alone: the tokenizer inside, no local paths (the source by its file name only)
    info = {"type": "llama", "config": dict(loaded.args.to_dict(), dropout=0.0), "source": Path(loaded.path).name}
    tok = loaded.tokenizer
    if tok is None:
        print("note: no tokenizer found for this checkpoint; the output carries none (pass --tokenizer)")
    save_quantized(model, out, model_info=info, tokenizer_source=tok, overwrite=args.force)
    after = out.stat().st_size
    print(f"size: {before / 1e6:.2f} MB float -> {after / 1e6:.2f} MB ({after / before:.1%}); "
          f"wrote {out} in {time.perf_counter() - t0:.1f} s, peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    run_main(main)
