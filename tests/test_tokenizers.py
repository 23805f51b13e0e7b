"""Byte-level BPE tokenizers: a tokenizer.json trained here with the `tokenizers` library, the same vocabulary
written into a GGUF file with the `gguf` package's writer, and transformers' tokenizer must give the same ids
for a few hundred strings; streaming decode and chat templates against transformers."""
from __future__ import annotations

import json
import random

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from quant4.models.chat import render  # noqa: E402
from quant4.models.gguf import _field  # noqa: E402
from quant4.models.gguf_vocab import PRE_TOKENIZERS, read_vocab  # noqa: E402
from quant4.models.load import CheckpointError, load_model  # noqa: E402
from quant4.models.tokenizer import HFTokenizer, open_tokenizer  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "I'm sure they'll say we've done it; you'd think WE'LL never DON'T stop. It's 3.14159 or 12345 items.",
    "Tom and his dog ran to the big tree. \"Look!\" said Tom. The sun was warm and the sky was blue.",
    "Prix: 42 €, café crème, naïve façade — déjà vu. Straße, smørrebrød, Ærø.",
    "日本語のテキストと中文字符，还有한국어 문장. Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "Emoji: 👍🏽 🧑‍💻 🇫🇷 ❤️ 🎉🎉 and symbols ∑ ∫ √ ≤ ≥ ≠ ∞ © ® ™",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs   and    spaces\r\nwindows line",
] * 20
PIECES = ["Hello", " world", "  ", "\n", "\n\n", "\t", "123", "4567", "3.5", "I'm", " don't", "WE'LL", "é", "日本",
          "👍🏽", "🧑‍💻", " ", "   x", "<|eot_id|>", "<|end_of_text|>", "!", "?!", "...", "a" * 20, "ß", "ﬁ", "\u200b",
          "Lily", " park.", "\r\n", "--", "~~~", "0", "007", "¿Qué?", "Ελλάδα", "mañana", "12,345.67"]


def strings(n=300, seed=0):
    rng = random.Random(seed)
    out = [p for p in PIECES] + [c[:rng.randrange(1, len(c))] for c in CORPUS[:7]]
    while len(out) < n:
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 8))))
    return out


def train(pre: str, vocab_size=700):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    kind, regex, ignore_merges, add_bos = PRE_TOKENIZERS[pre]
    tk = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "split")
    if kind == "split":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                    byte_level])
    elif kind == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", 0)])
    return tk


def write_hf_dir(d, tk, template=None):
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|end_of_text|>"}
    if template:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))


def write_gguf_vocab(path, tk, pre, add_bos, template=None):
    spec = json.loads(tk.to_str())
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(2)
    w.add_add_bos_token(add_bos)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_source(path):
    reader = gguf.GGUFReader(str(path))
    return read_vocab(lambda key: _field(reader, key), path)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm", "gpt2"])
def test_bpe_ids_agree_three_ways(tmp_path, pre):
    tk = train(pre)
    add_bos = PRE_TOKENIZERS[pre][3]
    write_hf_dir(tmp_path / "hf", tk)
    write_gguf_vocab(tmp_path / "v.gguf", tk, pre, add_bos)
    ours = open_tokenizer(tmp_path / "hf").build()
    from_gguf = gguf_source(tmp_path / "v.gguf").build()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert ours.add_bos == from_gguf.add_bos == add_bos
    texts = strings()
    mismatches = []
    for text in texts + [f"{SPECIALS[2]}{t}{SPECIALS[1]}" for t in texts[:40]]:
        want = ref.encode(text, add_special_tokens=True)
        a, b = ours.encode(text), from_gguf.encode(text)
        if not want == a == b:
            mismatches.append((text, want, a, b))
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert not mismatches, f"{len(mismatches)} of {len(texts) + 40}: {mismatches[:3]}"
    # special tokens are whole, never split
    assert ours.encode("<|eot_id|>", bos=False) == [2] and from_gguf.encode("x<|im_end|>", bos=False)[-1] == 4
    assert set(ours.stop_ids) >= {1, 2} and set(from_gguf.stop_ids) >= {1, 2}


def test_unknown_pre_tokenizer_is_named(tmp_path):
    write_gguf_vocab(tmp_path / "v.gguf", train("gpt2", 300), "tekken-9000", False)
    with pytest.raises(ValueError, match="tekken-9000"):
        gguf_source(tmp_path / "v.gguf")


def test_streaming_decode_equals_whole_decode():
    tok = HFTokenizer(train("llama-bpe").to_str())
    for text in strings(120, seed=1):
        ids = tok.encode(text, bos=False)
        stream = tok.stream(tok.encode("Prompt:", bos=False))
        got = "".join(stream.push(i) for i in ids) + stream.flush()
        assert got == tok.decode(ids), text


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template, end", [(LLAMA3_TEMPLATE, 2), (CHATML_TEMPLATE, 4)])
def test_chat_template_renders_like_transformers(tmp_path, template, end):
    write_hf_dir(tmp_path, train("llama-bpe"), template)
    tok = open_tokenizer(tmp_path).build()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋 there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a story."}]
    for msgs in (messages, messages[1:2]):
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert render(tok, msgs) == want
        assert tok.encode(render(tok, msgs), bos=False) == ref.encode(want, add_special_tokens=False)
    assert tok.end_of_turn_id() == end and end in tok.stop_ids


def test_gguf_model_with_bpe_vocab_loads_its_tokenizer(tmp_path):
    """A whole model file: the vocabulary inside a GGUF written by quant4 from a tokenizer.json directory."""
    from quant4.models.gguf import write_gguf
    from quant4.models.llama import ModelArgs, Transformer

    tk = train("llama-bpe")
    write_hf_dir(tmp_path / "hf", tk, LLAMA3_TEMPLATE)
    source = open_tokenizer(tmp_path / "hf")
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tk.get_vocab_size()))
    model.init_weights()
    write_gguf(model, model.args, tmp_path / "m.gguf", tokenizer=source)
    loaded = load_model(tmp_path / "m.gguf")
    tok = loaded.tokenizer.build()
    ref = source.build()
    for text in strings(60):
        assert tok.encode(text) == ref.encode(text)
    assert tok.chat_template == LLAMA3_TEMPLATE and tok.stop_ids == ref.stop_ids
    # llama.cpp's view (tokenizer.ggml.*, without quant4's own keys) gives the same ids too
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    ggml_only = read_vocab(lambda key: _field(reader, key), tmp_path / "m.gguf").build()
    assert ggml_only.settings["gguf_pre"] == "llama-bpe"
    for text in strings(60):
        assert ggml_only.encode(text) == ref.encode(text)


def test_damaged_tokenizer_fields_are_clean_errors(tmp_path):
    tk = train("gpt2", 300)
    write_gguf_vocab(tmp_path / "v.gguf", tk, "gpt2", False)
    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    real = lambda key: _field(reader, key)       # noqa: E731
    for key, value in (("tokenizer.ggml.merges", ["nospace"]), ("tokenizer.ggml.bos_token_id", 10 ** 6),
                       ("tokenizer.ggml.token_type", [1]), ("tokenizer.ggml.model", "rwkv")):
        with pytest.raises(ValueError):
            read_vocab(lambda k: value if k == key else real(k), "v.gguf")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "v.gguf")       # a vocabulary alone is no model
