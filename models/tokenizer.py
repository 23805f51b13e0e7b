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
