"""Benchmarks: quant4's int4 kernels against PyTorch's int4 CPU op and dense F.linear, in one process.

    python scripts/bench.py                 # full grid (about 10 minutes on 2 cores)
    python scripts/bench.py --quick         # one shape, g32, 2 threads
    python scripts/bench.py --json out.json

What it measures (medians of repeated runs after a warm-up; ratios are within this process):
  * read bandwidth probe: sum of a 256 MB fp32 tensor;
  * per layer shape, group size, thread count and M: quant4 (fp32 and bf16 activations; int8 activations on
    the stored row layout and, where the CPU has the kernels, on the slab16 layout set_activation_ holds),
    torch.ops.aten._weight_int4pack_mm_for_cpu (bf16 activations: its SIMD path; fp32: scalar path, M <= 4 only),
    dense F.linear in bf16 and fp32. Every method cycles through enough distinct layers (>= 256 MB of its own
    weights for M <= 4) that decode is measured from memory, not cache. quant4's GB/s counts every byte the
    kernel must read: nibbles + 16-bit scales + 16-bit zeros;
  * quantize+pack throughput and resident bytes per weight;
  * end to end: a Llama-2-7B-shaped model built directly in int4 (random weights, never a float copy),
    greedy decoding at batch 1 on quant4 and on torch's int4 op (bf16), against the bandwidth-bound ceiling
    (bytes read per token / probe bandwidth).
Finally the benchmark's targets are checked and printed as PASS / MISS with the measured ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

from _common import REPO  # noqa: F401  (puts the repo on sys.path)

import torch
import torch.nn.functional as F
from torch import nn

import quant4
from quant4 import Int4Linear, ops

SHAPES = {"7b": [(4096, 4096), (11008, 4096), (4096, 11008)], "8b": [(14336, 4096), (4096, 14336)]}
CYCLE_BYTES = 256 << 20


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def probe_bandwidth(threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(CYCLE_BYTES // 4)
    t = median_time(lambda: x.sum(), 9)
    return CYCLE_BYTES / t / 1e9


def random_packed(N, K, g, gen):
    """A layer directly in quant4's stored format: random codes, scales ~ 1e-3..1e-2, small zeros."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(N, K // g, generator=gen) * 9e-3 + 1e-3).half()
    zeros = (torch.randn(N, K // g, generator=gen) * 1e-3).half()
    return qweight, scales, zeros


def slab16_prepared(packed, g, K):
    """A copy of a packed layer permuted into the slab16 layout, as the int8 kernels read it."""
    q, s, z = (t.clone() for t in packed)
    ops.permute_slab16_(q, s, z, True)
    return ops.Prepared(q, s, z, g, K, slab16=True)


def torch_pack(qweight, scales, zeros, dtype):
    layer = Int4Linear.from_packed(qweight, scales, zeros, in_features=qweight.shape[1] * 2,
                                   group_size=qweight.shape[1] * 2 // scales.shape[1])
    return layer.to_torch_int4pack(dtype)


def bench_shape(N, K, g, threads, Ms, gen, skip_torch_fp32_above=4):
    torch.set_num_threads(threads)
    layer_bytes = N * K // 2 + 2 * 2 * N * (K // g)
    n_layers = max(2, math.ceil(CYCLE_BYTES / layer_bytes))
    packs = [random_packed(N, K, g, gen) for _ in range(n_layers)]
    tpacks_bf16 = [torch_pack(*p, torch.bfloat16) for p in packs]
    sz_fp32 = [sz.float() for _, sz in tpacks_bf16]
    n_dense = max(2, math.ceil(CYCLE_BYTES / (N * K * 4)))
    dense32 = [torch.randn(N, K, generator=gen) * 0.02 for _ in range(n_dense)]
    dense16 = [w.bfloat16() for w in dense32]
    rows, slabs = [], None
    for M in Ms:
        decode = M <= 4
        x = torch.randn(M, K, generator=gen)
        xb = x.bfloat16()
        use = slice(None) if decode else slice(0, 2)
        reps = 5 if decode else 3

        def cycle(fn, items):
            return lambda: [fn(it) for it in items]

        res = {}
        res["quant4_fp32"] = median_time(cycle(lambda p: ops.matmul(x, *p, g, K, num_threads=threads), packs[use]),
                                         reps) / len(packs[use])
        res["quant4_bf16"] = median_time(cycle(lambda p: ops.matmul(xb, *p, g, K, num_threads=threads),
                                               packs[use]), reps) / len(packs[use])
        if decode and ops.int8_kernel_available():
            res["quant4_int8act"] = median_time(cycle(
                lambda p: ops.matmul(x, *p, g, K, num_threads=threads, activation="int8"), packs[use]),
                reps) / len(packs[use])
        if decode and ops.slab16_available():      # the same weights in the int8 kernels' slab16 layout
            if slabs is None:
                slabs = [slab16_prepared(p, g, K) for p in packs]
            res["quant4_int8_slab16"] = median_time(cycle(
                lambda p: ops.matmul_prepared(x, p, num_threads=threads, activation="int8"), slabs),
                reps) / len(slabs)
        res["torch_int4_bf16"] = median_time(cycle(
            lambda p: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p[0], g, p[1]), tpacks_bf16[use]),
            reps) / len(tpacks_bf16[use])
        if M <= skip_torch_fp32_above:
            items = list(zip([p for p, _ in tpacks_bf16], sz_fp32))[: max(2, n_layers // 4)]
            res["torch_int4_fp32"] = median_time(cycle(
                lambda p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], g, p[1]), items), 3) / len(items)
        res["dense_bf16"] = median_time(cycle(lambda w: F.linear(xb, w), dense16[: n_dense if decode else 1]),
                                        reps) / (n_dense if decode else 1)
        res["dense_fp32"] = median_time(cycle(lambda w: F.linear(x, w), dense32[: n_dense if decode else 1]),
                                        reps) / (n_dense if decode else 1)
        row = {"N": N, "K": K, "group_size": g, "threads": threads, "M": M,
               "ms": {k: v * 1e3 for k, v in res.items()},
               "quant4_GBps": layer_bytes / res["quant4_fp32"] / 1e9,
               "quant4_bf16_GBps": layer_bytes / res["quant4_bf16"] / 1e9,
               "quant4_int8_GBps": layer_bytes / res["quant4_int8act"] / 1e9 if "quant4_int8act" in res else None,
               "quant4_slab16_GBps": (layer_bytes / res["quant4_int8_slab16"] / 1e9
                                      if "quant4_int8_slab16" in res else None),
               "quant4_GFLOPs": 2 * M * N * K / min(res["quant4_fp32"], res["quant4_bf16"]) / 1e9}
        rows.append(row)
        ms = row["ms"]
        print(f"  {N:5d}x{K:<5d} g{g:<3d} t{threads} M={M:<4d} " +
              "  ".join(f"{k} {ms[k]:8.3f}" for k in ms) +
              f"   quant4 {row['quant4_GBps']:5.1f} / {row['quant4_bf16_GBps']:5.1f}" +
              (f" / {row['quant4_int8_GBps']:5.1f}" if row["quant4_int8_GBps"] else "") +
              (f" / {row['quant4_slab16_GBps']:5.1f}" if row["quant4_slab16_GBps"] else "") +
              " GB/s (fp32 / bf16 in" + (" / int8 act." if row["quant4_int8_GBps"] else "") +
              (" / int8 slab16)" if row["quant4_slab16_GBps"] else ")"), flush=True)
    return rows


def bench_quantize(gen, threads):
    torch.set_num_threads(threads)
    w = torch.randn(11008, 4096, generator=gen) * 0.02
    t = median_time(lambda: quant4.quantize(w, 32, num_threads=threads), 3)
    return w.numel() / t / 1e6


def bench_interleave(gen, threads):
    """Oversubscription check: torch (its own OpenMP pool) and quant4 (the system libgomp) alternating.
    A ratio near 1.0 means neither pool's spinning threads slow the other down."""
    torch.set_num_threads(threads)
    qw, s, z = random_packed(4096, 4096, 32, gen)
    w = torch.randn(4096, 4096, generator=gen)
    x = torch.randn(1, 4096, generator=gen)

    def loop(fn, n=40):
        return lambda: [fn() for _ in range(n)]

    t_q = median_time(loop(lambda: ops.matmul(x, qw, s, z, 32, 4096, num_threads=threads)), 5)
    t_t = median_time(loop(lambda: F.linear(x, w)), 5)
    t_mix = median_time(loop(lambda: (F.linear(x, w), ops.matmul(x, qw, s, z, 32, 4096, num_threads=threads))), 5)
    return {"threads": threads, "quant4_ms": t_q / 40 * 1e3, "torch_ms": t_t / 40 * 1e3,
            "interleaved_ms": t_mix / 40 * 1e3, "ratio": t_mix / (t_q + t_t)}


class TorchInt4Linear(nn.Module):
    """PyTorch's CPU int4 op as a module (bf16 activations), for the end-to-end comparison only."""

    def __init__(self, q: Int4Linear):
        super().__init__()
        self.g, self.n = q.group_size, q.out_features
        packed, sz = q.to_torch_int4pack(torch.bfloat16)
        self.register_buffer("packed", packed)
        self.register_buffer("sz", sz)

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).bfloat16().contiguous(),
                                                       self.packed, self.g, self.sz)
        return y.reshape(*lead, self.n).to(x.dtype)


