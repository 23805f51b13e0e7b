"""Chat with a checkpoint, streaming its replies, using the chat template the checkpoint ships.

    python scripts/chat.py --checkpoint SmolLM2-135M-Instruct-int4.safetensors
    python scripts/chat.py --checkpoint model.gguf --system "You are terse." --prompt "Name three colours."
    python scripts/chat.py --checkpoint path/to/hf-directory --quantize

The template comes from the checkpoint (Hugging Face tokenizer_config.json `chat_template`, GGUF
`tokenizer.chat_template`, or the copy a quant4 file carries) and is rendered with jinja2 as transformers does.
A reply ends at the model's end-of-turn or eos token, at --max-new-tokens, or on Ctrl-C (which stops the reply,
not the program; Ctrl-D or an empty line followed by Ctrl-D leaves). The KV cache is kept across turns: each
turn runs only the new message through the model. Models without a chat template get plain completion:
each line you type is continued as text, and the script says so.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import (add_activation_args, add_checkpoint_args, add_layer_args, add_thread_arg, apply_activation,
                     apply_threads,
                     load_or_exit, refuse_unused_layer_args, run_main, tokenizer_or_exit)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(ap)
    ap.add_argument("--system", default=None, help="a system message to start the conversation (default: none)")
    ap.add_argument("--prompt", default=None,
                    help="one user message: print the reply and exit (default: interactive)")
    ap.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=False,
                    help="quantize a float checkpoint to int4 in memory first (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply at most (default: %(default)s)")
    ap.add_argument("--context", type=int, default=4096,
                    help="tokens of conversation kept (KV cache size), capped by the model's (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="0 = greedy (default: the checkpoint's generation_config.json, else 0)")
    ap.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: all)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    add_activation_args(ap)
    add_layer_args(ap)
    add_thread_arg(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    refuse_unused_layer_args(args, args.quantize, "with --quantize")
    if args.max_new_tokens < 1 or args.context < 2:
        raise SystemExit("error: --max-new-tokens must be >= 1 and --context >= 2")

    from quant4 import projection_filter, quantize_model_
    from quant4.models.chat import ChatSession, render

    loaded = load_or_exit(args.checkpoint, tokenizer=args.tokenizer)
    tok = tokenizer_or_exit(loaded)
    model = loaded.model
    if args.quantize and not loaded.quantized:
        quantize_model_(model, args.group_size, projection_filter(args.include, args.exclude), method=args.method)
    apply_activation(model, args)
    sampling = {"temperature": 0.0, **loaded.generation}
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            sampling[key] = getattr(args, key)
    session = ChatSession(model, tok, args.context, seed=args.seed, **sampling)
    label = "int4" if loaded.quantized or args.quantize else "float"
    print(f"{loaded.path} ({loaded.kind}, {label}); context {session.context} tokens; "
          f"{'chat template' if tok.chat_template else 'no chat template: plain completion'}", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.system and tok.chat_template:
        try:
            render(tok, messages + [{"role": "user", "content": "x"}])
        except ValueError as exc:
            raise SystemExit(f"error: --system: {exc}")
    interactive = args.prompt is None
    while True:
        if interactive:
            try:
                text = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if not text.strip():
                continue
        else:
            text = args.prompt
        t0 = time.perf_counter()
        before = session.prefilled
        if tok.chat_template:
            messages.append({"role": "user", "content": text})
            stream = tok.stream()
            ids = session.reply(messages, args.max_new_tokens, lambda t: _write(stream.push(t)))
            _write(stream.flush() + "\n")
            messages.append({"role": "assistant", "content": tok.decode(ids)})
        else:
            from quant4.models.generate import generate

            prompt = tok.encode(text)
            stream = tok.stream(prompt)
            _write(text)
            ids, _ = generate(model, prompt, args.max_new_tokens, seed=args.seed, stop_ids=tok.stop_ids,
                              on_token=lambda t: _write(stream.push(t)), **sampling)
            _write(stream.flush() + "\n")
            session.prefilled += len(prompt)
        dt = time.perf_counter() - t0
        print(f"[{len(ids)} tokens in {dt:.1f} s; {session.prefilled - before} prompt tokens run]", file=sys.stderr)
        if not interactive:
            return 0


def _write(s: str) -> None:
    sys.stdout.write(s)
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
