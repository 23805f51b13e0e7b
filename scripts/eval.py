"""Quality of int4 variants against the float model: perplexity, KL divergence, top-1 agreement, size.

    python scripts/eval.py                                           # the embedded model
    python scripts/eval.py --checkpoint embedded ../shared/models/stories260K/stories260K.bin  # README table
    make quality                                                     # the same, JSON to bench_out/

Variants: float, then for each --group-sizes and --methods: rtn (min/max), search (clipping search), gptq
(GPTQ on --calib-sequences windows of --calib-len tokens from --calibration, default
../shared/data/tinystories_train.txt, group scales by the clipping search), gptq-refine (the same with two
rounds of least-squares scale/zero refits, refine=2).

Text: --text (default: the held-out first 300,000 bytes of ../shared/data/tinystories_val_head.txt), split
at blank lines with a BOS before each block, the first --tokens tokens, non-overlapping windows of
--window tokens, every token after a window's first scored (models/evaluate.py). For each variant:
perplexity, mean KL(float || variant) of the next-token distributions, top-1 agreement with float, and
the bytes of the model's weights. --int8-activations adds, per group size, the same int4 model decoding
one token at a time with int8 activations (the decode-only option), scored against the float model
decoding the same way.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

from _common import (add_calibration_args, add_thread_arg, apply_threads, calibration_tokens, load_or_exit,
                     run_main, tokenizer_or_exit)

import torch
import torch.nn.functional as F


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


@torch.inference_mode()
def score(model, ids, window, ref_logprobs=None, decode=False):
    """-> (perplexity, mean KL vs reference, top-1 agreement, per-window log-probs)."""
    from quant4.models.evaluate import window_logprobs

    if decode:
        windows = []
        for s in range(0, len(ids) - 1, window):
            chunk = ids[s:s + window]
            model.setup_cache(1, len(chunk))
            rows = [model(chunk[None, i:i + 1], i)[0, -1].float() for i in range(len(chunk) - 1)]
            model.clear_cache()
            windows.append((torch.stack(rows), chunk[1:]))
    else:
        windows = list(window_logprobs(model, ids, window))
    nll, kl, agree, count, logps = 0.0, 0.0, 0, 0, []
    for w, (logits, targets) in enumerate(windows):
        lp = torch.log_softmax(logits, -1)
        logps.append(lp)
        nll -= lp.gather(1, targets[:, None]).sum().item()
        if ref_logprobs is not None:
            ref = ref_logprobs[w]
            kl += F.kl_div(lp, ref, log_target=True, reduction="sum").item()
            agree += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
        count += len(targets)
    return math.exp(nll / count), kl / count, agree / count, logps


def evaluate(args, checkpoint, tokenizer):
    """Rows (dicts) for one float checkpoint: the float model, then every method x group size."""
    from quant4.models.evaluate import encode_blocks, heldout_text
    from quant4 import quantize_model_, quantize_model_gptq_, set_activation_

    loaded = load_or_exit(checkpoint, tokenizer=tokenizer)
    if loaded.kind == "quant4":
        raise SystemExit(f"{loaded.path}: give the float checkpoint; int4 variants are made from it")
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
    ppl, _, _, ref = score(base, ids, args.window)
    rows = [{"model": label, "variant": "float", "group_size": None, "ppl": ppl, "kl": 0.0, "top1": 1.0,
             "bytes": weight_bytes(base), "basis": ppl}]
    cal = (calibration_tokens(args, tok, loaded.args.max_seq_len, loaded.args.vocab_size)
           if any(m.startswith("gptq") for m in args.methods) else None)
    dec_ids = ids[: args.decode_tokens]
    ref_dec = None
    for g in args.group_sizes:
        for method in args.methods:
            tq = time.perf_counter()
            if method.startswith("gptq"):
                model = quantize_model_gptq_(copy.deepcopy(base), cal, g, method="search",
                                             refine=2 if method == "gptq-refine" else 0)
            else:
                model = quantize_model_(copy.deepcopy(base), g, method=method)
            tq = time.perf_counter() - tq
            p, kl, top1, _ = score(model, ids, args.window, ref)
            q_bytes = weight_bytes(model)
            rows.append({"model": label, "variant": f"int4 {method} g{g}", "group_size": g, "method": method,
                         "ppl": p, "kl": kl, "top1": top1, "bytes": q_bytes, "basis": ppl,
                         "quantize_s": round(tq, 2)})
            acts = (["int8"] if args.int8_activations else []) + (["bf16"] if args.bf16_activations else [])
            if acts and method == "rtn":
                if ref_dec is None:
                    ref_dec = score(base, dec_ids, args.window, decode=True)
                    rows.append({"model": label, "variant": f"float, decode, {len(dec_ids)} tokens",
                                 "group_size": None, "ppl": ref_dec[0], "kl": 0.0, "top1": 1.0,
                                 "bytes": rows[0]["bytes"], "basis": ref_dec[0]})
                pd, kld, t1d, _ = score(model, dec_ids, args.window, ref_dec[3], decode=True)
                rows.append({"model": label, "variant": f"int4 RTN g{g}, decode", "group_size": g, "ppl": pd,
                             "kl": kld, "top1": t1d, "bytes": q_bytes, "basis": ref_dec[0]})
                for act in acts:
                    set_activation_(model, act)
                    pd, kld, t1d, _ = score(model, dec_ids, args.window, ref_dec[3], decode=True)
                    rows.append({"model": label, "variant": f"int4 RTN g{g}, decode, {act} activations",
                                 "group_size": g, "ppl": pd, "kl": kld, "top1": t1d, "bytes": q_bytes,
                                 "basis": ref_dec[0]})
    print(f"{loaded.path} ({loaded.kind}), {len(ids)} tokens, windows of {args.window}; "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows, {"checkpoint": str(loaded.path), "tokens": len(ids), "window": args.window}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", nargs="+", default=[None],
                    help="float checkpoint(s); 'embedded' (the default) is the model in the repo")
    ap.add_argument("--tokenizer", nargs="+", default=None, help="tokenizer per checkpoint ('-': found beside it)")
    ap.add_argument("--text", default=None, help="text file (default: the TinyStories hold-out slice)")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["rtn", "search", "gptq", "gptq-refine"],
                    choices=("rtn", "search", "gptq", "gptq-refine"))
    ap.add_argument("--int8-activations", action="store_true", help="add decode rows with int8 activations")
    ap.add_argument("--bf16-activations", action="store_true", help="add decode rows with bf16 activations")
    ap.add_argument("--decode-tokens", type=int, default=2048, help="tokens for the decode-path comparison")
    ap.add_argument("--json", default=None, help="write the results here")
    add_calibration_args(ap)
    add_thread_arg(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if args.tokens < 2 or args.window < 2 or args.decode_tokens < 2:
        raise SystemExit(f"error: --tokens, --window and --decode-tokens must be >= 2, got {args.tokens}, "
                         f"{args.window} and {args.decode_tokens}")
    checkpoints = [None if c in (None, "embedded") else c for c in args.checkpoint]
    toks = args.tokenizer or [None] * len(checkpoints)
    if len(toks) != len(checkpoints):
        raise SystemExit(f"{len(checkpoints)} checkpoints but {len(toks)} tokenizers")
    toks = [None if t == "-" else t for t in toks]
    rows, runs = [], []
    for ck, tk in zip(checkpoints, toks):
        r, info = evaluate(args, ck, tk)
        rows += r
        runs.append(info)
    print("| model | variant | perplexity | vs float | KL | top-1 | weights |")
    print("|---|---|---|---|---|---|---|")
    last = None
    for r in rows:
        name = r["model"] if r["model"] != last else ""
        last = r["model"]
        vs = "" if r["variant"].startswith("float") else f"{100 * (r['ppl'] / r['basis'] - 1):+.1f}%"
        kl = "" if r["variant"].startswith("float") else f"{r['kl']:.4f}"
        t1 = "" if r["variant"].startswith("float") else f"{100 * r['top1']:.1f}%"
        print(f"| {name} | {r['variant']} | {r['ppl']:.3f} | {vs} | {kl} | {t1} | {r['bytes'] / 1e6:.2f} MB |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    run_main(main)
