"""Decode steps for generation: one token through quant4's lean path (quant4.decode.DecodeStack, one kernel
call per token) when the model is one it computes exactly as the model's forward does, else through the
model's forward.

The lean path takes a Transformer of this package whose layers are the plain classes of models/llama.py, in
fp32, with every projection an Int4Linear of one activation mode ("float" or "int8") and thread setting, in
eval mode, with no hooks on any module. Anything else (float projections, bf16 models, subclasses, hooks,
training) decodes through forward, with the same results.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module

from .llama import Attention, FeedForward, KVCache, RMSNorm, Transformer, TransformerBlock


PREFILL_CHUNK = 512     # prompt tokens per lean prefill call: its buffers are about 6 x chunk x hidden floats


def lean_stack(model, cache: Optional[list] = None):
    """The quant4.decode.DecodeStack running `model`'s layers on `cache` (from model.new_cache(1, ...); None:
    the attached one, setup_cache), or None when the model is not one it runs exactly (see above). Rebuild it
    whenever the model's weights or the cache change."""
    from quant4.decode import DecodeLayer, DecodeStack
    from quant4.embedding import Int4Embedding, Int8Embedding
    from quant4.nn import Int4Linear

    if type(model) is not Transformer or model.training:
        return None
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None
    a = model.args
    caches = cache if cache is not None else [layer.attention.cache for layer in model.layers]
    if len(caches) != len(model.layers) or type(model.norm) is not RMSNorm:
        return None
    if model.compute_dtype != torch.float32 or model.norm.eps != a.norm_eps:
        return None
    if type(model.tok_embeddings) not in (nn.Embedding, Int4Embedding, Int8Embedding):
        return None          # a table it cannot read a row of: forward
    layers, settings = [], set()
    for layer, c in zip(model.layers, caches):
        att, ff = layer.attention, layer.feed_forward
        if (type(layer) is not TransformerBlock or type(att) is not Attention or type(ff) is not FeedForward
                or type(layer.attention_norm) is not RMSNorm or type(layer.ffn_norm) is not RMSNorm
                or type(c) is not KVCache or c.k.shape[0] != 1
                or layer.attention_norm.eps != a.norm_eps or layer.ffn_norm.eps != a.norm_eps):
            return None
        projs = (att.wq, att.wk, att.wv, att.wo, ff.w1, ff.w3, ff.w2)
        if any(type(p) is not Int4Linear for p in projs):
            return None
        settings.update((p.activation, p.num_threads) for p in projs)
        if att.wo.bias is not None or any(p.bias is not None for p in (ff.w1, ff.w2, ff.w3)):
            return None          # the model has biases on q/k/v only (Qwen2); anything else runs forward
        layers.append(DecodeLayer(layer.attention_norm.weight, *(p._prepared() for p in projs[:4]),
                                  layer.ffn_norm.weight, *(p._prepared() for p in projs[4:]), c.k[0], c.v[0]))
    if len(settings) != 1:
        return None
    activation, num_threads = settings.pop()
    if activation not in ("float", "int8"):
        return None
    try:
        return DecodeStack(layers, model.norm.weight, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                           head_dim=a.head_dim, eps=float(a.norm_eps), activation=activation,
                           num_threads=num_threads)
    except (TypeError, ValueError):
        return None      # e.g. dtypes or group sizes it does not take: forward runs the model


def int8_head(model, num_threads: Optional[int] = None):
    """The 8-bit copy of model's float output head (quant4.decode.Int8Head) that int8-activation decode uses on
    CPUs with AVX512-VNNI or AVX2, made once and kept on the head module while its weight stays the same; None
    where it does not apply (no kernel, a head that is not a plain fp32 nn.Linear without bias, or
    dim % 32 != 0)."""
    from quant4 import ops
    from quant4.decode import Int8Head

    out = model.output
    if (not ops.int8_head_available() or type(out) is not nn.Linear or out.bias is not None
            or out.weight.dtype != torch.float32 or out.weight.dim() != 2 or out.weight.shape[1] % 32
            or out.weight.is_meta):
        return None
    cached = out.__dict__.get("_quant4_int8_head")
    if cached is None or not cached.matches(out.weight):
        cached = Int8Head(out.weight, num_threads)
        out.__dict__["_quant4_int8_head"] = cached
    cached.num_threads = num_threads
    return cached


