"""Tokenizers: one interface, two backends.

  SentencePieceTokenizer   a SentencePiece .model (Llama 2, TinyLlama, the TinyStories models)
  HFTokenizer              a Hugging Face `tokenizer.json` through the `tokenizers` library (Llama 3.x, SmolLM2,
                           Qwen, Mistral's newer ones), or a byte-level BPE vocabulary rebuilt from a GGUF file
                           (models/gguf_vocab.py)

Both give encode / decode, an incremental decoder for streaming (`stream`), bos/eos ids, every id that ends a
generation (`stop_ids`: the eos ids of generation_config.json and the file, and the chat template's end of turn),
the vocabulary size and the chat template if the checkpoint has one.

A `TokenizerSource` is the portable form a checkpoint carries: the backend's bytes plus the settings that are
not inside them (bos/eos ids, add_bos, chat template). quant4's own files store it in their header so that a
quantized file stands alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SETTINGS = ("bos_id", "eos_ids", "add_bos", "chat_template", "gguf_pre")


@dataclass
class TokenizerSource:
    kind: str                  # "sentencepiece" (data: the .model bytes) or "hf" (data: tokenizer.json, UTF-8)
    data: bytes
    origin: str                # where it came from, for messages
    settings: dict = field(default_factory=dict)   # any of SETTINGS (gguf_pre: tokenizer.ggml.pre it came with)

    def build(self) -> "Tokenizer":
        if self.kind == "sentencepiece":
            return SentencePieceTokenizer(self.data, self.origin, self.settings)
        if self.kind == "hf":
            return HFTokenizer(self.data, self.origin, self.settings)
        raise ValueError(f"{self.origin}: unknown tokenizer kind {self.kind!r}")


def check_settings(settings, origin) -> dict:
    """Settings from a file: known keys with the right types, else ValueError naming the key."""
    if not isinstance(settings, dict):
        raise ValueError(f"{origin}: tokenizer settings must be an object")
    out = {}
    for key, value in settings.items():
        if key not in SETTINGS:
            continue
        ok = {"bos_id": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
              "eos_ids": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                               and i >= 0 for i in v),
              "add_bos": lambda v: isinstance(v, bool),
              "chat_template": lambda v: v is None or isinstance(v, str),
              "gguf_pre": lambda v: isinstance(v, str)}[key](value)
        if not ok:
            raise ValueError(f"{origin}: tokenizer setting {key}={value!r} has the wrong type")
        out[key] = value
    return out


class Tokenizer:
    """The interface (see module doc). Subclasses set bos_id, eos_ids, vocab_size, add_bos, chat_template."""

    bos_id: Optional[int] = None
    eos_ids: tuple = ()
    add_bos: bool = True
    chat_template: Optional[str] = None
    vocab_size: int = 0
    origin: str = ""

    @property
    def eos_id(self) -> Optional[int]:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def stop_ids(self) -> frozenset:
        """Ids that end a generation: the eos ids (from every place the checkpoint names them) and the chat
        template's end-of-turn token."""
        ids = set(self.eos_ids)
        end = self.end_of_turn_id()
        if end is not None:
            ids.add(end)
        return frozenset(ids)

    kind = ""
    data = b""
    settings: dict = {}

    def source(self) -> TokenizerSource:
        """The portable form, with the settings as this tokenizer applies them."""
        settings = dict(self.settings, bos_id=self.bos_id, eos_ids=list(self.eos_ids), add_bos=self.add_bos,
                        chat_template=self.chat_template)
        return TokenizerSource(self.kind, self.data, self.origin, settings)

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        """Token ids of `text`; bos: prepend the bos token (default: as the tokenizer's settings say)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, piece: str) -> Optional[int]:
        raise NotImplementedError

    def token_text(self, i: int) -> Optional[str]:
        raise NotImplementedError

    def stream(self, context_ids=()) -> "StreamDecoder":
        """An incremental decoder for tokens generated after `context_ids` (e.g. the prompt)."""
        return StreamDecoder(self, context_ids)

    def end_of_turn_id(self) -> Optional[int]:
        """The token the chat template puts after an assistant message (e.g. <|eot_id|>, <|im_end|>), found
        by rendering one message with a marker and reading the special token that follows it."""
        if not self.chat_template:
            return None
        from .chat import render

        marker = "\u2063q4marker\u2063"
        try:
            text = render(self, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                          add_generation_prompt=False)
        except ValueError:
            return None
        after = text.split(marker, 1)[-1].strip()
        if not after:
            return None
        ids = self.encode(after, bos=False)
        return ids[0] if ids and self.is_special(ids[0]) else None

    def is_special(self, i: int) -> bool:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model, origin: Optional[str] = None, settings: Optional[dict] = None):
        """model: a path to a .model file, or its bytes (origin: a name for messages)."""
        import sentencepiece as spm

        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            model, origin = path.read_bytes(), origin or str(path)
        self.origin = origin or "tokenizer"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(bytes(model))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with little context
            raise ValueError(f"{self.origin}: not a SentencePiece model ({exc})") from None
        self.data = bytes(model)
        self.settings = settings = dict(settings or {})
        self.vocab_size = self.sp.vocab_size()
        bos = settings.get("bos_id", self.sp.bos_id())
        self.bos_id = bos if bos is not None and bos >= 0 else None
        eos = settings.get("eos_ids") or ([self.sp.eos_id()] if self.sp.eos_id() >= 0 else [])
        self.eos_ids = tuple(eos)
        self.add_bos = settings.get("add_bos", True)
        self.chat_template = settings.get("chat_template")

    @classmethod
    def from_serialized(cls, data: bytes, name: str = "embedded tokenizer") -> "SentencePieceTokenizer":
        return cls(data, name)

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        bos = self.add_bos if bos is None else bos
        ids = self._encode_with_specials(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def _encode_with_specials(self, text: str) -> list:
        """SentencePiece does not match control tokens in text (a chat template writes "</s>" or "[INST]");
        split them out first so a rendered chat prompt gets their ids, as Hugging Face's tokenizer does."""
        specials = self._special_pieces()
        if not specials or not any(p in text for p in specials):
            return self.sp.encode(text)
        import re

        out = []
        for part in re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text):
            if part in specials:
                out.append(specials[part])
            elif part:
                out += self.sp.encode(part)
        return out

    def _special_pieces(self) -> dict:
        if not hasattr(self, "_specials"):
            self._specials = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                              if self.sp.is_control(i) and self.sp.id_to_piece(i)}
        return self._specials

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def token_text(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.vocab_size else None

    def is_special(self, i: int) -> bool:
        return self.sp.is_control(int(i))


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, data, origin: str = "tokenizer.json", settings: Optional[dict] = None):
        """data: the text of a tokenizer.json (str or UTF-8 bytes)."""
        from tokenizers import Tokenizer as _Tok

        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        self.origin = origin
        try:
            self.tk = _Tok.from_str(text)
        except Exception as exc:     # the library raises Exception with a serde message
            raise ValueError(f"{origin}: not a tokenizers tokenizer.json ({exc})") from None
        self.data = text.encode("utf-8")
        self.settings = settings = dict(settings or {})
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = settings.get("bos_id")
        self.eos_ids = tuple(settings.get("eos_ids") or ())
        # whether encode adds bos is the tokenizer's own post-processor's business (Llama 3 adds
        # <|begin_of_text|>, SmolLM2 and Qwen add nothing); add_bos records what it does
        self.add_bos = settings.get("add_bos", self._adds_bos())
        self.chat_template = settings.get("chat_template")
        self._special = {t.content for t in self.tk.get_added_tokens_decoder().values() if t.special}

    def _adds_bos(self) -> bool:
        if self.bos_id is None:
            return False
        return self.tk.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        bos = self.add_bos if bos is None else bos
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, piece: str) -> Optional[int]:
        return self.tk.token_to_id(piece)

    def token_text(self, i: int) -> Optional[str]:
        return self.tk.id_to_token(int(i))

    def is_special(self, i: int) -> bool:
        return self.tk.id_to_token(int(i)) in self._special


