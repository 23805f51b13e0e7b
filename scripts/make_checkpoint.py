"""Write a random-weight Hugging Face checkpoint of a real model's shape, for measuring memory and speed.

    python scripts/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b-random     # ~13.5 GB, bf16
    python scripts/make_checkpoint.py --shape smollm2-135m --out /tmp/smollm2-random --dtype fp32

Shards of about --shard-gb each with a model.safetensors.index.json, config.json and generation_config.json,
as save_pretrained writes them; the weights are N(0, 0.02) (norms 1), generated one tensor at a time, so
writing a 7B checkpoint needs about one shard of memory. No tokenizer: pass one to the tools with --tokenizer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                      tie_word_embeddings=False),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
}


def tensor_shapes(cfg: dict):
    """(HF name, shape) in save_pretrained's order."""
    d, h, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (v, d)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield from ((f"{p}.self_attn.q_proj.weight", (q, d)), (f"{p}.self_attn.k_proj.weight", (kv, d)),
                    (f"{p}.self_attn.v_proj.weight", (kv, d)), (f"{p}.self_attn.o_proj.weight", (d, q)),
                    (f"{p}.mlp.gate_proj.weight", (h, d)), (f"{p}.mlp.up_proj.weight", (h, d)),
                    (f"{p}.mlp.down_proj.weight", (d, h)), (f"{p}.input_layernorm.weight", (d,)),
                    (f"{p}.post_attention_layernorm.weight", (d,)))
    yield "model.norm.weight", (d,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (v, d)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES), help="which model's shape")
    ap.add_argument("--out", required=True, help="directory to create (must not exist)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weights dtype (default: %(default)s)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)

    import torch
    from safetensors.torch import save_file

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists")
    out.mkdir(parents=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = dict(SHAPES[args.shape], model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               rms_norm_eps=1e-5, torch_dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype])
    gen = torch.Generator().manual_seed(args.seed)
    shapes = list(tensor_shapes(cfg))
    total = sum(torch.Size(s).numel() for _, s in shapes) * dtype.itemsize
    n_shards = max(1, round(total / (args.shard_gb * 1e9)))
    limit = total / n_shards
    shards, current, size = [], {}, 0
    weight_map = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(current, str(out / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in current})
            print(f"wrote {name} ({size / 1e9:.2f} GB)", file=sys.stderr)
            current, size = {}, 0

    for name, shape in shapes:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
        current[name] = t.to(dtype)
        size += t.numel() * dtype.itemsize
        del t
        if size >= limit and len(shards) < n_shards - 1:
            flush()
    flush()
    if len(shards) != n_shards:      # name the shards by their final count
        for i, old in enumerate(shards):
            new = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            (out / old).rename(out / new)
            weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    print(f"{out}: {args.shape}, {total / 1e9:.2f} GB in {len(shards)} shards", file=sys.stderr)


if __name__ == "__main__":
    main()
