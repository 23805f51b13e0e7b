"""Perplexity on text, with a fixed, documented protocol.

Protocol (the one quant4 reports everywhere): the text is split at blank lines; every non-empty block is
encoded with a BOS in front and the blocks are concatenated; the first `max_tokens` tokens are cut into
non-overlapping windows of `window` tokens; each window is one forward pass from an empty cache, and every
token of a window except its first is scored (its first has no context inside the window).
perplexity = exp(total negative log-likelihood / number of scored tokens).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

HELDOUT_BYTES = 300_000


def heldout_text(shared_data_dir) -> str:
    """The evaluation hold-out: the first 300,000 bytes of tinystories_val_head.txt."""
    raw = (Path(shared_data_dir) / "tinystories_val_head.txt").read_bytes()[:HELDOUT_BYTES]
    return raw.decode("utf-8", errors="ignore")


def encode_blocks(tok, text: str, max_tokens: int) -> torch.Tensor:
    ids = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block:
            ids += tok.encode(block, bos=True)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


@torch.inference_mode()
def window_logprobs(model, ids: torch.Tensor, window: int = 512):
    """Yield (logits [T-1, V] fp32, targets [T-1]) for each window."""
    window = min(window, model.args.max_seq_len)
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        yield model(chunk[None])[0, :-1].float(), chunk[1:]


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    for logits, targets in window_logprobs(model, ids, window):
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)


@torch.inference_mode()
def perplexity_decode(model, ids: torch.Tensor, window: int = 512) -> float:
    """Same protocol as perplexity(), but one token per forward through the KV cache (the decode path:
    M = 1 matmuls), e.g. to measure what a decode-only option such as int8 activations costs."""
    window = min(window, model.args.max_seq_len)
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        model.setup_cache(1, len(chunk))
        try:
            for i in range(len(chunk) - 1):
                logits = model(chunk[None, i:i + 1], i)[0, -1].float()
                nll += F.cross_entropy(logits[None], chunk[i + 1:i + 2], reduction="sum").item()
                count += 1
        finally:
            model.clear_cache()
    return math.exp(nll / count)
