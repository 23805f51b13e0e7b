"""Concurrency and file-safety properties (part of the hardening work)."""
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch import nn

from quant4 import Int4Linear
from quant4.serialization import atomic_write
from helpers import REPO


def test_concurrent_forward_matches_serial():
    torch.manual_seed(0)
    q = Int4Linear.from_linear(nn.Linear(1376, 600), group_size=32)
    xs = [torch.randn(m, 1376) for m in (1, 2, 3, 4, 7, 33) * 3]
    expected = [q(x) for x in xs]
    results = [None] * len(xs)
    fresh = Int4Linear.from_linear(nn.Linear(8, 8))  # a module whose kernel views are built concurrently

    def work(i):
        results[i] = q(xs[i])
        fresh(torch.randn(2, 8))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(FileExistsError):
        atomic_write(target, lambda tmp: None)
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, failing, overwrite=True)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_killed_quantize_run_leaves_previous_output(tmp_path):
    """SIGKILL a quantize.py run midway (while it writes): the earlier output is intact and loadable."""
    from quant4.models.llama import ModelArgs, Transformer
    from quant4.models.llama2c import write_llama2c
    from quant4.models.load import load_model

    m = Transformer(ModelArgs(dim=256, n_layers=8, n_heads=4, vocab_size=512, hidden_dim=768, max_seq_len=64))
    m.init_weights(0)
    ckpt = tmp_path / "m.bin"
    write_llama2c(ckpt, m.args, {k: v.detach() for k, v in m.state_dict().items()}, version=1)
    out = tmp_path / "q.safetensors"
    cmd = [sys.executable, str(REPO / "scripts" / "quantize.py"), "--checkpoint", str(ckpt), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    before = out.read_bytes()
    for attempt in range(3):
        proc = subprocess.Popen(cmd + ["--force", "--method", "search"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # kill it the moment its temporary output exists, i.e. while it writes (not after a guessed delay)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".q.safetensors.*.tmp")) and proc.poll() is None:
            assert time.monotonic() < deadline, "quantize.py never started writing"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = out.read_bytes()
        assert data == before or load_model(out).kind == "quant4"   # old file, or a complete new one
        for tmp in tmp_path.glob(".q.safetensors.*.tmp"):           # what a killed run may leave behind
            tmp.unlink()
    load_model(out)
