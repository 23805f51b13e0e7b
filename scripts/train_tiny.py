"""Train quant4's embedded demo model: a ~1.3M-parameter TinyStories Llama and its tokenizer.

Data (TinyStories, CDLA-Sharing-1.0), read from ../shared/data:
  - tokenizer and model train on tinystories_train.txt plus tinystories_val_head.txt[400000:];
  - tinystories_val_head.txt[300000:400000] is the validation split used to keep the best step;
  - tinystories_val_head.txt[:300000] is the evaluation hold-out and is never read here.
Text is split into blank-line-separated blocks (and at <|endoftext|>); each block is encoded with a BOS
in front, the convention quant4's evaluation uses.

Writes <out>/model.safetensors (fp32), <out>/config.json and <out>/tokenizer.model.
    python scripts/train_tiny.py --steps 1400 --threads 2      # about 45 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant4.models.calibration import DATA_DIR  # noqa: E402
from quant4.models.llama import ModelArgs, Transformer  # noqa: E402

HOLDOUT_BYTES = 300_000
VALID_END = 400_000


def blocks(text: str) -> list[str]:
    text = text.replace("<|endoftext|>", "\n\n")
    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def load_splits(data_dir: Path):
    train = (data_dir / "tinystories_train.txt").read_text(encoding="utf-8")
    val_head = (data_dir / "tinystories_val_head.txt").read_bytes()
    valid = val_head[HOLDOUT_BYTES:VALID_END].decode("utf-8", errors="ignore")
    extra = val_head[VALID_END:].decode("utf-8", errors="ignore")
    # drop the partial first and last blocks of the byte slices
    return blocks(train) + blocks(extra)[1:], blocks(valid)[1:-1]


def train_tokenizer(train_blocks, out: Path, vocab_size: int):
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(b.replace("\n", " ") for b in train_blocks), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            num_threads=1, minloglevel=2,
        )
        os.replace(Path(tmp) / "tok.model", out)
    return spm.SentencePieceProcessor(model_file=str(out))


def encode(sp, bl):
    ids = []
    for b in bl:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(b))
    return torch.tensor(ids, dtype=torch.long)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder with the TinyStories text")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "tiny")
    ap.add_argument("--steps", type=int, default=1400, help="optimizer steps (cosine schedule over them)")
    ap.add_argument("--minutes", type=float, default=60.0, help="stop early after this much wall time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_blocks, valid_blocks = load_splits(args.data)
    sp = train_tokenizer(train_blocks, args.out / "tokenizer.model", args.vocab)
    train_ids, valid_ids = encode(sp, train_blocks), encode(sp, valid_blocks)
    print(f"train tokens {len(train_ids):,}  valid tokens {len(valid_ids):,}", flush=True)

    margs = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=args.vocab,
                      hidden_dim=384, max_seq_len=512, dropout=0.1)
    model = Transformer(margs)
    model.init_weights(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def valid_loss():
        model.eval()
        S = args.seq_len
        n = (len(valid_ids) - 1) // S
        x = valid_ids[: n * S].view(n, S)
        y = valid_ids[1 : n * S + 1].view(n, S)
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model(x[i:i + 16]).flatten(0, 1), y[i:i + 16].flatten())
                      for i in range(0, n, 16)]
        model.train()
        return float(torch.stack(losses).mean())

    budget = args.minutes * 60
    warmup = 100
    t0 = time.time()
    step, best = 0, float("inf")
    model.train()
    while step < args.steps:
        elapsed = time.time() - t0
        if elapsed > budget:
            print(f"time budget reached at step {step}", flush=True)
            break
        # linear warm-up, then cosine decay to 10% of the peak over --steps
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(len(train_ids) - args.seq_len - 1, (args.batch,))
        x = torch.stack([train_ids[i : i + args.seq_len] for i in ix])
        y = torch.stack([train_ids[i + 1 : i + args.seq_len + 1] for i in ix])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            vl = valid_loss()
            print(f"step {step} lr {lr:.2e} train {loss.item():.3f} valid {vl:.3f} ppl {math.exp(vl):.2f} "
                  f"t {elapsed / 60:.1f}m", flush=True)
            if vl < best:
                best = vl
                save(model, margs, args.out)
    vl = valid_loss()
    if vl < best:
        best = vl
        save(model, margs, args.out)
    print(f"done: {step} steps, best valid loss {best:.4f} (ppl {math.exp(best):.2f})", flush=True)


def save(model, margs, out: Path):
    from safetensors.torch import save_file

    cfg = dict(margs.to_dict(), dropout=0.0)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "output.weight"}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "quant4-float", "config": json.dumps(cfg)})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    main()
