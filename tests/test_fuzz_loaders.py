"""Loaders fed random and corrupted bytes: every failure is a clean ValueError / OSError, never a crash,
hang or huge allocation (fast subset; QUANT4_HYPOTHESIS_PROFILE=long for more examples)."""
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import write_llama2c
from quant4.models.load import load_model
from quant4 import quantize_model_
from quant4.serialization import save_quantized
from quant4.models.gguf import write_gguf
from quant4.interop.torch_int4 import export_torch_int4
from helpers import REPO

CLEAN = (ValueError, OSError)   # CheckpointError and FormatError are ValueErrors


def _model():
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=40, hidden_dim=64, max_seq_len=16))
    m.init_weights(0)
    return m


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    m = _model()
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    write_llama2c(d / "v0.bin", m.args, sd, version=0)
    write_llama2c(d / "v1.bin", m.args, sd, version=1)
    torch.save(sd, d / "m.pt")
    q = quantize_model_(_model(), 32)
    save_quantized(q, d / "q.safetensors", model_info={"type": "llama", "config": q.args.to_dict()})
    write_gguf(q, q.args, d / "q.gguf", tokenizer_path=REPO / "models" / "tiny" / "tokenizer.model")
    torch.save(export_torch_int4(q, layout="cuda-tiled", inner_k_tiles=2), d / "gf.pth")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _load(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        loaded = load_model(path)
        loaded.model(torch.tensor([[1, 2]]))          # what loads must also run
    except CLEAN:
        pass


@pytest.mark.parametrize("name", ["v0.bin", "v1.bin", "m.pt", "q.safetensors", "q.gguf", "gf.pth"])
@given(data=st.data())
def test_corrupted_files_fail_cleanly(tmp_path_factory, good_files, name, data):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    raw = bytearray(good_files[name])
    kind = data.draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        i = data.draw(st.integers(0, max(0, min(len(raw), 300) - 8)))
        raw[i:i + 8] = data.draw(st.binary(min_size=8, max_size=8))
    _load(tmp_path, name, bytes(raw))


@given(blob=st.binary(max_size=600), suffix=st.sampled_from([".bin", ".pt", ".safetensors", ".gguf"]))
def test_random_bytes_fail_cleanly(tmp_path_factory, blob, suffix):
    tmp_path = tmp_path_factory.mktemp("rand")
    _load(tmp_path, "x" + suffix, blob)


def test_absurd_headers_do_not_allocate(tmp_path):
    # legacy header claiming a 2**20-layer model: refused from the header alone
    (tmp_path / "a.bin").write_bytes(struct.pack("<7i", 64, 172, 1 << 20, 8, 4, 512, 512) + b"\0" * 64)
    with pytest.raises(ValueError, match="n_layers"):
        load_model(tmp_path / "a.bin")
    # safetensors header length of 2**62 bytes
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load_model(tmp_path / "b.safetensors")