def hf_settings(tokenizer_config: dict, token_to_id, generation_config: Optional[dict] = None,
                config: Optional[dict] = None) -> dict:
    """Settings of a Hugging Face directory's tokenizer: bos/eos from tokenizer_config.json (token strings or
    {"content": ...} objects), eos ids also from generation_config.json and config.json (an id or a list), the
    chat template (a string, or a list of named templates: "default")."""
    def token(value):
        if isinstance(value, dict):
            value = value.get("content")
        return token_to_id(value) if isinstance(value, str) else None

    bos = token(tokenizer_config.get("bos_token"))
    eos = [i for i in (token(tokenizer_config.get("eos_token")),) if i is not None]
    for cfg in (generation_config or {}, config or {}):
        v = cfg.get("eos_token_id")
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int) and not isinstance(i, bool) and i >= 0 and i not in eos:
                eos.append(i)
    if bos is None:
        v = (generation_config or {}).get("bos_token_id", (config or {}).get("bos_token_id"))
        bos = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    settings = {"bos_id": bos, "eos_ids": eos}
    if isinstance(tokenizer_config.get("add_bos_token"), bool):
        settings["add_bos"] = tokenizer_config["add_bos_token"]
    if isinstance(template, str):
        settings["chat_template"] = template
    return settings


