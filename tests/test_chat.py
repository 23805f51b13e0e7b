"""Chat: a multi-turn session reuses its KV cache (only the new message is run) and replies exactly as a fresh
session given the whole history would; scripts/chat.py end to end on a tiny Hugging Face directory."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from helpers import REPO  # noqa: E402
from test_tokenizers import LLAMA3_TEMPLATE, train, write_hf_dir  # noqa: E402

from quant4.models.chat import ChatSession  # noqa: E402
from quant4.models.hf import write_hf  # noqa: E402
from quant4.models.llama import ModelArgs, Transformer  # noqa: E402
from quant4.models.load import load_model, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    tk = train("llama-bpe")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tk.get_vocab_size(), max_seq_len=512,
                     tie_embeddings=False)
    model = Transformer(args)
    model.init_weights(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)               # sharper logits than the init's: replies that are not ties
    write_hf(d, args, {k: v for k, v in model.state_dict().items() if not k.startswith("rope")})
    write_hf_dir(d, tk, LLAMA3_TEMPLATE)
    return d


def test_session_reuses_cache_and_matches_a_fresh_session(chat_dir):
    loaded = load_model(chat_dir)
    tok = load_tokenizer(loaded)
    s = ChatSession(loaded.model, tok, 512)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = s.reply(msgs, 12)
    assert s.prefilled == len(s.prompt_ids(msgs))
    msgs += [{"role": "assistant", "content": tok.decode(first)}, {"role": "user", "content": "And then?"}]
    before = s.prefilled
    second = s.reply(msgs, 12)
    run = s.prefilled - before
    full = len(s.prompt_ids(msgs))
    assert run < full - len(s.prompt_ids(msgs[:2])) + 2        # the history was not run again
    fresh = ChatSession(loaded.model, tok, 512)
    assert fresh.reply(msgs, 12) == second
    assert fresh.prefilled == full


def test_end_of_turn_stops_the_reply(chat_dir):
    loaded = load_model(chat_dir)
    tok = load_tokenizer(loaded)
    eot = tok.end_of_turn_id()
    assert eot == tok.token_id("<|eot_id|>")
    with torch.no_grad():       # make the model always say <|eot_id|>: the reply is empty
        loaded.model.output.weight.zero_()
        loaded.model.output.weight[eot] = 1.0
        loaded.model.norm.weight.fill_(1.0)
    s = ChatSession(loaded.model, tok, 512)
    assert s.reply([{"role": "user", "content": "hi"}], 20) == []


def run(*argv, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), *argv], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_chat_script_one_shot_and_interactive(chat_dir):
    r = run("--checkpoint", str(chat_dir), "--system", "Be brief.", "--prompt", "Hello", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "chat template" in r.stderr and "prompt tokens run" in r.stderr
    r = run("--checkpoint", str(chat_dir), "--max-new-tokens", "4", stdin="Hello\nAgain\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("prompt tokens run") == 2


def test_chat_script_without_template_says_plain_completion():
    r = run("--prompt", "Once upon a time", "--max-new-tokens", "8", "--quantize")
    assert r.returncode == 0, r.stderr
    assert "no chat template: plain completion" in r.stderr
    assert r.stdout.startswith("Once upon a time")
