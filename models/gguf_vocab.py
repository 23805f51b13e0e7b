"""GGUF vocabularies (tokenizer.ggml.*) to and from quant4's tokenizers.

Reading: tokenizer.ggml.model "llama" is a SentencePiece vocabulary (rebuilt as a SentencePiece model proto,
which needs the protobuf package); "gpt2" is byte-level BPE (tokens + merges), rebuilt as a `tokenizers` BPE
model whose pre-tokenizer is the one tokenizer.ggml.pre names. Control and user-defined tokens (token_type 3
and 4) become added tokens, never split. bos/eos/end-of-turn ids, add_bos_token and the chat template are
carried as settings.

Writing: a SentencePiece tokenizer as "llama" (tokens, scores, types), a tokenizers BPE model as "gpt2"
(tokens, merges, types, and `pre` if the tokenizer came from a GGUF file that named it).
"""
from __future__ import annotations

from typing import Callable, Optional

from .tokenizer import TokenizerSource

# pre-tokenizer regular expressions (as the models' own tokenizer.json files give them), by the names llama.cpp
# writes to tokenizer.ggml.pre
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (pre-tokenizer kind, regex or None, ignore_merges, add_bos default)
PRE_TOKENIZERS = {
    "llama-bpe": ("split", _LLAMA3, True, True), "llama3": ("split", _LLAMA3, True, True),
    "llama-v3": ("split", _LLAMA3, True, True),
    "qwen2": ("split", _QWEN2, False, False),
    "smollm": ("digits", None, False, False),
    "gpt2": ("bytelevel", None, False, False), "default": ("bytelevel", None, False, False),
}
CONTROL, USER_DEFINED = 3, 4


def read_vocab(field: Callable, path) -> Optional[TokenizerSource]:
    """The tokenizer a GGUF file carries -> TokenizerSource, or None if it has none. field(key) reads a key
    (None when absent). ValueError names the field that is malformed or unsupported."""
    model = field("tokenizer.ggml.model")
    tokens = field("tokenizer.ggml.tokens")
    if model is None or not tokens:
        return None
    types = field("tokenizer.ggml.token_type")
    if types is not None and len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    def token_id(key):
        v = field(f"tokenizer.ggml.{key}_token_id")
        if v is None:
            return None
        v = int(v)
        if not 0 <= v < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id = {v} is outside the {len(tokens)} tokens")
        return v

    eos = [i for i in (token_id("eos"), token_id("eot"), token_id("eom")) if i is not None]
    settings = {"bos_id": token_id("bos"), "eos_ids": list(dict.fromkeys(eos))}
    template = field("tokenizer.chat_template")
    if isinstance(template, str):
        settings["chat_template"] = template
    add_bos = field("tokenizer.ggml.add_bos_token")
    if model == "llama":
        if add_bos is not None:
            settings["add_bos"] = bool(add_bos)
        data = _sentencepiece_proto(field, tokens, field("tokenizer.ggml.scores"), types)
        return None if data is None else TokenizerSource("sentencepiece", data, f"{path} (tokenizer inside)", settings)
    if model == "gpt2":
        pre = field("tokenizer.ggml.pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))})")
        merges = field("tokenizer.ggml.merges")
        if not merges:
            raise ValueError("tokenizer.ggml.merges is missing for a gpt2 (BPE) vocabulary")
        settings["add_bos"] = bool(add_bos) if add_bos is not None else PRE_TOKENIZERS[pre][3]
        settings["gguf_pre"] = pre
        data = bpe_tokenizer_json(tokens, merges, types, pre)
        return TokenizerSource("hf", data, f"{path} (tokenizer inside)", settings)
    raise ValueError(f"tokenizer.ggml.model {model!r} is not supported (llama or gpt2)")


def bpe_tokenizer_json(tokens, merges, types, pre: str) -> bytes:
    """A tokenizer.json for a byte-level BPE vocabulary in GGUF form."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, regex, ignore_merges, _ = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
    tk = Tokenizer(bpe)
    if kind == "split":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    elif kind == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=int(t) == CONTROL, normalized=False)
             for i, t in enumerate(types or []) if int(t) in (CONTROL, USER_DEFINED)]
    if added:
        tk.add_tokens(added)
    return tk.to_str().encode("utf-8")


def _sentencepiece_proto(field, tokens, scores, types) -> Optional[bytes]:
    """A SentencePiece model rebuilt from GGUF's tokenizer.ggml.* (model "llama") fields."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:
        return None
    proto = spm_pb2.ModelProto()
    for i, piece in enumerate(tokens):
        p = proto.pieces.add()
        p.piece = piece
        p.score = float(scores[i]) if scores else 0.0
        p.type = int(types[i]) if types else 1       # gguf TokenType and SentencePiece Type share numbers
    proto.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = any(int(t) == 6 for t in (types or []))
    for key, attr in (("unk", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id")):
        v = field(f"tokenizer.ggml.{key}_token_id")
        setattr(proto.trainer_spec, attr, int(v) if v is not None else -1)
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    add_prefix = field("tokenizer.ggml.add_space_prefix")
    proto.normalizer_spec.add_dummy_prefix = True if add_prefix is None else bool(add_prefix)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def write_vocab(w, source: TokenizerSource) -> None:
    """Add `source` to a gguf.GGUFWriter as tokenizer.ggml.* keys (and the chat template)."""
    from .tokenizer import HFTokenizer, SentencePieceTokenizer

    tok = source.build()
    if isinstance(tok, SentencePieceTokenizer):
        sp = tok.sp
        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        w.add_token_types([_sp_type(sp, i) for i in range(sp.vocab_size())])
        if sp.unk_id() >= 0:
            w.add_unk_token_id(sp.unk_id())
    else:
        assert isinstance(tok, HFTokenizer)
        import json

        spec = json.loads(tok.data)
        model = spec.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{source.origin}: only BPE tokenizer.json vocabularies can be written to GGUF")
        n = tok.vocab_size
        tokens = [tok.token_text(i) or f"[PAD{i}]" for i in range(n)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        special = {t["id"]: t.get("special", False) for t in spec.get("added_tokens", [])}
        w.add_tokenizer_model("gpt2")
        pre = tok.settings.get("gguf_pre") or detect_pre(spec)
        if pre:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([CONTROL if special.get(i) else USER_DEFINED if i in special else 1 for i in range(n)])
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_ids:
        w.add_eos_token_id(tok.eos_ids[0])
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def detect_pre(spec: dict) -> Optional[str]:
    """The tokenizer.ggml.pre name of a tokenizer.json's pre-tokenizer, if it is one of PRE_TOKENIZERS."""
    pt = spec.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", [pt]) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == PRE_TOKENIZERS[name][1]:
                return name
    return None


def _sp_type(sp, i: int) -> int:
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return CONTROL
    if sp.is_byte(i):
        return 6
    if sp.is_unused(i):
        return 5
    return 1
