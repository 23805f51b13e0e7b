"""Quality of int4 variants against the float model: perplexity, KL divergence, top-1 agreement, size.

    python scripts/eval.py                                           # the embedded model
    python scripts/eval.py --checkpoint embedded ../shared/models/stories260K/stories260K.bin  # README table
    make quality                                                     # the same, JSON to bench_out/

Variants: float, then for each --group-size and --method: rtn (min/max), search (clipping search), gptq
(GPTQ on --calib-sequences windows of --calib-len tokens from --calibration, default
../shared/data/tinystories_train.txt, group scales by the clipping search), gptq-refine (the same with two
rounds of least-squares scale/zero refits, refine=2), awq-gptq / awq-gptq-refine (the same after
activation-aware scaling of each block's input channels, quant4.awq), tune / awq-tune (block-wise tuning of
rounding, scales and zeros on the same calibration windows, quant4.tune, with or without the scaling first).

Text: --text (default: the held-out first 300,000 bytes of ../shared/data/tinystories_val_head.txt), split
at blank lines with a BOS before each block, the first --tokens tokens, non-overlapping windows of
--window tokens, every token after a window's first scored (models/evaluate.py). For each variant:
perplexity, mean KL(float || variant) of the next-token distributions, top-1 agreement with float, and
the bytes of the model's weights. --activation int8 bf16 adds, per group size, the first --method's int4 model decoding
one token at a time with float and with those activation modes, scored against the float model decoding the
same way, and the same model scored on the windows (prefill) with those modes. Rows print as they are computed.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from _common import (add_calibration_args, add_layer_args, add_thread_arg, apply_threads, calibration_tokens,
                     load_or_exit, run_main, tokenizer_or_exit)

from quant4.options import MODEL_METHODS

EVAL_METHODS = MODEL_METHODS + ("gptq-refine", "awq-gptq", "awq-gptq-refine", "awq-tune")



def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.dim() == 0 or t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def emit(row: dict) -> dict:
    """Print one table row as soon as it is computed (the header is printed first by main)."""
    plain = row["variant"].startswith("float") or row.get("basis") is None   # nothing to compare with
    vs = "" if plain else f"{100 * (row['ppl'] / row['basis'] - 1):+.1f}%"
    kl = "" if plain else f"{row['kl']:.4f}"
    t1 = "" if plain else f"{100 * row['top1']:.1f}%"
    print(f"| {row['model']} | {row['variant']} | {row['ppl']:.3f} | {vs} | {kl} | {t1} | "
          f"{row['bytes'] / 1e6:.2f} MB |", flush=True)
    return row


def evaluate(args, checkpoint, tokenizer):
    """Rows (dicts) for one float checkpoint: the float model, then every method x group size."""
    from tqdm import tqdm

    from quant4 import Int4Config, quantize_, quantize_model_, quantize_model_gptq_, set_activation_, tune_model_
    from quant4.models.evaluate import encode_blocks, heldout_text, score

    loaded = load_or_exit(checkpoint, tokenizer=tokenizer)
    tok = tokenizer_or_exit(loaded)
    if args.text:
        if not Path(args.text).is_file():
            raise SystemExit(f"--text {args.text}: not found")
        text = Path(args.text).read_text(encoding="utf-8", errors="ignore")
    else:
        from quant4.models.calibration import DATA_DIR as data

        if not (data / "tinystories_val_head.txt").is_file():
            raise SystemExit(f"error: the default evaluation text {data / 'tinystories_val_head.txt'} is not "
                             f"here; pass --text FILE")
        text = heldout_text(data)
    ids = encode_blocks(tok, text, args.tokens)
    label = Path(loaded.path).stem if checkpoint else "embedded"
    t0 = time.perf_counter()
    base = loaded.model
    if loaded.quantized:          # an int4 file (quant4, GGUF Q4, another tool's .pth): score it as it is
        rows = []
        ref = None
        if args.reference:
            reference = load_or_exit(None if args.reference == "embedded" else args.reference)
            if reference.quantized or reference.args.vocab_size != loaded.args.vocab_size:
                raise SystemExit(f"error: --reference {args.reference} must be a float checkpoint with the same "
                                 f"vocabulary ({loaded.args.vocab_size} tokens)")
            ref = score(reference.model, ids, args.window)
            rows.append(emit({"model": Path(args.reference).stem, "variant": "float (reference)", "group_size": None,
                              "ppl": ref.perplexity, "kl": 0.0, "top1": 1.0,
                              "bytes": weight_bytes(reference.model), "basis": ref.perplexity}))
        sc = score(base, ids, args.window, ref.logprobs if ref else None)
        rows.append(emit({"model": label, "variant": f"int4 file ({loaded.kind})", "group_size": None,
                          "ppl": sc.perplexity, "kl": sc.kl, "top1": sc.top1, "bytes": weight_bytes(base),
                          "basis": ref.perplexity if ref else None}))
        return rows, {"checkpoint": str(loaded.path), "tokens": len(ids), "window": args.window}
    ref = score(base, ids, args.window)
    rows = [emit({"model": label, "variant": "float", "group_size": None, "ppl": ref.perplexity, "kl": 0.0,
                  "top1": 1.0, "bytes": weight_bytes(base), "basis": ref.perplexity})]
    cal = (calibration_tokens(args, tok, loaded.args.max_seq_len, loaded.args.vocab_size)
           if any("gptq" in m or "tune" in m for m in args.method) else None)
    dec_ids = ids[: args.decode_tokens]
    ref_dec = None
    variants = [(g, m) for g in args.group_size for m in args.method]
    for g, method in tqdm(variants, desc=label, unit="variant", file=sys.stderr, leave=False):
        tq = time.perf_counter()
        if "tune" in method:
            model = tune_model_(copy.deepcopy(base), cal, g, awq=method.startswith("awq"))
        elif "gptq" in method:
            model = quantize_model_gptq_(copy.deepcopy(base), cal, g, method="search",
                                         refine=2 if method.endswith("refine") else 0,
                                         awq=method.startswith("awq"))
        else:
            model = quantize_model_(copy.deepcopy(base), g, method=method)
        tq = time.perf_counter() - tq
        sc = score(model, ids, args.window, ref.logprobs)
        q_bytes = weight_bytes(model)
        rows.append(emit({"model": label, "variant": f"int4 {method} g{g} ({projection_bpw(model):.2f} bpw)",
                          "group_size": g, "method": method, "bpw": projection_bpw(model),
                          "ppl": sc.perplexity, "kl": sc.kl, "top1": sc.top1, "bytes": q_bytes,
                          "basis": ref.perplexity, "quantize_s": round(tq, 2)}))
        if args.activation and method == args.method[0]:
            if ref_dec is None:
                ref_dec = score(base, dec_ids, args.window, decode=True)
                rows.append(emit({"model": label, "variant": f"float, decode, {len(dec_ids)} tokens",
                                  "group_size": None, "ppl": ref_dec.perplexity, "kl": 0.0, "top1": 1.0,
                                  "bytes": rows[0]["bytes"], "basis": ref_dec.perplexity}))
            for act in ["float"] + args.activation:
                set_activation_(model, act)
                sc = score(model, dec_ids, args.window, ref_dec.logprobs, decode=True)
                rows.append(emit({"model": label, "variant": f"int4 {method} g{g}, decode, {act} activations",
                                  "group_size": g, "ppl": sc.perplexity, "kl": sc.kl, "top1": sc.top1,
                                  "bytes": q_bytes, "basis": ref_dec.perplexity}))
            for act in args.activation:    # prefill: the windows above, every position at once
                set_activation_(model, act)
                sc = score(model, ids, args.window, ref.logprobs)
                rows.append(emit({"model": label, "variant": f"int4 {method} g{g}, prefill, {act} activations",
                                  "group_size": g, "ppl": sc.perplexity, "kl": sc.kl, "top1": sc.top1,
                                  "bytes": q_bytes, "basis": ref.perplexity}))
            set_activation_(model, "float")
    budget_cal = None
    for bpw in args.budget:
        from quant4.budget import input_power, plan_bits_per_weight, plan_group_sizes

        if budget_cal is None:
            cal = cal if cal is not None else calibration_tokens(args, tok, loaded.args.max_seq_len,
                                                                 loaded.args.vocab_size)
            budget_cal = input_power(base, cal)
        for method in [m for m in args.method if "gptq" not in m and "tune" not in m]:
            for how in ("weight error", "KL"):
                plan = plan_group_sizes(base, bpw, method=method, power=budget_cal,
                                        kl_tokens=cal[:8] if how == "KL" else None)
                config = Int4Config(method=method, targets=[],
                                    overrides={n: {"group_size": g} for n, g in plan.items()})
                model = quantize_(copy.deepcopy(base), config)
                mix = ", ".join(f"g{g} x{list(plan.values()).count(g)}" for g in sorted(set(plan.values())))
                sc = score(model, ids, args.window, ref.logprobs)
                rows.append(emit({"model": label, "variant": f"int4 {method} budget {bpw} by {how} "
                                  f"({projection_bpw(model):.2f} bpw: {mix})", "method": method, "group_size": None,
                                  "bpw": projection_bpw(model), "ppl": sc.perplexity, "kl": sc.kl, "top1": sc.top1,
                                  "bytes": weight_bytes(model), "basis": ref.perplexity,
                                  "plan_bpw": plan_bits_per_weight(base, plan)}))
    if args.llama_quantize:
        if args.llama_imatrix and cal is None:
            cal = calibration_tokens(args, tok, loaded.args.max_seq_len, loaded.args.vocab_size)
        rows += llama_cpp_rows(args, loaded, label, ids, ref, tok, cal)
    print(f"{loaded.path} ({loaded.kind}), {len(ids)} tokens, windows of {args.window}; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows, {"checkpoint": str(loaded.path), "tokens": len(ids), "window": args.window}


PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def projection_bpw(model=None, gguf_path=None) -> float:
    """Bits per weight of the seven projections: of a model's Int4Linear layers (codes, fp16 scales and zeros),
    or of a GGUF file's blk.*.{attn_q, ..., ffn_down} tensors as stored."""
    if gguf_path is not None:
        from gguf import GGUFReader

        bits = n = 0
        for t in GGUFReader(str(gguf_path)).tensors:
            if t.name.startswith("blk.") and t.name.split(".")[2] in PROJECTIONS:
                bits += 8 * int(t.n_bytes)
                n += int(t.n_elements)
        return bits / n
    from quant4 import Int4Linear

    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    # the buffers as held (m.qweight would put a slab16 layer back into rows); sizes do not depend on the layout
    bits = sum(8 * t.numel() * t.element_size() for m in layers for n, t in m.named_buffers() if n != "bias")
    return bits / sum(m.in_features * m.out_features for m in layers)


