"""Generate text from a float or int4 checkpoint, streaming it, with prefill/decode tokens/s and peak memory.

    python scripts/generate.py                         # the embedded TinyStories model, quantized to int4
    python scripts/generate.py --checkpoint ../shared/models/stories260K/stories260K.bin \
        --tokenizer ../shared/models/stories260K/tok512.model --quantize
    python scripts/generate.py --compare               # float and int4 side by side

Checkpoints: anything quant4.models.load reads (quant4 int4 files, llama2.c .bin, .pt/.pth, Hugging Face
directories, quant4 float files). --quantize converts a float model to int4 in memory first; it is the
default for the embedded model (use --no-quantize for float).
"""
from __future__ import annotations

import argparse
import sys
import time


from _common import (add_activation_args, add_checkpoint_args, add_layer_args, add_thread_arg, apply_activation,
                     apply_threads, resolve_activation,
                     load_or_exit, peak_rss_mb, refuse_unused_layer_args, run_main, tokenizer_or_exit)

from quant4.options import METHODS      # in-memory quantization: rtn or search (GPTQ: scripts/quantize.py)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=None,
                    help="quantize a float checkpoint to int4 before generating (default: on for the embedded model)")
    ap.add_argument("--compare", action="store_true", help="run float and int4 one after the other")
    ap.add_argument("--prompt", default="Once upon a time", help="text to continue (default: %(default)r)")
    ap.add_argument("--max-new-tokens", type=int, default=200,
                    help="tokens to generate at most, capped by the context (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: all)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    add_activation_args(ap)
    add_layer_args(ap, methods=METHODS)
    add_thread_arg(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise SystemExit("error: --prompt is not valid UTF-8 text") from None
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1")
    if not args.temperature >= 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}")

    from quant4.models.generate import generate
    import quant4
    from quant4 import kernel_isa, projection_filter, quantize_model_
    from quant4.swap import model_size

    t0 = time.perf_counter()
    loaded = load_or_exit(args.checkpoint, tokenizer=args.tokenizer)
    tok = tokenizer_or_exit(loaded)
    if tok.vocab_size != loaded.args.vocab_size:
        raise SystemExit(f"error: the tokenizer ({tok.origin}) has {tok.vocab_size} pieces, "
                         f"the model {loaded.args.vocab_size}")
    quantize = args.quantize if args.quantize is not None else args.checkpoint is None
    refuse_unused_layer_args(args, quantize or args.compare, "when a float model is quantized (--quantize or "
                             "--compare; the default for the embedded model)")
    print(f"loaded {loaded.path} ({loaded.kind}{', int4' if loaded.quantized else ''}) in "
          f"{time.perf_counter() - t0:.2f} s; kernels: {kernel_isa()}, {quant4.get_num_threads()} threads",
          file=sys.stderr)

    runs = []
    if args.compare:
        if loaded.quantized:
            raise SystemExit(f"error: --compare needs a float checkpoint; {loaded.path} is already int4")
        runs = [("float", False), (f"int4 g{args.group_size}", True)]
    elif loaded.quantized:       # an int4 file of any kind (quant4, GGUF Q4, another tool's .pth)
        sizes = sorted({info["group_size"] for info in loaded.quantized.values() if "group_size" in info})
        runs = [(f"int4 g{'/'.join(map(str, sizes))}", False)]
    else:
        runs = [(f"int4 g{args.group_size}" if quantize else "float", quantize)]
    prompt_ids = tok.encode(args.prompt)
    if len(prompt_ids) >= loaded.args.max_seq_len:
        raise SystemExit(f"error: the prompt is {len(prompt_ids)} tokens; this model's context is "
                         f"{loaded.args.max_seq_len} tokens")
    texts = []
    for label, do_quantize in runs:
        model = loaded.model
        if do_quantize:
            t1 = time.perf_counter()
            quantize_model_(model, args.group_size, projection_filter(args.include, args.exclude),
                            method=args.method)
            n = sum(r.swapped for r in model.quant4_report)
            print(f"[{label}] quantized {n} layers in {time.perf_counter() - t1:.2f} s", file=sys.stderr)
        apply_activation(model, args)
        size = model_size(model)
        act = f", activations {resolve_activation(args.activation)}" if size["int4_layers"] else ""
        print(f"[{label}] {size['int4_weights'] / 1e6:.2f} M int4 weights in {size['int4_layers']} layers, "
              f"{size['float_params'] / 1e6:.2f} M float params; {size['bytes'] / 1e6:.2f} MB{act}", file=sys.stderr)
        room = loaded.args.max_seq_len - len(prompt_ids)
        if args.max_new_tokens > room:
            print(f"[{label}] --max-new-tokens {args.max_new_tokens} capped at {room} by the model's context "
                  f"({loaded.args.max_seq_len} tokens)", file=sys.stderr)
        print(f"--- {label} ---")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        stream = tok.stream(prompt_ids)      # prints exactly what the new tokens decode to, after the prompt

        def on_token(t):
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

        ids, st = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           stop_ids=tok.stop_ids | {tok.bos_id}, on_token=on_token)
        print(stream.flush())
        print(f"[{label}] prefill {st.prompt_tokens} tokens at {st.prefill_tok_s:.1f} tok/s, "
              f"decode {st.new_tokens} tokens at {st.decode_tok_s:.1f} tok/s, peak RSS {peak_rss_mb():.0f} MB")
        texts.append(ids)
    if args.compare and len(texts) == 2:
        a, b = texts
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"float and int4 agree on the first {same} of {min(len(a), len(b))} generated tokens")


if __name__ == "__main__":
    run_main(main)
