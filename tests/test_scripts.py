"""scripts/quantize.py and scripts/generate.py end to end, in-process."""
import sys

import pytest
import torch

from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import write_llama2c
from quant4.models.load import EMBEDDED_MODEL, load_model
from quant4 import Int4Linear, quantize_model_
from helpers import REPO, load_script

sys.path.insert(0, str(REPO / "scripts"))


def _script(name):
    return load_script(name)


def _checkpoint(tmp_path):
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=172,
                              max_seq_len=64))
    m.init_weights(3)
    path = tmp_path / "m.bin"
    write_llama2c(path, m.args, {k: v.detach() for k, v in m.state_dict().items()}, version=1)
    return path, m


def test_quantize_script(tmp_path, capsys):
    ckpt, m = _checkpoint(tmp_path)
    out = tmp_path / "q.safetensors"
    quantize = _script("quantize")
    quantize.main(["--checkpoint", str(ckpt), "--out", str(out), "--group-size", "32", "--include", "output"])
    text = capsys.readouterr().out
    assert "SQNR" in text and "size:" in text and "layers.1.feed_forward.w2" in text
    loaded = load_model(out)
    assert isinstance(loaded.model.output, Int4Linear) and len(loaded.quantized) == 15
    ref = quantize_model_(m.eval(), 32, filter_fn=lambda mod, n: isinstance(mod, torch.nn.Linear))
    tokens = torch.tensor([[1, 4, 9, 16, 25]])
    assert torch.equal(loaded.model(tokens), ref(tokens))
    before = out.read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        quantize.main(["--checkpoint", str(ckpt), "--out", str(out)])
    assert out.read_bytes() == before
    quantize.main(["--checkpoint", str(ckpt), "--out", str(out), "--force", "--exclude", "w2"])
    assert len(load_model(out).quantized) == 12
    assert not list(tmp_path.glob(".q.safetensors.*"))  # no temporary files left behind


def test_generate_script_on_embedded_model(capsys):
    if not EMBEDDED_MODEL.exists():
        pytest.fail(f"embedded model missing: {EMBEDDED_MODEL}")
    _script("generate").main(["--max-new-tokens", "8"])
    out = capsys.readouterr().out
    assert out.startswith("--- int4 g32 ---\nOnce upon a time")
    assert "decode 8 tokens at" in out and "tok/s" in out and "peak RSS" in out
    _script("generate").main(["--max-new-tokens", "8", "--compare", "--temperature", "0.8", "--top-k", "20",
                              "--seed", "1"])
    out = capsys.readouterr().out
    assert "--- float ---" in out and "--- int4 g32 ---" in out and "agree on the first" in out


