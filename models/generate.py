"""Sampling loop with a KV cache: prefill the prompt in one forward, then one token per step."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from quant4 import ops

from .fast_decode import decode_step


@dataclass
class GenStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else float("nan")


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
           generator: Optional[torch.Generator]) -> int:
    """logits [V] -> token id. temperature 0 is greedy; top_k / top_p restrict the candidates."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p   # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p * keep)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model, prompt_ids: list, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed: Optional[int] = None,
             stop_ids=(), on_token: Optional[Callable[[int], None]] = None, lean: bool = True):
    """-> (new token ids, GenStats). Stops at max_new_tokens, a stop id, or the model's max_seq_len.
    The prompt and the decode steps take the lean path (models/fast_decode.py) when the model allows it;
    lean=False: forward."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    limit = model.args.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens; the model's max_seq_len is {limit}")
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    ops.warn_if_oversubscribed()
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)    # this call's own: threads may share a model
    step = decode_step(model, cache, lean=lean)
    t0 = time.perf_counter()
    logits = step.prefill(prompt_ids, 0)
    t1 = time.perf_counter()
    out = []
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, gen)
        if tok in stop_ids:
            break
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == max_new_tokens:
            break
        logits = step(tok, pos)
        pos += 1
    t2 = time.perf_counter()
    return out, GenStats(len(prompt_ids), len(out), t1 - t0, t2 - t1)