def llama_cpp_rows(args, loaded, label, ids, ref, tok, cal):
    """llama.cpp's quantizers on the same float model, scored on the same text: the model exported to GGUF F32,
    quantized by llama-quantize to each --llama-types type, loaded by quant4 (Q4_0 / Q4_1 codes kept, other
    types dequantized: the weights llama.cpp chose, computed in fp32 like quant4's rows). With --llama-imatrix,
    each type again with llama.cpp's importance matrix, computed by llama-imatrix on the same calibration
    windows GPTQ gets (decoded to text, one window per line)."""
    import subprocess
    import tempfile

    from quant4.models.evaluate import score
    from quant4.models.gguf import write_gguf
    from quant4.models.load import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_gguf(loaded.model, loaded.args, f32, tokenizer=loaded.tokenizer)
        imatrix = None
        if args.llama_imatrix:
            text, imatrix = Path(tmp) / "calibration.txt", Path(tmp) / "imatrix.gguf"
            text.write_text("\n".join(tok.decode(w) for w in cal.tolist()) + "\n")
            r = subprocess.run([args.llama_imatrix, "-m", str(f32), "-f", str(text), "-o", str(imatrix), "-c",
                                str(cal.shape[1]), "--no-ppl"], capture_output=True, text=True)
            if r.returncode != 0 or not imatrix.is_file():
                raise SystemExit(f"error: llama-imatrix failed: {(r.stderr or r.stdout).strip()[-300:]}")
        for kind, im in [(k, None) for k in args.llama_types] + [(k, imatrix) for k in args.llama_types if imatrix]:
            name = f"{kind}{' + imatrix' if im else ''}"
            out = Path(tmp) / f"{kind}{'-imatrix' if im else ''}.gguf"
            cmd = [args.llama_quantize] + (["--imatrix", str(im)] if im else []) + [str(f32), str(out), kind]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"error: llama-quantize {name} failed: {(r.stderr or r.stdout).strip()[-300:]}")
            model = load_model(out).model
            sc = score(model, ids, args.window, ref.logprobs)
            rows.append(emit({"model": label, "variant": f"llama.cpp {name} ({projection_bpw(gguf_path=out):.2f} bpw)",
                              "group_size": None, "method": f"llama.cpp {name}", "ppl": sc.perplexity, "kl": sc.kl,
                              "top1": sc.top1, "bytes": out.stat().st_size, "basis": ref.perplexity,
                              "bpw": projection_bpw(gguf_path=out)}))
    return rows


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", default=[None],
                    help="checkpoint(s): a float one is quantized with each method and group size; an int4 file "
                         "(quant4, GGUF, migrated .pth) is scored as it is; 'embedded' (the default) is the model "
                         "in the repo")
    ap.add_argument("--reference", default=None,
                    help="float checkpoint to score an int4 file against (KL, top-1 agreement); 'embedded': the "
                         "model in the repo (default: none, perplexity only)")
    ap.add_argument("--tokenizer", nargs="+", default=None, help="tokenizer per checkpoint ('-': found beside it)")
    ap.add_argument("--text", default=None, help="text file (default: the TinyStories hold-out slice)")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens of text scored (default: %(default)s)")
    ap.add_argument("--window", type=int, default=512,
                    help="tokens per non-overlapping window (default: %(default)s)")
    add_layer_args(ap, methods=EVAL_METHODS, sweep=True)
    ap.add_argument("--activation", nargs="*", default=[], choices=("int8", "bf16"),
                    help="add rows with these activation modes for the first --method: decoding one token at a "
                         "time (float too, against the float model decoding the same way) and on the windows")
    ap.add_argument("--decode-tokens", type=int, default=2048, help="tokens for the decode-path comparison (default: %(default)s)")
    ap.add_argument("--budget", type=float, nargs="*", default=[], metavar="BPW",
                    help="add rows with mixed group sizes under these bits-per-weight budgets, one per "
                         "calibration-free --method (quant4.budget; e.g. 4.5 = Q4_0's and g64's bytes)")
    ap.add_argument("--llama-quantize", default=None, metavar="PATH",
                    help="llama.cpp's llama-quantize: add rows for its quantizers on the same model and text "
                         "(see --llama-types; build it as scripts/bench_e2e.py --help shows, target llama-quantize)")
    ap.add_argument("--llama-imatrix", default=None, metavar="PATH",
                    help="llama.cpp's llama-imatrix (with --llama-quantize): also each type quantized with an "
                         "importance matrix from the calibration text (target llama-imatrix)")
    ap.add_argument("--llama-types", nargs="+", default=["Q4_0", "Q4_1", "Q4_K_M"],
                    help="llama-quantize types for --llama-quantize (default: %(default)s)")
    ap.add_argument("--json", default=None, help="write the results here")
    add_calibration_args(ap, gptq_options=False)
    add_thread_arg(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    if args.tokens < 2 or args.window < 2 or args.decode_tokens < 2:
        raise SystemExit(f"error: --tokens, --window and --decode-tokens must be >= 2, got {args.tokens}, "
                         f"{args.window} and {args.decode_tokens}")
    if args.llama_imatrix and not args.llama_quantize:
        raise SystemExit("error: --llama-imatrix needs --llama-quantize")
    for flag, exe in (("--llama-quantize", args.llama_quantize), ("--llama-imatrix", args.llama_imatrix)):
        if exe and not Path(exe).is_file():
            raise SystemExit(f"error: {flag} {exe}: no such file")
    checkpoints = [None if c in (None, "embedded") else c for c in args.checkpoint]
    toks = args.tokenizer or [None] * len(checkpoints)
    if len(toks) != len(checkpoints):
        raise SystemExit(f"{len(checkpoints)} checkpoints but {len(toks)} tokenizers")
    toks = [None if t == "-" else t for t in toks]
    print("| model | variant | perplexity | vs float | KL | top-1 | weights |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows, runs = [], []
    for ck, tk in zip(checkpoints, toks):
        r, info = evaluate(args, ck, tk)
        rows += r
        runs.append(info)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    run_main(main)