def test_generate_script_quantized_file_bf16_and_int8(tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    _script("quantize").main(["--out", str(out)])
    for extra in (["--dtype", "bf16"], ["--activation", "int8"], ["--activation", "bf16"]):
        _script("generate").main(["--checkpoint", str(out), "--max-new-tokens", "6"] + extra)
        text = capsys.readouterr().out
        assert "Once upon a time" in text and "decode 6 tokens" in text


def test_a_quantized_file_stands_alone(tmp_path, capsys):
    # the tokenizer travels inside the file: moved elsewhere, it still generates; no local paths in its header
    from quant4.serialization import read_header

    first = tmp_path / "a" / "m.safetensors"
    _script("quantize").main(["--out", str(first)])
    moved = tmp_path / "elsewhere" / "model.safetensors"
    moved.parent.mkdir()
    first.rename(moved)
    (tmp_path / "a").rmdir()
    header = read_header(moved)
    assert str(tmp_path) not in str(header) and str(REPO) not in str(header)
    capsys.readouterr()
    _script("generate").main(["--checkpoint", str(moved), "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert out.startswith("--- int4 g32 ---\nOnce upon a time") and "decode 12 tokens" in out
    loaded = load_model(moved)
    assert loaded.tokenizer.data == (REPO / "models" / "tiny" / "tokenizer.model").read_bytes()


def test_generate_reports_size_threads_and_the_context_cap(capsys):
    import quant4

    _script("generate").main(["--max-new-tokens", "600"])
    err = capsys.readouterr().err
    assert f"{quant4.get_num_threads()} threads" in err and "M int4 weights in 42 layers" in err and "MB" in err
    assert "--max-new-tokens 600 capped at 507 by the model's context (512 tokens)" in err


def test_eval_scores_an_int4_file_alone_or_against_a_reference(tmp_path, capsys):
    from helpers import STORIES

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(STORIES))
    q = tmp_path / "q.safetensors"
    _script("quantize").main(["--out", str(q)])
    capsys.readouterr()
    common = ["--text", str(text), "--tokens", "600", "--window", "128"]
    _script("eval").main(["--group-size", "32"] + common)          # float, quantized in memory (default method)
    in_memory = [r for r in capsys.readouterr().out.splitlines() if "int4 refit g32" in r][0]
    _script("eval").main(["--checkpoint", str(q), "--reference", str(EMBEDDED_MODEL)] + common)
    rows = capsys.readouterr().out.splitlines()
    from_file = [r for r in rows if "int4 file (quant4)" in r][0]
    assert any("float (reference)" in r for r in rows)
    # same weights, same text: the same perplexity, KL and top-1 as the in-memory variant
    assert from_file.split("|")[3:7] == in_memory.split("|")[3:7]
    _script("eval").main(["--checkpoint", str(q)] + common)
    alone = [r for r in capsys.readouterr().out.splitlines() if "int4 file" in r][0]
    assert alone.split("|")[3] == from_file.split("|")[3] and alone.split("|")[5].strip() == ""


def test_eval_activation_rows_decode_and_prefill(tmp_path, capsys):
    """--activation adds decode rows (float, then each mode) and prefill rows (each mode on the windows) for the
    first method; rounding the activations to bf16 or int8 costs little KL against the exact windows row."""
    from helpers import STORIES

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(STORIES))
    _script("eval").main(["--group-size", "32", "--method", "rtn", "--text", str(text), "--tokens", "600",
                          "--window", "128", "--activation", "int8", "bf16", "--decode-tokens", "100"])
    rows = {r.split("|")[2].strip(): r.split("|") for r in capsys.readouterr().out.splitlines() if "int4 rtn" in r}
    assert {"int4 rtn g32, decode, float activations", "int4 rtn g32, decode, int8 activations",
            "int4 rtn g32, prefill, int8 activations", "int4 rtn g32, prefill, bf16 activations"} <= set(rows)
    kl = {k: float(v[5]) for k, v in rows.items()}
    exact = kl["int4 rtn g32 (5.00 bpw)"]
    assert abs(kl["int4 rtn g32, prefill, bf16 activations"] - exact) <= 0.05 * exact
    assert 0.9 * exact <= kl["int4 rtn g32, prefill, int8 activations"] <= 1.3 * exact


def test_eval_bits_per_weight_of_models_and_gguf_files(tmp_path):
    """eval.py's bpw column: int4 g32 with fp16 scale and zero is 5.0 bits per weight, g64 4.5; a GGUF Q4_1
    projection (20 bytes per 32 weights) 5.0 too, read from the file's tensors."""
    from quant4 import quantize_model_
    from quant4.models.gguf import write_gguf
    from quant4.models.load import load_model

    ev = _script("eval")
    loaded = load_model()
    q32 = quantize_model_(loaded.model, 32)
    assert ev.projection_bpw(q32) == 5.0
    assert ev.projection_bpw(quantize_model_(load_model().model, 64)) == 4.5
    path = write_gguf(q32, loaded.args, tmp_path / "m.gguf", tokenizer=loaded.tokenizer)
    assert ev.projection_bpw(gguf_path=path) == 5.0


def test_quantize_script_budget(tmp_path, capsys):
    """--budget mixes group sizes within the bits per weight it is given, ranked on the calibration text; it
    replaces --group-size and does not combine with GPTQ."""
    from helpers import STORIES
    from quant4 import Int4Linear
    from quant4.budget import stored_bits
    from quant4.models.load import load_model

    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(STORIES))
    out = tmp_path / "b.safetensors"
    _script("quantize").main(["--out", str(out), "--budget", "4.5", "--calibration", str(text),
                              "--calib-sequences", "8", "--calib-len", "64"])
    assert "plan: g" in capsys.readouterr().out
    layers = [m for m in load_model(out).model.modules() if isinstance(m, Int4Linear)]
    bits = sum(stored_bits(m.out_features, m.in_features, m.group_size) for m in layers)
    assert bits <= 4.5 * sum(m.in_features * m.out_features for m in layers)
    assert len({m.group_size for m in layers}) > 1
    for bad in (["--group-size", "64"], ["--method", "gptq"]):
        with pytest.raises(SystemExit, match="--budget"):
            _script("quantize").main(["--out", str(tmp_path / "c.safetensors"), "--budget", "4.5"] + bad)


@pytest.mark.parametrize("table", ["Q8_0", "Q4_0"])
def test_generate_and_migrate_a_gguf_with_quantized_table(tmp_path, capsys, table):
    """The embedded model as llama.cpp would quantize it (layers Q4_0, tied table Q8_0 or Q4_0): the table and
    the tied head stay 8-bit / int4; generate.py and migrate.py work on it, and the text is the embedded model's."""
    import gguf

    from helpers import gguf_from_float

    Q = gguf.GGMLQuantizationType
    path = tmp_path / "e.gguf"
    gguf_from_float(path, load_model().model, Q.Q4_0, table=getattr(Q, table))
    tok = str(EMBEDDED_MODEL.parent / "tokenizer.model")
    for extra in ([], ["--dtype", "bf16"], ["--activation", "float"]):
        _script("generate").main(["--checkpoint", str(path), "--tokenizer", tok, "--max-new-tokens", "8"] + extra)
        text = capsys.readouterr().out
        assert "--- int4 g32 ---\nOnce upon a time" in text and "decode 8 tokens" in text, extra
    _script("migrate").main([str(path), "--tokenizer", tok, "--out", str(tmp_path / "e.safetensors")])
    text = capsys.readouterr().out
    assert ("1 8-bit token table, 1 8-bit head" if table == "Q8_0" else "1 int4 token table") in text
    _script("generate").main(["--checkpoint", str(tmp_path / "e.safetensors"), "--max-new-tokens", "8"])
    assert "Once upon a time" in capsys.readouterr().out