def build_7b_int4(gen, g=32, n_layers=32):
    from quant4.models.llama import ModelArgs, Transformer

    args = ModelArgs(dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                     max_seq_len=256, tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(args)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            qw, s, z = random_packed(mod.out_features, mod.in_features, g, gen)
            model.set_submodule(name, Int4Linear.from_packed(qw, s, z, in_features=mod.in_features, group_size=g))
    model.tok_embeddings.weight = nn.Parameter(torch.randn(32000, 4096, generator=gen) * 0.02, requires_grad=False)
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, nn.Parameter(torch.ones(p.shape), requires_grad=False))
    model.reset_rope()
    return model.eval()


@torch.inference_mode()
def decode_tok_s(model, steps=12, prompt=8):
    model.setup_cache(1, prompt + steps + 1)
    model(torch.arange(1, prompt + 1)[None], 0)
    ts = []
    tok = torch.tensor([[5]])
    for i in range(steps):
        t = time.perf_counter()
        logits = model(tok, prompt + i)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        ts.append(time.perf_counter() - t)
    model.clear_cache()
    return 1.0 / statistics.median(ts[2:])


def bench_e2e(gen, threads, bw):
    torch.set_num_threads(threads)
    quant4.set_num_threads(threads)
    t = time.perf_counter()
    model = build_7b_int4(gen)
    build_s = time.perf_counter() - t
    q_bytes = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Int4Linear)
                  for b in (m.qweight, m.scales, m.zeros))
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if "tok_embeddings" not in n) + 4096 * 4
    per_token = q_bytes + other
    ceiling = bw * 1e9 / per_token
    q4 = decode_tok_s(model)
    q4_int8 = q4_bf16act = None
    if ops.int8_kernel_available():
        quant4.set_activation_(model, "int8")
        q4_int8 = decode_tok_s(model)
    if ops.bf16_kernel_enabled():
        quant4.set_activation_(model, "bf16")
        q4_bf16act = decode_tok_s(model)
    quant4.set_activation_(model, "float")
    model.to(torch.bfloat16)            # norms, embeddings, cache and activations in bf16, int4 layers unchanged
    q4_bf16 = decode_tok_s(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int4Linear):
            model.set_submodule(name, TorchInt4Linear(mod))
    model.to(torch.bfloat16)
    tq = decode_tok_s(model)
    quant4.set_num_threads(None)
    return {"threads": threads, "build_s": build_s, "bytes_per_token": per_token, "ceiling_tok_s": ceiling,
            "quant4_tok_s": q4, "quant4_bf16_tok_s": q4_bf16, "quant4_int8_act_tok_s": q4_int8,
            "quant4_bf16_act_tok_s": q4_bf16act,
            "torch_int4_bf16_tok_s": tq}


