"""The code's layering, checked: what imports what, and where decisions live (issue: one place per decision)."""
import ast

import pytest

from helpers import REPO

PRODUCTION = sorted(p for p in list((REPO / "quant4").rglob("*.py")) + list((REPO / "models").glob("*.py"))
                    + list((REPO / "scripts").glob("*.py"))
                    if "quant4/models" not in str(p.relative_to(REPO)))


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


@pytest.mark.parametrize("path", PRODUCTION, ids=lambda p: str(p.relative_to(REPO)))
def test_production_code_never_imports_the_test_oracle(path):
    if path.name == "reference.py":
        pytest.skip("the oracle itself")
    bad = [m for m in _imports(path) if m.endswith("reference") and "quant4" in m]
    assert not bad, f"{path.relative_to(REPO)} imports {bad}: production code uses the kernels or quant4.scheme"


def test_no_top_level_models_imports():
    # the model package is quant4.models (inside it: relative imports); a top-level "models" would shadow users'
    for path in PRODUCTION + sorted((REPO / "tests").glob("*.py")):
        bad = [m for m in _imports(path) if m == "models" or m.startswith("models.")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_kernels_are_called_from_ops_only():
    for path in PRODUCTION:
        if path.name == "ops.py":
            continue
        bad = [m for m in _imports(path) if "_kernels" in m]
        assert not bad and "_k." not in path.read_text(), f"{path.relative_to(REPO)} uses the compiled kernels"


def test_the_kernel_source_knows_nothing_of_torch():
    text = (REPO / "quant4" / "_kernels.pyx").read_text()
    assert "import torch" not in text and "cimport torch" not in text
