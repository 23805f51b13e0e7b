"""Paths and assertion helpers shared by the tests."""
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from quant4 import reference

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/<name>.py as a module (its main() runs in-process); scripts/ goes on sys.path for _common."""
    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
SHARED = Path(os.environ.get("QUANT4_SHARED", REPO.parent / "shared"))


def assert_matmul_close(y, x, qweight, scales, zeros, group_size, bias=None, rel=1e-5):
    """Kernel output vs the reference, elementwise: |y - y_ref| <= rel * (|x| @ |w_hat|^T + |bias|) + 1e-6.

    The bound scales with the sum of absolute products, which is what fp32 accumulation error scales with.
    """
    K = x.shape[-1]
    w = reference.dequantize(qweight, scales, zeros, group_size, K)
    y_ref = reference.linear(x.float(), qweight, scales, zeros, group_size, bias)
    mag = x.float().abs() @ w.abs().t()
    if bias is not None:
        mag = mag + bias.float().abs()
    err = (y.float() - y_ref).abs()
    bound = rel * mag + 1e-6
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"max error {err.max().item():.3e} exceeds the bound by {worst:.2f}x"


def sqnr_db(ref, approx):
    ref, approx = ref.float(), approx.float()
    return (20 * torch.log10(ref.norm() / (ref - approx).norm())).item()


# Fixed calibration text for tests (written for this project, in the style of the embedded model's stories), so
# that a test's numbers never change when a document of the repo is edited.
STORIES = [
    "Once upon a time, there was a little girl named Mia. She liked to play in the garden with her red ball. "
    "One day the ball rolled under the fence and Mia felt sad.",
    "Tom had a big brown dog called Max. Every morning they walked to the park together. Max liked to run after "
    "the birds, but he never caught one.",
    "The sun was warm and the sky was blue. A small cat sat on the wall and watched the children play. When it "
    "got dark, the cat went home to sleep.",
    "Lily found a shiny stone near the river. She showed it to her mom, who smiled and said it was very pretty. "
    "Lily put the stone in a box under her bed.",
    "Ben wanted to build a tall tower with his blocks. He put one block on top of another until the tower was "
    "as tall as him. Then it fell down, and Ben laughed.",
    "A little bird could not fly yet. Its mother showed it how to flap its wings. The bird tried again and "
    "again, and at last it flew up into the tree.",
    "Sara and her friend made a cake for grandma. They mixed flour, eggs and milk in a big bowl. Grandma said "
    "it was the best cake she had ever eaten.",
    "The old man had a small boat. Every day he went out on the lake to catch fish. One day he caught a fish "
    "that was too big for the boat, so he let it go.",
    "It was raining, so Jack and Anna stayed inside. They built a fort out of chairs and blankets. Inside the "
    "fort they read books and ate apples until the rain stopped.",
    "A kind girl gave her sandwich to a hungry puppy. The puppy wagged its tail and followed her home. Her dad "
    "said they could keep it, and the girl was very happy.",
] * 3


def embedded_with_windows(n_calibration: int):
    """The embedded float model, n_calibration calibration windows and 8 held-out windows (64 tokens each, from
    STORIES, different seeds): what the calibrated methods' tests quantize with and score on."""
    from quant4.models.calibration import calibration_windows
    from quant4.models.load import load_model, load_tokenizer

    loaded = load_model()
    tok = load_tokenizer(loaded)
    cal = calibration_windows(tok, STORIES, n_sequences=n_calibration, seq_len=64)
    held = calibration_windows(tok, STORIES, n_sequences=8, seq_len=64, seed=1)
    return loaded.model, cal, held


def available_builds():
    """The kernel builds (quant4._kernels, _avx2, _avx512) this CPU runs, imported."""
    # the CPU level comes from the baseline build: importing a wider build on a CPU without its ISA may
    # execute its instructions in the module's own initialisation (SIGILL), so it is never imported there
    from quant4 import _kernels as base

    names = []
    for level, mod in enumerate(("quant4._kernels", "quant4._kernels_avx2", "quant4._kernels_avx512")):
        if base.cpu_level() < level:
            continue
        try:
            names.append(importlib.import_module(mod))
        except ImportError:
            continue
    return names


def gguf_from_float(path, m, layers, *, table=None, head=None, arch="llama"):
    """m (a quant4 Transformer) as a GGUF written directly with the gguf package, quantized by gguf.quants as
    llama.cpp would: the 2-D projections in `layers`, the token table in `table` and the output head in `head`
    (None: F32). Returns {state_dict key: the file's values dequantized by gguf}."""
    import gguf
    import numpy as np

    from quant4.models.gguf import add_llama_metadata, gguf_name

    a = m.args
    w = gguf.GGUFWriter(str(path), arch=arch)
    add_llama_metadata(w, a)
    deq = {}
    for key, t in m.state_dict().items():
        if key.startswith("rope") or (key == "output.weight" and a.tie_embeddings):
            continue
        name = key[: -len(".weight")]
        arr = t.detach().float().numpy()
        kind = {"tok_embeddings": table, "output": head}.get(name, layers if t.dim() == 2 else None)
        if kind is None:
            w.add_tensor(gguf_name(name), arr)
            deq[key] = t.detach().float()
        else:
            q = gguf.quants.quantize(arr, kind)
            w.add_tensor(gguf_name(name), q, raw_dtype=kind)
            deq[key] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(q, kind)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq
