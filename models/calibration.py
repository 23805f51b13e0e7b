"""Calibration token windows for GPTQ, drawn from training text (never from the evaluation hold-out)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

TRAIN_FILE = "tinystories_train.txt"
# The project's data folder (TinyStories text): ../shared/data beside a checkout, or $QUANT4_DATA.
DATA_DIR = Path(os.environ.get("QUANT4_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def read_stories(path) -> list[str]:
    """Stories of a text file: separated by `<|endoftext|>` lines if it has them, else by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text not found: {path}")
    text = path.read_text(encoding="utf-8", errors="ignore")
    parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.split("\n\n")
    return [p.strip() for p in parts if p.strip()]


def calibration_windows(tok, stories: list[str], n_sequences: int = 256, seq_len: int = 256,
                        seed: int = 0) -> torch.Tensor:
    """n_sequences windows of seq_len tokens [n, seq_len] int64: the stories encoded with a BOS each,
    concatenated, and cut at random (seeded) offsets."""
    if n_sequences < 1 or seq_len < 2:
        raise ValueError(f"need n_sequences >= 1 and seq_len >= 2, got {n_sequences} and {seq_len}")
    ids: list[int] = []
    for s in stories:
        ids += tok.encode(s, bos=True)
    if len(ids) < seq_len + 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}")
    data = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_sequences,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()])