def decode_step(model, cache: Optional[list] = None, *, lean: bool = True) -> Callable[[int, int], torch.Tensor]:
    """step(token, pos) -> the logits (fp32 [vocab]) of `token` at position `pos`, the cache holding positions
    < pos: what model(torch.tensor([[token]]), pos, cache)[0, -1] gives, through the lean path when the model
    allows it (lean=False: always forward). step.prefill(ids, pos) -> the logits of the last of the tokens
    `ids` (a list) at positions pos.., the cache holding positions < pos: what model(torch.tensor([ids]), pos,
    cache, last_only=True)[0, -1] gives; on the lean path one call per PREFILL_CHUNK tokens of the prompt (up
    to ops.SMALL_M tokens: one step each). Built for one generation: the lean path reads the weights and the
    cache as they are now."""
    stack = lean_stack(model, cache) if lean else None
    if stack is None:
        step = lambda token, pos: model(torch.tensor([[token]]), pos, cache)[0, -1]        # noqa: E731
        step.prefill = lambda ids, pos: model(torch.tensor([ids]), pos, cache, last_only=True)[0, -1]
        return step
    from quant4 import ops
    from quant4.int8_linear import Int8Linear

    from . import rope

    emb, out, limit = model.tok_embeddings, model.output, model.args.max_seq_len
    table = emb.weight if type(emb) is nn.Embedding else None     # else a quantized table: row_into
    x = stack.input
    # RoPE tables whose rows do not depend on the sequence's length (all but dynamic scaling): bound once
    bound = not rope.depends_on_length(model.args.rope_scaling)
    if bound:
        n = min(stack.max_positions, limit)
        cos, sin = model.rope(n)
        stack.bind_rope(cos[:n].float().contiguous(), sin[:n].float().contiguous())
    head = None
    if type(out) is Int8Linear and stack.activation == "int8" and ops.int8_head_available():
        logits = torch.empty(out.out_features)
        head = lambda h: out.matvec(h, logits)       # noqa: E731  (an 8-bit head of the file's: no copy)
    elif stack.activation == "int8":
        head = int8_head(model, stack.num_threads)

    def check_end(end: int) -> None:
        if end > limit:
            raise ValueError(f"sequence end {end} exceeds max_seq_len={limit}")

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        if head is not None:
            return head(h).clone()
        return out(h.view(1, 1, -1))[0, 0].float()

    def embed(token: int) -> torch.Tensor:
        if table is not None:
            x.copy_(table[token])
        else:
            emb.row_into(token, x)
        return x

    def hidden(token: int, pos: int) -> torch.Tensor:
        # the final normed hidden state of one token through the stack (what the head multiplies)
        if bound:
            embed(token)
            return stack.step_at(pos)
        cos, sin = model.rope(pos + 1)
        return stack.step(embed(token), pos, cos[pos].float(), sin[pos].float())

    def step(token: int, pos: int) -> torch.Tensor:
        check_end(pos + 1)
        return logits_of(hidden(token, pos))

    def prefill(ids, pos: int) -> torch.Tensor:
        ids = list(ids)
        if not ids:
            raise ValueError("prefill needs at least one token")
        check_end(pos + len(ids))
        cos, sin = model.rope(pos + len(ids))
        for i in range(0, len(ids), PREFILL_CHUNK):     # a long prompt in chunks: bounded buffers
            part = ids[i:i + PREFILL_CHUNK]
            if len(part) <= ops.SMALL_M:                # the decode kernels, as forward runs so few rows
                for j, token in enumerate(part):
                    h = hidden(token, pos + i + j)
                continue
            a, b = pos + i, pos + i + len(part)
            h = stack.prefill(emb(torch.tensor(part)).float().contiguous(), a,
                              cos[a:b].float().contiguous(), sin[a:b].float().contiguous())
        return logits_of(h)

    step.lean = True
    step.prefill = prefill
    return step