def open_tokenizer(path, settings: Optional[dict] = None) -> TokenizerSource:
    """A tokenizer file -> TokenizerSource: a SentencePiece .model, a tokenizer.json, or a directory holding
    either (tokenizer.json preferred, with tokenizer_config.json / generation_config.json beside it)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return open_tokenizer(path / name, settings)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    kind = "hf" if path.suffix == ".json" else "sentencepiece"
    source = TokenizerSource(kind, path.read_bytes(), str(path), settings or {})
    if settings is None and (path.parent / "tokenizer_config.json").is_file():
        # a Hugging Face directory: bos/eos, the chat template and generation's eos ids from its configs
        cfg, gen, model_cfg = (_read_json(path.parent / n) for n in ("tokenizer_config.json",
                                                                        "generation_config.json", "config.json"))
        source.settings = hf_settings(cfg, source.build().token_id, gen, model_cfg)
    return source


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object")
    return obj


class StreamDecoder:
    """Incremental detokenization for streaming output: push(id) returns the text that token adds (empty while
    the bytes of a multi-byte character are incomplete), flush() whatever is still held back.

    It decodes a short window of recent ids and emits what decoding one more id appends, so the cost per token
    is constant and the text is exactly what decoding the whole sequence gives (leading-space and byte-fallback
    rules included), never the prompt re-decoded and cut at the length the user typed.
    """

    WINDOW = 4        # ids of context kept: enough for SentencePiece's leading-space rule and a 4-byte character
    MAX_HELD = 4      # a UTF-8 character has at most 4 bytes: emit what is held after that many ids

    def __init__(self, tok, context_ids=()):
        self.tok = tok
        self.ids = [int(i) for i in context_ids][-self.WINDOW:]
        self.shown = len(tok.decode(self.ids))
        self.held = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and self.held < self.MAX_HELD:
            self.held += 1              # an incomplete character so far: wait for its remaining bytes
            return ""
        new = text[self.shown:]
        self.ids = self.ids[-self.WINDOW:]
        self.shown = len(self.tok.decode(self.ids))
        self.held = 0
        return new

    def flush(self) -> str:
        new = self.tok.decode(self.ids)[self.shown:]
        self.shown += len(new)
        self.held = 0
        return new
