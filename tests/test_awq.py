"""Activation-aware scaling (quant4.awq): the float block computes the same function after the folds, the
search never picks a scaling with more error than none, and AWQ + GPTQ beats GPTQ on the embedded model."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant4 import awq, quantize_model_gptq_
from quant4.models.llama import ModelArgs, Transformer
from helpers import embedded_with_windows


def _block_inputs(model, tokens):
    """(hidden, args, kwargs) of model.layers[0] for `tokens`."""
    got = []

    def grab(mod, args, kwargs):
        got.append((args[0], args[1:], kwargs))
        raise StopIteration

    h = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(tokens)
    except StopIteration:
        pass
    finally:
        h.remove()
    return got


@pytest.mark.parametrize("kw", [{"n_kv_heads": 2}, {"n_kv_heads": 4, "qkv_bias": True}])
def test_folds_keep_the_float_block_and_lower_the_error(kw):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=50, hidden_dim=96, max_seq_len=32, **kw))
    m.init_weights(seed=1)
    with torch.no_grad():        # uneven channels, as trained models have: something for the scales to find
        m.tok_embeddings.weight.mul_(torch.rand(64) * 4 + 0.1)
        for p in m.parameters():
            if p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape))
    tokens = torch.randint(0, 50, (4, 24))
    with torch.no_grad():
        ref = m(tokens)
        block = m.layers[0]
        inputs = _block_inputs(m, tokens)
        H = awq.block_hessians(block, inputs)
        found = awq.scale_block_(block, H, 32, n_heads=4, n_kv_heads=kw["n_kv_heads"], head_dim=16)
        out = m(tokens)
    assert torch.allclose(out, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))   # the same function
    assert [n for n, _, _ in found] == ["attention.wq", "attention.wo", "feed_forward.w1", "feed_forward.w2"]
    assert all(r <= 1.0 for _, _, r in found)              # never more error than unscaled (alpha 0 is on the grid)
    assert any(a > 0 and r < 0.95 for _, a, r in found), found


def test_gqa_scales_are_shared_by_the_query_heads_of_a_kv_head():
    H = torch.diag(torch.rand(64) + 0.1).double()
    s, alpha, err, base = awq.search_scales([torch.randn(32, 64)], H, 32, tie=(2, 2, 16), num_threads=1)
    s = s.view(2, 2, 16)
    assert torch.equal(s[:, 0], s[:, 1]) and err <= base


def test_needs_llama_blocks():
    with pytest.raises(ValueError, match="Llama blocks"):
        awq.check_block(nn.Sequential(nn.Linear(4, 4)), "layers.0")


def test_awq_gptq_beats_gptq_on_the_embedded_model():
    base, cal, held = embedded_with_windows(24)
    kl = {}
    with torch.no_grad():
        ref = torch.log_softmax(base(held), -1)
        for name, use in (("gptq", False), ("awq", True)):
            q = quantize_model_gptq_(copy.deepcopy(base), cal, 32, method="search", awq=use)
            kl[name] = F.kl_div(torch.log_softmax(q(held), -1), ref, log_target=True, reduction="batchmean").item()
            if use:
                assert all("awq+gptq" in r.reason for r in q.quant4_report if r.swapped)
    assert kl["awq"] < kl["gptq"], kl
