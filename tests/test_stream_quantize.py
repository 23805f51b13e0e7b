"""Streaming quantization: reading and quantizing one tensor at a time gives the same int4 model, bit for bit,
as loading the float model and calling quantize_model_; damaged inputs are clean errors."""
from __future__ import annotations

import json

import pytest
import torch

from quant4 import projection_filter, quantize_model_
from quant4.models.hf import write_hf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import write_llama2c
from quant4.models.load import CheckpointError, load_model
from quant4.models.stream_quantize import quantize_checkpoint

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160, max_seq_len=64,
                 tie_embeddings=True)
TOKENS = torch.tensor([[1, 5, 9, 20, 3, 77, 50, 42]])


def _sd(args=ARGS, seed=0):
    m = Transformer(args)
    m.init_weights(seed)
    return {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")}


def _same_int4(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", ["rtn", "search"])
@pytest.mark.parametrize("include", [(), ("output",)])
def test_hf_sharded_bf16_streams_to_the_same_int4_model(tmp_path, method, include):
    sd = {k: v.bfloat16() for k, v in _sd().items()}
    write_hf(tmp_path, ARGS, sd)
    # split into two shards with an index, as save_pretrained does for large models
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    select = projection_filter(include)
    streamed = quantize_checkpoint(tmp_path, 32, select, method=method)
    whole = quantize_model_(load_model(tmp_path).model, 32, select, method=method)
    _same_int4(streamed.model, whole)
    assert torch.equal(streamed.model(TOKENS), whole(TOKENS))
    assert len(streamed.quantized) == 14 + len(include)
    assert [r.name for r in streamed.model.quant4_report if r.swapped] != []


def test_llama2c_streams_to_the_same_int4_model(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=160, max_seq_len=64)
    write_llama2c(tmp_path / "m.bin", args, _sd(args), version=1)
    streamed = quantize_checkpoint(tmp_path / "m.bin", 64)
    whole = quantize_model_(load_model(tmp_path / "m.bin").model, 64)
    _same_int4(streamed.model, whole)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    sd = _sd()
    sd.pop("layers.1.ffn_norm.weight")
    write_hf(tmp_path / "a", ARGS, sd)
    with pytest.raises(CheckpointError, match="layers.1.ffn_norm.weight"):
        quantize_checkpoint(tmp_path / "a")
    sd = _sd()
    sd["layers.0.feed_forward.w2.weight"] = torch.zeros(64, 96)
    write_hf(tmp_path / "b", ARGS, sd)
    with pytest.raises(CheckpointError, match="w2.weight has shape"):
        quantize_checkpoint(tmp_path / "b")


def test_a_claimed_layer_count_the_tensors_do_not_hold_is_refused_first(tmp_path):
    # a config claiming more layers than the files hold is named before any model is built
    write_hf(tmp_path, ARGS, _sd())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 900
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="claims 900 layers.*2 in all"):
        quantize_checkpoint(tmp_path)


def test_int4_inputs_are_refused(tmp_path):
    from quant4.serialization import save_quantized

    q = quantize_model_(load_model().model, 32)
    save_quantized(q, tmp_path / "q.safetensors", model_info={"type": "llama", "config": q.args.to_dict()})
    with pytest.raises(CheckpointError, match="already int4"):
        quantize_checkpoint(tmp_path / "q.safetensors")
