"""Chat templates: the checkpoint's Jinja template rendered the way the Hugging Face ecosystem renders it
(a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson`
filter, `raise_exception` and `strftime_now`), so a prompt is byte for byte what `apply_chat_template` gives.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None


def check_messages(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    return messages


def render(tok, messages, add_generation_prompt: bool = True, **extra) -> str:
    """The prompt text for `messages` by `tok`'s chat template (ValueError if it has none or the template
    refuses the messages, e.g. roles out of order)."""
    from jinja2 import TemplateError

    if not tok.chat_template:
        raise ValueError(f"{tok.origin}: the tokenizer has no chat template")
    variables = {"messages": check_messages(messages), "add_generation_prompt": add_generation_prompt,
                 "bos_token": _token_string(tok, tok.bos_id), "eos_token": _token_string(tok, tok.eos_id)}
    variables.update(extra)
    try:
        return _compile(tok.chat_template).render(**variables)
    except TemplateError as exc:
        raise ValueError(f"the chat template refused these messages: {exc}") from None


def _token_string(tok, i):
    """A special token's text as it appears in a prompt ("<s>", "<|begin_of_text|>"), "" if there is none."""
    return "" if i is None else (tok.token_text(i) or "")


class ChatSession:
    """A multi-turn conversation with one KV cache: each turn renders the whole conversation with the chat
    template, keeps the cached positions the new prompt shares with what the cache holds, and prefills only
    the rest (the new user message), so the history is never re-run."""

    def __init__(self, model, tok, context: int, *, temperature: float = 0.0, top_k=None, top_p=None,
                 seed=None):
        import torch

        self.model, self.tok = model, tok
        self.context = min(context, model.args.max_seq_len)
        self.cache = model.new_cache(1, self.context)
        self.cached: list = []           # token ids whose keys/values the cache holds, positions 0..n-1
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.prefilled = 0               # tokens run through the model in prefill, over the session

    def prompt_ids(self, messages) -> list:
        return self.tok.encode(render(self.tok, messages, add_generation_prompt=True), bos=False)

    def reply(self, messages, max_new_tokens: int, on_token=None) -> list:
        """Generate the assistant's next message -> its token ids (without the end-of-turn token). Ctrl-C
        (KeyboardInterrupt) ends the reply early and returns what was generated so far."""
        import torch

        from quant4 import ops

        from .fast_decode import decode_step
        from .generate import sample

        ops.warn_if_oversubscribed()
        ids = self.prompt_ids(messages)
        if len(ids) >= self.context:
            raise ValueError(f"the conversation is {len(ids)} tokens; the context is {self.context} tokens "
                             f"(start a new conversation)")
        keep = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)           # at least one token to run, for the next logits
        stop = self.tok.stop_ids
        out = []
        with torch.inference_mode():
            step = decode_step(self.model, self.cache)
            logits = step.prefill(ids[keep:], keep)
            self.prefilled += len(ids) - keep
            self.cached = list(ids)
            try:
                while len(out) < max_new_tokens and len(self.cached) < self.context:
                    t = sample(logits, **self.sampling, generator=self.generator)
                    if t in stop:
                        break
                    out.append(t)
                    if on_token is not None:
                        on_token(t)
                    logits = step(t, len(self.cached))
                    self.cached.append(t)
            except KeyboardInterrupt:
                pass
        return out
