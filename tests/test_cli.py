"""The command-line tools: --help without importing torch, help text and defaults on every option, the
console entry points."""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

import pytest

from helpers import REPO

TOOLS = ["quantize", "generate", "chat", "eval", "migrate", "make_checkpoint", "bench_e2e"]


def parser(name):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name).build_parser()
    finally:
        sys.path.remove(str(REPO / "scripts"))


@pytest.mark.parametrize("name", TOOLS)
def test_every_option_has_help_and_shows_its_default(name):
    ap = parser(name)
    for action in ap._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 8, f"{name} {label}: no help text"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            assert "%(default)" in action.help or "default" in action.help, f"{name} {label}: default not shown"


@pytest.mark.parametrize("name", TOOLS)
def test_help_does_not_import_torch(name):
    code = (f"import sys, runpy; sys.argv = ['{name}', '--help']; sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
            f"try:\n    runpy.run_path({str(REPO / 'scripts' / (name + '.py'))!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\n"
            f"assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--" in r.stdout


@pytest.mark.parametrize("script, argv", [
    ("generate", ["--checkpoint", "{tiny}", "--method", "search"]),
    ("generate", ["--checkpoint", "{tiny}", "--group-size", "64"]),
    ("chat", ["--method", "search", "--prompt", "x"]),
])
def test_layer_options_without_quantization_are_refused(tmp_path, script, argv):
    tiny = REPO / "models" / "tiny" / "model.safetensors"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"),
                        *[a.format(tiny=tiny) for a in argv]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "only apply" in r.stderr, r.stderr


def test_bench_e2e_runs_quant4_side_on_a_gguf(tmp_path):
    from quant4 import quantize_model_
    from quant4.models.gguf import write_gguf
    from quant4.models.load import load_model

    loaded = load_model()
    write_gguf(quantize_model_(loaded.model, 32), loaded.args, tmp_path / "m.gguf", tokenizer=loaded.tokenizer)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_e2e.py"), "--checkpoint", str(tmp_path / "m.gguf"),
                        "--prompt", "8", "--gen", "4", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| pp8 |" in r.stdout and "| tg4 |" in r.stdout
    assert "prefill and decode lean path" in r.stdout and "read-bandwidth probe" in r.stdout
    # with llama-bench (here a stand-in that answers its JSON, 50 tok/s for every test it is asked for): the
    # table's ratios, then decode in turns, one llama-bench run per round
    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\n" + (
        "import json, sys\n"
        "a = sys.argv; p = [int(v) for v in a[a.index('-p') + 1].split(',')]; n = int(a[a.index('-n') + 1])\n"
        "open(a[0] + '.log', 'a').write(' '.join(a[1:]) + '\\n')\n"
        "rows = [dict(n_prompt=v, n_gen=0, avg_ts=50.0) for v in p if v] + [dict(n_prompt=0, n_gen=n, avg_ts=50.0)]\n"
        "print(json.dumps(rows))\n"))
    fake.chmod(0o755)
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_e2e.py"), "--checkpoint", str(tmp_path / "m.gguf"),
                        "--prompt", "8", "--gen", "4", "--repeats", "1", "--alternate", "2", "--llama-bench", str(fake)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| pp8 |" in r.stdout and "| 50.0 |" in r.stdout
    assert "decode in turns (tg4, quant4 then llama.cpp, 2 rounds)" in r.stdout and r.stdout.count(" vs 50.0 (") == 2
    calls = (tmp_path / "llama-bench.log").read_text().splitlines()
    assert len(calls) == 3 and calls[1].startswith(f"-m {tmp_path / 'm.gguf'} -p 0 -n 4 -r 1")


@pytest.mark.parametrize("env, loadavg, threads, want", [
    ({}, "0.1 0.1 0.1 1/300 9", None, None),                     # CPUs free: libgomp's spinning default
    ({}, "0.1 0.1 0.1 2/300 9", None, "PASSIVE"),                # another runnable task: wait passively
    ({}, "garbage", None, "PASSIVE"),                            # cannot tell: passively
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "0.1 0.1 0.1 2/300 9", None, "ACTIVE"),   # the user chose
    ({"GOMP_SPINCOUNT": "1000"}, "0.1 0.1 0.1 2/300 9", None, None),
    ({}, "0.1 0.1 0.1 2/300 9", 1, None if (os.cpu_count() or 1) >= 2 else "PASSIVE"),   # room for one thread
])
def test_tools_wait_policy_follows_the_machine_unless_the_user_chose(monkeypatch, env, loadavg, threads, want):
    sys.path.insert(0, str(REPO / "scripts"))
    import _common

    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _common.default_wait_policy(threads, read=lambda: loadavg)
    assert os.environ.get("OMP_WAIT_POLICY") == want


def test_tools_choose_the_wait_policy_before_torch_loads():
    code = (f"import sys, os; sys.path.insert(0, {str(REPO / 'scripts')!r})\n"
            "import _common; _common.apply_threads(None)\n"
            "print('torch' in sys.modules)")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
