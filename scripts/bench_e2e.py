"""End-to-end speed of a whole model: quant4 and llama.cpp on the same GGUF file, in one run.

    python scripts/bench_e2e.py --checkpoint model.gguf --llama-bench /path/to/llama-bench
    python scripts/bench_e2e.py --shape smollm2-135m --llama-bench /path/to/llama-bench   # a random model

quant4 loads the file with load_model (GGUF Q4_0/Q4_1 stay int4, the default a user gets) and measures, after a
warm-up, the median of --repeats runs of: prefill of each --prompt length (the prompt in one call as generate()
runs it, KV cache filled) and decode (--gen tokens one at a time after a 16-token prompt). llama.cpp's `llama-bench` runs
the same file with the same threads (-p prompt lengths, -n --gen, -r --repeats). The table gives tokens/s and
the ratio quant4 / llama.cpp. Then (--alternate, default 3 rounds) decode once more in turns, quant4 then
llama.cpp, each round's ratio printed: decode is bound by memory bandwidth, which drifts on a shared VM within
minutes, so neighbouring runs compare more fairly than medians taken minutes apart. The machine should be
otherwise idle (busy neighbours collapse OpenMP throughput).
It keeps libgomp's default spinning threads, as the user tools do when they start on free CPUs; they wait
passively when other tasks are runnable at start (scripts/_common.py: spinning decoded the 135M-shaped model
about 2x faster on an idle machine, passive waiting 1.7-1.9x faster beside a busy process). --busy runs the
whole comparison beside one CPU-bound process, quant4 waiting passively as the tools then do.

llama-bench comes from llama.cpp's source, e.g. the copy inside llama-cpp-python's source distribution:
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-bench -j 2        # about 8 minutes on 2 cores

--shape writes a random-weight model of that shape, each projection quantized by quant4 (round to nearest, g32) as
soon as it is drawn (a 7B shape needs about 2 GB of memory beyond the file), as GGUF Q4_1 (with the
Llama 2 tokenizer from ../shared if present, else the embedded model's) into --workdir.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, add_thread_arg, apply_threads, resolve_activation, run_main

SHAPES = {"smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, tie_embeddings=True),
          "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, tie_embeddings=True),
          "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                            tie_embeddings=False)}


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a GGUF file (or any checkpoint; llama.cpp needs GGUF)")
    src.add_argument("--shape", choices=sorted(SHAPES), help="make a random-weight Q4_1 GGUF of this shape")
    ap.add_argument("--workdir", default="bench_out", help="where --shape writes its file (default: %(default)s)")
    ap.add_argument("--llama-bench", default=None, help="path to llama.cpp's llama-bench (default: quant4 only)")
    ap.add_argument("--prompt", type=int, nargs="+", default=[32, 512], help="prefill lengths (default: %(default)s)")
    ap.add_argument("--gen", type=int, default=64, help="decode tokens per run (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement, median taken (default: %(default)s)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="quant4's model dtype (default: %(default)s, what load_model gives)")
    ap.add_argument("--activation", default="auto", choices=("auto", "float", "int8", "bf16"),
                    help="every int4 layer's activation mode, as generate.py's --activation (default: "
                         "%(default)s, what generate.py and chat.py do)")
    ap.add_argument("--busy", action="store_true",
                    help="run everything beside one competing CPU-bound process (a busy neighbour), for quant4 "
                         "and llama.cpp alike")
    ap.add_argument("--compile", action="store_true",
                    help="also measure quant4 through torch.compile(model, dynamic=True), side by side with eager")
    ap.add_argument("--alternate", type=int, default=3, metavar="ROUNDS",
                    help="with --llama-bench: afterwards, decode measured in turns (quant4, then llama.cpp) this "
                         "many times, each round's ratio printed (default: %(default)s; 0: off)")
    add_thread_arg(ap)
    return ap


def make_model(shape: str, workdir: Path) -> Path:
    import torch

    from quant4 import Int4Linear
    from quant4.models.gguf import write_gguf
    from quant4.models.llama import ModelArgs, Transformer
    from quant4.models.tokenizer import open_tokenizer

    llama2 = REPO.parent / "shared" / "models" / "llama2c" / "tokenizer.model"
    tok = open_tokenizer(llama2 if llama2.is_file() else REPO / "models" / "tiny" / "tokenizer.model")
    path = workdir / f"{shape}-random-q4_1-v{tok.build().vocab_size}.gguf"
    if path.is_file():
        return path
    args = ModelArgs(vocab_size=tok.build().vocab_size, max_seq_len=2048, **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")     # untouched memory: a 7B shape in fp32 (27 GB) is never resident at once
    # init_weights' values, one tensor at a time, each projection quantized (round to nearest) as soon as it is
    # drawn, so that the float weights of one layer at most are in memory
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in [n for n, _ in model.named_parameters()]:    # names only: a swapped weight must be freed
            p = model.get_parameter(name)
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            std = 0.02 / math.sqrt(2 * args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            parent, _, attr = name[: -len(".weight")].rpartition(".")
            if parent.startswith("layers."):
                owner = model.get_submodule(parent)
                setattr(owner, attr, Int4Linear.from_linear(getattr(owner, attr), 32))
    model.reset_rope()
    workdir.mkdir(parents=True, exist_ok=True)
    write_gguf(model, args, path, tokenizer=tok)
    return path


def quant4_speeds(model, prompts, gen: int, repeats: int, compiled: bool = False) -> dict:
    """tokens/s of prefill (each prompt length) and decode, medians after a warm-up run; compiled: through
    torch.compile(model, dynamic=True) (its compilation happens in the warm-up)."""
    import torch

    from quant4.models.fast_decode import decode_step

    vocab = model.args.vocab_size
    model.setup_cache(1, max(max(prompts), 16 + gen))   # one attached cache, refilled by each run
    fwd = torch.compile(model, dynamic=True) if compiled else model
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.inference_mode():
        # as generate() prefills: the lean path when the model allows it (eagerly), else forward; the logits
        # of the last position only (as llama-bench)
        prefill = (decode_step(model).prefill if not compiled
                   else lambda ids, pos: fwd(torch.tensor([ids]), pos, last_only=True)[0, -1])
        for n in prompts:
            toks = torch.randint(0, vocab, (n,), generator=g).tolist()
            times = []
            for r in range(repeats + 1):            # the first run warms up
                t0 = time.perf_counter()
                prefill(toks, 0)
                times.append(time.perf_counter() - t0)
            out[f"pp{n}"] = n / statistics.median(times[1:])
        rates, out["lean"] = quant4_decode(model, fwd, gen, repeats + 1, compiled, g)
        out[f"tg{gen}"] = statistics.median(rates[1:])     # the first run warms up
    model.clear_cache()
    return out


def quant4_decode(model, fwd, gen: int, runs: int, compiled: bool = False, g=None):
    """tokens/s of `runs` decode runs (gen tokens after a 16-token prompt, each run refilling the attached
    cache), and whether they took the lean path. The caller holds inference mode and the cache."""
    import torch

    from quant4.models.fast_decode import decode_step

    prompt = torch.randint(0, model.args.vocab_size, (1, 16), generator=g)
    # as generate() decodes: the lean path when the model allows it (eagerly), else forward
    step = decode_step(model) if not compiled else (lambda t, pos: fwd(torch.tensor([[t]]), pos)[0, -1])
    rates = []
    for r in range(runs):
        logits = step.prefill(prompt[0].tolist(), 0) if not compiled else fwd(prompt, 0, last_only=True)[0, -1]
        t0 = time.perf_counter()
        for i in range(gen):
            t = int(torch.argmax(logits))
            logits = step(t, 16 + i)
        rates.append(gen / (time.perf_counter() - t0))
    return rates, getattr(step, "lean", False)


def alternating_decode(model, exe: str, path: Path, gen: int, rounds: int, threads) -> list:
    """Decode measured in turns, quant4 then llama.cpp, `rounds` times: [(quant4, llama.cpp) tok/s] per round.
    This VM's memory bandwidth drifts within minutes, and decode is bound by it: ratios of neighbouring runs
    are steadier than ratios of medians taken minutes apart."""
    import torch

    model.setup_cache(1, 16 + gen)
    pairs = []
    with torch.inference_mode():
        quant4_decode(model, model, gen, 1)           # warm-up
        for _ in range(rounds):
            ours = quant4_decode(model, model, gen, 1)[0][0]
            pairs.append((ours, llama_speeds(exe, path, [0], gen, 1, threads)[f"tg{gen}"]))
    model.clear_cache()
    return pairs


def llama_speeds(exe: str, path: Path, prompts, gen: int, repeats: int, threads) -> dict:
    cmd = [exe, "-m", str(path), "-p", ",".join(map(str, prompts)), "-n", str(gen), "-r", str(repeats),
           "-o", "json"] + (["-t", str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    out = {}
    for row in json.loads(r.stdout):
        key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[key] = float(row["avg_ts"])
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    # idle: libgomp's default spinning, as llama-bench's threads spin and as the tools leave it on free CPUs;
    # --busy: passive waiting, which the tools choose when they start beside a busy process (unless the user chose)
    if args.busy and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    apply_threads(args.threads, wait_policy=False)
    import quant4

    path = Path(args.checkpoint) if args.checkpoint else make_model(args.shape, Path(args.workdir))
    threads = args.threads or quant4.get_num_threads()
    import torch

    from quant4.models.load import load_model

    model = load_model(path).model
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        table(args, path, model, threads)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def placement(model) -> str:
    """Where the int4 weights live and how OpenMP's threads wait: both move decode speed (README "Speed")."""
    import os

    from quant4 import memory
    from quant4.nn import Int4Linear

    # named_buffers: the tensors as held (reading m.qweight would put a slab16 weight back into rows)
    ws = [dict(m.named_buffers())["qweight"] for m in model.modules() if isinstance(m, Int4Linear)]
    slab = sum(m.slab16 for m in model.modules() if isinstance(m, Int4Linear))
    total = sum(w.numel() for w in ws)
    # a tensor of 2 MiB or more: its own mapping; a smaller one in a shared 2 MiB page (memory.adopt): its bytes
    huge = sum(memory.mapped_bytes(w) for w in ws if w.numel() >= memory.HUGE_PAGE) + \
        sum(w.numel() for w in ws if memory.in_shared_page(w) and memory.mapped_bytes(w) > 0)
    wait = os.environ.get("OMP_WAIT_POLICY") or ("GOMP_SPINCOUNT=" + os.environ["GOMP_SPINCOUNT"]
                                                 if "GOMP_SPINCOUNT" in os.environ else "spinning (libgomp default)")
    return (f"int4 codes in 2 MiB pages: {huge / 2**30:.2f} of {total / 2**30:.2f} GiB, slab16 layout: {slab} of "
            f"{len(ws)} layers; OpenMP wait: {wait}")


