"""SentencePiece tokenizer wrapper (tok512.model, the Llama 2 tokenizer, the embedded model's)."""
from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError with little context
            raise ValueError(f"{path}: not a SentencePiece model ({exc})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()

    @classmethod
    def from_serialized(cls, data: bytes, name: str = "embedded tokenizer") -> "Tokenizer":
        """A tokenizer from the bytes of a SentencePiece model (e.g. one stored in a GGUF file)."""
        import sentencepiece as spm

        tok = cls.__new__(cls)
        tok.path = Path(name)
        tok.sp = spm.SentencePieceProcessor()
        try:
            tok.sp.LoadFromSerializedProto(data)
        except Exception as exc:
            raise ValueError(f"{name}: not a SentencePiece model ({exc})") from None
        tok.bos_id, tok.eos_id = tok.sp.bos_id(), tok.sp.eos_id()
        tok.vocab_size = tok.sp.vocab_size()
        return tok

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id >= 0 else []) + ids

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def stream(self, context_ids=()) -> "StreamDecoder":
        """An incremental decoder for tokens generated after `context_ids` (e.g. the prompt)."""
        return StreamDecoder(self, context_ids)


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
