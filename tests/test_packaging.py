"""The installed distribution: a wheel built from this checkout installs the model code as quant4.models (no
top-level `models` package that would shadow a user's), with the embedded model, and imports cleanly in a fresh
virtualenv next to a user's own package named `models`. Marked slow: it compiles the kernels (about 40 s)."""
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

USER_CODE = textwrap.dedent("""
    import models                                  # the user's own package
    import quant4
    from quant4.models.load import load_model
    import torch

    assert models.WHO == "user", models.__file__
    assert "site-packages" in quant4.__file__ and {repo!r} not in quant4.__file__, quant4.__file__
    loaded = load_model()                          # the embedded model ships inside the wheel
    logits = loaded.model(torch.tensor([[1, 2, 3]]))
    print("ok", tuple(logits.shape), quant4.kernel_isa())
""")


@pytest.mark.slow
def test_wheel_imports_next_to_a_user_package_named_models(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=900)
    (wheel,) = wheels.glob("quant4-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("models/") for n in names)
    assert "quant4/models/load.py" in names and "quant4/models/tiny/model.safetensors" in names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # the new venv sees this environment's torch, numpy, pip, ... (a path file: their .pth hooks, such as an
    # editable quant4, are not run) but gets its own quant4 from the wheel
    inner = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                           capture_output=True, text=True).stdout.strip()
    outer = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    (Path(inner) / "outer-env.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    user = tmp_path / "project"
    (user / "models").mkdir(parents=True)
    (user / "models" / "__init__.py").write_text('WHO = "user"\n')
    res = subprocess.run([str(py), "-c", USER_CODE.format(repo=str(REPO))], cwd=user, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok (1, 3, 1024)"), res.stdout
    # the console entry points work from the installed wheel, outside the checkout
    for tool in ("quantize", "generate", "chat", "eval", "migrate"):
        res = subprocess.run([str(venv / "bin" / f"quant4-{tool}"), "--help"], cwd=user, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage:" in res.stdout, (tool, res.stderr[-2000:])
    res = subprocess.run([str(venv / "bin" / "quant4-generate"), "--max-new-tokens", "8"], cwd=user,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Once upon a time" in res.stdout, res.stderr[-2000:]