def table(args, path, model, threads):
    import torch

    import quant4
    from bench import probe_bandwidth

    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    activation = resolve_activation(args.activation)
    quant4.set_activation_(model, activation)
    probe = [probe_bandwidth(threads)]      # the memory's read speed now (it drifts): with the table
    ours = quant4_speeds(model, args.prompt, args.gen, args.repeats)
    comp = quant4_speeds(model, args.prompt, args.gen, args.repeats, compiled=True) if args.compile else {}
    lean = ours.pop("lean")
    comp.pop("lean", None)
    theirs = llama_speeds(args.llama_bench, path, args.prompt, args.gen, args.repeats, threads) \
        if args.llama_bench else {}
    probe.append(probe_bandwidth(threads))
    print(f"{path.name}, {threads} threads, quant4 kernels {quant4.kernel_isa()}, model {args.dtype}, "
          f"activations {activation}, prefill and decode {'lean path' if lean else 'through forward'}"
          f"{', beside one busy process' if args.busy else ''}; {placement(model)}; read-bandwidth probe "
          f"(scripts/bench.py) {probe[0]:.1f} GB/s before, {probe[1]:.1f} after")
    cols = ["phase", "quant4 tok/s"] + (["compiled tok/s", "compiled / eager"] if comp else []) + \
        ["llama.cpp tok/s", "quant4 / llama.cpp"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for key, v in ours.items():
        c, t = comp.get(key), theirs.get(key)
        row = f"| {key} | {v:.1f} |" + (f" {c:.1f} | {c / v:.2f}x |" if comp else "")
        print(row + f" {f'{t:.1f}' if t else '-'} | {f'{v / t:.2f}x' if t else '-'} |")
    if args.llama_bench and args.alternate > 0:
        pairs = alternating_decode(model, args.llama_bench, path, args.gen, args.alternate, threads)
        ratios = [q / l for q, l in pairs]
        print(f"decode in turns (tg{args.gen}, quant4 then llama.cpp, {len(pairs)} rounds): " +
              ", ".join(f"{q:.1f} vs {l:.1f} ({q / l:.2f}x)" for q, l in pairs) +
              f"; median ratio {statistics.median(ratios):.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