def check_targets(res):
    out = []

    def target(name, ok, detail):
        out.append({"target": name, "pass": bool(ok), "detail": detail})
        print(f"  {'PASS' if ok else 'MISS'}  {name}: {detail}")

    rows = res["matmul"]
    bw = {r["threads"]: r["GBps"] for r in res["probe"]}
    for r in rows:
        ms, M, t = r["ms"], r["M"], r["threads"]
        tag = f"{r['N']}x{r['K']} g{r['group_size']} t{t} M={M}"
        q = min(ms["quant4_fp32"], ms["quant4_bf16"])
        if M == 1:
            target(f"M=1 >= 1.3x torch int4 bf16 [{tag}]", ms["torch_int4_bf16"] / ms["quant4_bf16"] >= 1.3,
                   f"{ms['torch_int4_bf16'] / ms['quant4_bf16']:.2f}x" + (
                       f"; int8 activations {ms['torch_int4_bf16'] / ms['quant4_int8act']:.2f}x"
                       if "quant4_int8act" in ms else "") + (
                       f", in slab16 {ms['torch_int4_bf16'] / ms['quant4_int8_slab16']:.2f}x"
                       if "quant4_int8_slab16" in ms else ""))
            # the fastest kernel: int8 activations where the CPU has them (the tools' default), else bf16 inputs
            gbps = {"fp32 in": r["quant4_GBps"], "bf16 in": r["quant4_bf16_GBps"],
                    "int8 act.": r.get("quant4_int8_GBps"), "int8 slab16": r.get("quant4_slab16_GBps")}
            best_kind = max((k for k in gbps if gbps[k] is not None), key=lambda k: gbps[k])
            best = gbps[best_kind]
            target(f"M=1 >= 85% of probe bandwidth [{tag}]", best >= 0.85 * bw[t],
                   f"{best:.1f} of {bw[t]:.1f} GB/s ({best / bw[t]:.0%}, {best_kind}; " +
                   ", ".join(f"{k} {v:.1f}" for k, v in gbps.items() if v is not None and k != best_kind) + ")")
            if "torch_int4_fp32" in ms:
                target(f"M=1 >= 20x torch int4 fp32 [{tag}]", ms["torch_int4_fp32"] / ms["quant4_fp32"] >= 20,
                       f"{ms['torch_int4_fp32'] / ms['quant4_fp32']:.1f}x")
        if M == 32:
            target(f"M=32 >= 1.0x torch int4 bf16 [{tag}]", ms["torch_int4_bf16"] / ms["quant4_bf16"] >= 1.0,
                   f"bf16 in {ms['torch_int4_bf16'] / ms['quant4_bf16']:.2f}x, "
                   f"fp32 in {ms['torch_int4_bf16'] / ms['quant4_fp32']:.2f}x")
        if M >= 128:
            target(f"M>=128 >= 1.0x dense fp32 [{tag}]", ms["dense_fp32"] / ms["quant4_fp32"] >= 1.0,
                   f"fp32 in {ms['dense_fp32'] / ms['quant4_fp32']:.2f}x, bf16 in {ms['dense_fp32'] / ms['quant4_bf16']:.2f}x")
        target(f"never slower than dense fp32 [{tag}]", ms["dense_fp32"] >= q,
               f"{ms['dense_fp32'] / q:.2f}x")
    target("quantize+pack >= 200 M weights/s", res["quantize_Mw_s"] >= 200, f"{res['quantize_Mw_s']:.0f} M/s")
    for g, b in res["bytes_per_weight"].items():
        target(f"resident bytes/weight <= 0.5 + 4/g (g{g})", b <= 0.5 + 4 / int(g) + 1e-9, f"{b:.4f}")
    for e in res.get("e2e", []):
        for key, what in (("quant4_bf16_tok_s", "bf16 model"), ("quant4_tok_s", "fp32 model")):
            v = e[key]
            target(f"e2e, {what}, >= 80% of bandwidth-bound tok/s (t{e['threads']})", v >= 0.8 * e["ceiling_tok_s"],
                   f"{v:.2f} of {e['ceiling_tok_s']:.2f} tok/s ({v / e['ceiling_tok_s']:.0%})")
            target(f"e2e, {what}, >= 1.2x torch int4 bf16 (t{e['threads']})", v >= 1.2 * e["torch_int4_bf16_tok_s"],
                   f"{v / e['torch_int4_bf16_tok_s']:.2f}x")
        if e.get("quant4_bf16_act_tok_s"):
            v = e["quant4_bf16_act_tok_s"]
            target(f"e2e, fp32 model with bf16 activations, >= 1.2x torch int4 (t{e['threads']})",
                   v >= 1.2 * e["torch_int4_bf16_tok_s"],
                   f"{v / e['torch_int4_bf16_tok_s']:.2f}x, {v / e['ceiling_tok_s']:.0%} of the ceiling")
        if e.get("quant4_int8_act_tok_s"):
            target(f"e2e, int8 activations, >= 1.2x torch int4 (t{e['threads']})",
                   e["quant4_int8_act_tok_s"] >= 1.2 * e["torch_int4_bf16_tok_s"],
                   f"{e['quant4_int8_act_tok_s'] / e['torch_int4_bf16_tok_s']:.2f}x, "
                   f"{e['quant4_int8_act_tok_s'] / e['ceiling_tok_s']:.0%} of the ceiling")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="11008x4096, g32, 2 threads, M in 1 4 32 128")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--group-size", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 32, 128, 512])
    ap.add_argument("--shapes", nargs="+", default=["7b", "8b"], choices=sorted(SHAPES))
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--json", default=str(REPO / "bench_out" / "bench.json"))
    args = ap.parse_args(argv)
    shapes = [s for k in args.shapes for s in SHAPES[k]]
    if args.quick:
        shapes, args.group_size, args.threads, args.m = [(11008, 4096)], [32], [2], [1, 4, 32, 128]
    gen = torch.Generator().manual_seed(0)
    print(f"quant4 {quant4.__version__}, kernels {ops.kernel_isa()}, bf16 kernel {ops.bf16_kernel_enabled()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    res = {"kernels": ops.kernel_isa(), "torch": torch.__version__, "probe": [], "matmul": []}
    for t in args.threads:
        bw = probe_bandwidth(t)
        res["probe"].append({"threads": t, "GBps": bw})
        print(f"read bandwidth probe, {t} thread(s): {bw:.1f} GB/s")
    print("median ms per layer:")
    for N, K in shapes:
        for g in args.group_size:
            for t in args.threads:
                res["matmul"] += bench_shape(N, K, g, t, args.m, gen)
    res["quantize_Mw_s"] = bench_quantize(gen, max(args.threads))
    print(f"quantize+pack: {res['quantize_Mw_s']:.0f} M weights/s ({max(args.threads)} threads)")
    res["interleave"] = [bench_interleave(gen, t) for t in args.threads]
    for r in res["interleave"]:
        print(f"interleaved torch F.linear + quant4 matmul, {r['threads']} thread(s): {r['interleaved_ms']:.3f} ms "
              f"vs {r['torch_ms']:.3f} + {r['quant4_ms']:.3f} ms alone (ratio {r['ratio']:.2f})")
    res["bytes_per_weight"] = {}
    for g in args.group_size:
        q = Int4Linear(4096, 4096, group_size=g)
        res["bytes_per_weight"][g] = sum(b.numel() * b.element_size() for b in q.buffers()) / (4096 * 4096)
    print("resident bytes per weight: " + ", ".join(f"g{g} {b:.4f}" for g, b in res["bytes_per_weight"].items()))
    if not args.no_e2e:
        res["e2e"] = []
        for t in [max(args.threads)]:
            e = bench_e2e(gen, t, next(p["GBps"] for p in res["probe"] if p["threads"] == t))
            res["e2e"].append(e)
            i8 = e["quant4_int8_act_tok_s"]
            print(f"end to end, Llama-2-7B shape, int4 g32, {t} threads: quant4 {e['quant4_tok_s']:.2f} tok/s fp32 "
                  f"model, {e['quant4_bf16_tok_s']:.2f} tok/s bf16 model (fp32 model with bf16 activations: "
                  f"{e['quant4_bf16_act_tok_s'] and round(e['quant4_bf16_act_tok_s'], 2)}, int8 activations: "
                  f"{i8 and round(i8, 2)}), "
                  f"torch int4 (bf16) {e['torch_int4_bf16_tok_s']:.2f} tok/s, bandwidth-bound ceiling "
                  f"{e['ceiling_tok_s']:.2f} tok/s ({e['bytes_per_token'] / 1e9:.2f} GB per token; "
                  f"built in {e['build_s']:.1f} s)", flush=True)
    print("targets:")
    res["targets"] = check_targets(res)
    from pathlib import Path

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
