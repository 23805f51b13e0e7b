"""Cross-check quant4's GGUF files against llama.cpp itself (optional; needs a Python with llama-cpp-python).

    python scripts/llama_cpp_crosscheck.py --llama-python /path/to/venv/bin/python [--checkpoint ...]

1. export: the checkpoint quantized by quant4 (int4 g32) -> GGUF Q4_1 (scripts' write_gguf); llama.cpp loads
   it, tokenizes the prompt, and its logits are compared with quant4's on the same tokens.
2. import: the float checkpoint -> GGUF F32 -> quantized by llama.cpp's own llama_model_quantize to Q4_0 and
   Q4_1 -> loaded by quant4 (codes kept) -> logits compared with llama.cpp running that same file.
Prints max |logit difference| / max |logit| and top-1 agreement per case. llama.cpp quantizes activations to
8 bits inside its Q4 matmuls, so the differences are small but not zero.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import REPO  # noqa: F401

import torch

LLAMA_SIDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama
    job = json.loads(sys.argv[1])
    if job.get("quantize"):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[job["quantize"]]
        rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["path"].encode(), params)
        assert rc == 0, rc
    llm = Llama(model_path=job["path"], n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    toks = llm.tokenize(job["prompt"].encode(), add_bos=True)
    llm.eval(toks)
    json.dump({"tokens": toks, "logits": np.array(llm.scores[:len(toks)]).tolist()}, open(job["out"], "w"))
""")


def llama(py, job: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        job = dict(job, out=f.name)
        r = subprocess.run([py, "-c", LLAMA_SIDE, json.dumps(job)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"llama.cpp side failed:\n{r.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def compare(name, model, tok, got, prompt):
    ids = tok.encode(prompt)
    same_tokens = ids == got["tokens"]
    with torch.no_grad():
        ours = model(torch.tensor([got["tokens"]]))[0]
    theirs = torch.tensor(got["logits"])
    rel = ((ours - theirs).abs().max() / ours.abs().max()).item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"| {name} | {'yes' if same_tokens else 'NO'} | {rel:.4f} | {100 * top1:.1f}% |")
    return rel, top1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="a Python interpreter with llama-cpp-python")
    ap.add_argument("--checkpoint", default=None, help="float checkpoint (default: the embedded model)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompt", default="Once upon a time, there was a little girl named Lily. She loved to")
    args = ap.parse_args(argv)

    from quant4.models.gguf import write_gguf
    from quant4.models.load import load_model, load_tokenizer
    from quant4 import quantize_model_

    loaded = load_model(args.checkpoint, tokenizer=args.tokenizer)
    tok = load_tokenizer(loaded)
    name = Path(loaded.path).stem if args.checkpoint else "embedded"
    print(f"| {name}: case | same tokens | max logit diff / max logit | top-1 agreement |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        f32 = d / "f32.gguf"
        write_gguf(loaded.model, loaded.args, f32, tokenizer=loaded.tokenizer)
        q = quantize_model_(load_model(args.checkpoint).model, 32)
        q41 = d / "quant4-q4_1.gguf"
        write_gguf(q, loaded.args, q41, tokenizer=loaded.tokenizer)
        compare("quant4 int4 g32 -> GGUF Q4_1, run by llama.cpp vs quant4", q, tok,
                llama(args.llama_python, {"path": str(q41), "prompt": args.prompt}), args.prompt)
        for kind in ("Q4_0", "Q4_1"):
            out = d / f"llama-{kind}.gguf"
            got = llama(args.llama_python, {"path": str(out), "src": str(f32), "quantize": kind, "prompt": args.prompt})
            mine = load_model(out)
            compare(f"llama.cpp {kind} file, imported by quant4 ({len(mine.quantized)} int4 layers) vs llama.cpp",
                    mine.model, load_tokenizer(mine), got, args.prompt)


if __name__ == "__main__":
    sys.exit(main())
