"""Scripts as a user runs them: every expected failure ends in one line on stderr and a non-zero status, never a
traceback, and never costs a file; what generate.py prints is exactly what the model generated."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import write_llama2c
from quant4.models.load import EMBEDDED_MODEL, load_model
from quant4.models.tokenizer import SentencePieceTokenizer
from quant4.serialization import atomic_write
from helpers import REPO

TOK = REPO / "models" / "tiny" / "tokenizer.model"


def _run(script, *args, preexec=None, env=None):
    cmd = [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args]
    return subprocess.run(cmd, capture_output=True, timeout=300, preexec_fn=preexec, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def _assert_one_line_error(res, *words):
    err = res.stderr.decode("utf-8", "replace")
    assert res.returncode != 0, f"exit 0; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err[-1000:]
    for w in words:
        assert w in last, last


def _small_checkpoint(path, vocab=80):
    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=vocab, hidden_dim=128, max_seq_len=64))
    m.init_weights(0)
    write_llama2c(path, m.args, {k: v.detach() for k, v in m.state_dict().items()}, version=1)
    return path


def test_out_is_a_directory(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    _assert_one_line_error(_run("quantize", "--out", str(tmp_path / "d.safetensors"), "--force"), "directory")


def test_out_on_a_read_only_file_system():
    _assert_one_line_error(_run("quantize", "--out", "/proc/quant4-test.safetensors"))


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_leaves_the_old_output_and_no_temporary_file(tmp_path):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"previous")
    _assert_one_line_error(_run("quantize", "--out", str(out), "--force", preexec=_small_file_limit), "large")
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]


def test_quantize_refuses_to_overwrite_its_own_input(tmp_path):
    src = tmp_path / "model.safetensors"
    shutil.copy(EMBEDDED_MODEL, src)
    before = src.read_bytes()
    _assert_one_line_error(_run("quantize", "--checkpoint", str(src), "--tokenizer", str(TOK), "--out", str(src),
                                "--force"), "--checkpoint")
    assert src.read_bytes() == before


def test_prompt_longer_than_the_context():
    _assert_one_line_error(_run("generate", "--prompt", "Once upon a time " * 300), "context")


def test_prompt_that_is_not_utf8():
    res = subprocess.run([sys.executable.encode(), str(REPO / "scripts" / "generate.py").encode(), b"--prompt",
                          b"Once \xff\xfe upon"], capture_output=True, timeout=300, cwd=REPO)
    _assert_one_line_error(res, "UTF-8")


@pytest.mark.parametrize("threads", ["0", "100000"])
def test_absurd_thread_counts(threads):
    _assert_one_line_error(_run("generate", "--threads", threads, "--max-new-tokens", "2"), "--threads")


def test_eval_decode_tokens_one():
    _assert_one_line_error(_run("eval", "--decode-tokens", "1", "--activation", "int8"), "--decode-tokens")


def test_eval_without_its_default_data(tmp_path):
    # the data folder is ../shared/data beside the checkout, or $QUANT4_DATA: point it at an empty folder
    res = _run("eval", "--method", "rtn", env={"QUANT4_DATA": str(tmp_path)})
    _assert_one_line_error(res, "--text")


def test_gptq_with_a_tokenizer_larger_than_the_model(tmp_path):
    ckpt = _small_checkpoint(tmp_path / "m.bin", vocab=80)
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a girl. " * 200)
    res = _run("quantize", "--checkpoint", str(ckpt), "--tokenizer", str(TOK), "--method", "gptq",
               "--calibration", str(calib), "--calib-sequences", "2", "--calib-len", "16",
               "--out", str(tmp_path / "q.safetensors"))
    _assert_one_line_error(res, "tokenizer")


def test_two_writers_without_force_cannot_both_succeed(tmp_path):
    target = tmp_path / "out.bin"
    first_writing = threading.Event()
    second_done = threading.Event()
    results = {}

    def slow(tmp):
        first_writing.set()
        second_done.wait(30)
        with open(tmp, "wb") as f:
            f.write(b"first")

    def writer(name, fn):
        try:
            atomic_write(target, fn)
            results[name] = "ok"
        except FileExistsError:
            results[name] = "refused"

    a = threading.Thread(target=writer, args=("first", slow))
    a.start()
    first_writing.wait(30)          # the first writer checked that the target is free and is writing...
    writer("second", lambda tmp: open(tmp, "wb").write(b"second"))
    second_done.set()               # ...the second one finished meanwhile
    a.join()
    assert results == {"first": "refused", "second": "ok"}
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_output_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "f", lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


# ---- the text generate.py prints ------------------------------------------------------------------------------

def _printed_continuation(prompt, n=24):
    res = _run("generate", "--prompt", prompt, "--max-new-tokens", str(n))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    out = res.stdout.decode("utf-8")
    body = out.split("--- int4 g32 ---\n", 1)[1].split("\n[int4", 1)[0]
    assert body.startswith(prompt), body
    return body[len(prompt):].rstrip("\n")


@pytest.mark.parametrize("prompt", ["Once   upon  a    time", "Es war einmal ein Mädchen, 日本", "  Lily"])
def test_generate_prints_exactly_the_generated_text(prompt):
    from quant4.models.generate import generate
    from quant4 import ops, quantize_model_, set_activation_

    shown = _printed_continuation(prompt)
    loaded = load_model()
    tok = SentencePieceTokenizer(TOK)
    model = quantize_model_(loaded.model, 32)
    set_activation_(model, "int8" if ops.int8_kernel_available() else "float")    # the script's --activation auto
    ids = tok.encode(prompt)
    new, _ = generate(model, ids, 24, stop_ids=(tok.bos_id, tok.eos_id))
    expected = tok.decode(ids + new)[len(tok.decode(ids)):]
    assert shown == expected
    assert len(new) > 0


def test_stream_decoder_equals_whole_decoding():
    import random

    tok = SentencePieceTokenizer(TOK)
    for trial in range(300):
        r = random.Random(trial)
        ctx = [tok.bos_id] + [r.randrange(tok.vocab_size) for _ in range(r.randrange(0, 6))]
        ids = [r.randrange(tok.vocab_size) for _ in range(r.randrange(1, 30))]
        # byte-fallback pieces of multi-byte characters, too
        ids += tok.encode("ä 日本 😀", bos=False)
        s = tok.stream(ctx)
        pieces = [s.push(i) for i in ids]
        assert all("\ufffd" not in p for p in pieces[-6:])
        assert "".join(pieces) + s.flush() == tok.decode(ctx + ids)[len(tok.decode(ctx)):]
