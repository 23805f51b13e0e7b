"""Console entry points (pyproject.toml [project.scripts]): quant4-quantize, quant4-generate, quant4-chat,
quant4-eval, quant4-migrate run the tools of quant4/scripts, exactly as `python scripts/NAME.py` does in a
checkout."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _run(name: str) -> None:
    folder = str(Path(__file__).resolve().parent / "scripts")
    if folder not in sys.path:
        sys.path.insert(0, folder)          # the tools import their shared module as `_common`
    tool = importlib.import_module(name)
    importlib.import_module("_common").run_main(tool.main)


def quantize() -> None:
    _run("quantize")


def generate() -> None:
    _run("generate")


def chat() -> None:
    _run("chat")


def evaluate() -> None:
    _run("eval")


def migrate() -> None:
    _run("migrate")
