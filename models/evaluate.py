"""Perplexity on text, with a fixed, documented protocol.

Protocol (the one quant4 reports everywhere): the text is split at blank lines; every non-empty block is
encoded with a BOS in front and the blocks are concatenated; the first `max_tokens` tokens are cut into
non-overlapping windows of `window` tokens; each window is one forward pass from an empty cache, and every
token of a window except its first is scored (its first has no context inside the window).
perplexity = exp(total negative log-likelihood / number of scored tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
def window_logprobs(model, ids: torch.Tensor, window: int = 512, *, decode: bool = False):
    """Yield (logits [T-1, V] fp32, targets [T-1]) for each window. decode=True feeds one token at a time
    through a KV cache as generation does (models.fast_decode.decode_step: the lean path where the model allows
    it, with its 8-bit head under int8 activations, else forward), e.g. to measure what a decode-only option
    such as int8 activations costs; the logits are those of the same protocol."""
    window = min(window, model.args.max_seq_len)
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window]
        if len(chunk) < 2:
            break
        if decode:
            from .fast_decode import decode_step

            step = decode_step(model, model.new_cache(1, len(chunk)))
            rows = [step(int(chunk[i]), i).float() for i in range(len(chunk) - 1)]
            yield torch.stack(rows), chunk[1:]
        else:
            yield model(chunk[None])[0, :-1].float(), chunk[1:]


@dataclass
class Score:
    perplexity: float
    kl: float                      # mean KL(reference || model) per scored token (0 without a reference)
    top1: float                    # share of tokens whose argmax agrees with the reference's (1 without one)
    logprobs: list                 # per window [T-1, V], to serve as the reference of another score()


def score(model, ids: torch.Tensor, window: int = 512, reference: Optional[list] = None, *,
          decode: bool = False) -> Score:
    """Perplexity of `model` on ids under the protocol above and, against `reference` (the logprobs of another
    model's score on the same ids), the mean KL and top-1 agreement."""
    nll, kl, agree, count, logps = 0.0, 0.0, 0, 0, []
    for w, (logits, targets) in enumerate(window_logprobs(model, ids, window, decode=decode)):
        lp = torch.log_softmax(logits, -1)
        logps.append(lp)
        nll -= lp.gather(1, targets[:, None]).sum().item()
        if reference is not None:
            kl += F.kl_div(lp, reference[w], log_target=True, reduction="sum").item()
            agree += (lp.argmax(-1) == reference[w].argmax(-1)).sum().item()
        count += len(targets)
    if reference is None:
        kl, agree = 0.0, count
    return Score(math.exp(nll / count), kl / count, agree / count, logps)


def perplexity(model, ids: torch.Tensor, window: int = 512) -> float:
    return score(model, ids, window).perplexity


def perplexity_decode(model, ids: torch.Tensor, window: int = 512) -> float:
    """perplexity() through the decode path (one token per forward)."""
    return score(model, ids, window, decode=True).perplexity
