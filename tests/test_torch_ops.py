"""quant4's kernels as PyTorch custom ops (quant4.torch_ops): opcheck, torch.compile without graph breaks,
torch.export; and the config-style API (quant4.quantize_ with Int4Config)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quant4 import Int4Config, Int4Linear, ops, quantize_, quantize_model_, torch_ops
from quant4.models.llama import ModelArgs, Transformer


def layer(K=96, N=80, group_size=32, bias=True):
    return Int4Linear.from_linear(nn.Linear(K, N, bias=bias), group_size)


def op_args(m, x, activation="float"):
    return (x, m.qweight, m.scales, m.zeros, m.bias, m.group_size, m.in_features, activation, None)


@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 3, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear(shape, dtype, bias):
    m = layer(bias=bias)
    x = torch.randn(shape).to(dtype)
    torch.library.opcheck(torch_ops.linear, op_args(m, x))
    assert torch.equal(torch_ops.linear(*op_args(m, x)), m(x))           # the op is the module's forward
    if dtype == torch.float32:
        torch.library.opcheck(torch_ops.linear, op_args(m, x.clone().requires_grad_()))


def test_opcheck_dequantize_and_gradient():
    m = layer(K=100, group_size=32)                                      # padded K
    torch.library.opcheck(torch_ops.dequantize, (m.qweight, m.scales, m.zeros, 32, 100))
    assert torch.equal(torch_ops.dequantize(m.qweight, m.scales, m.zeros, 32, 100), m.dequantize())
    x = torch.randn(4, 100, requires_grad=True)
    torch_ops.linear(*op_args(m, x)).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ m.dequantize().t() + m.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_fake_implementation_checks_at_trace_time():
    m = layer()
    # dynamo re-raises the fake implementation's ValueError as its TorchRuntimeError, message kept
    with pytest.raises((ValueError, RuntimeError), match="in_features=96"):
        torch.compile(lambda x: torch_ops.linear(*op_args(m, x)), fullgraph=True)(torch.randn(2, 64))
    with pytest.raises((ValueError, RuntimeError), match="activation"):
        torch.compile(lambda x: torch_ops.linear(*op_args(m, x, "int3")), fullgraph=True)(torch.randn(2, 96))


def test_weight_views_are_cached_per_tensor_and_follow_writes():
    m = layer()
    x = torch.randn(2, 96)
    y0 = torch_ops.linear(*op_args(m, x))
    assert ops.prepared_for(m.qweight, m.scales, m.zeros, 32, 96, m.bias) is \
        ops.prepared_for(m.qweight, m.scales, m.zeros, 32, 96, m.bias)
    with torch.no_grad():
        m.scales.mul_(2)                                         # an in-place write: new views, new result
    y1 = torch_ops.linear(*op_args(m, x))
    assert not torch.equal(y1, y0)
    assert torch.equal(y1, ops.matmul(x, m.qweight, m.scales, m.zeros, 32, 96, m.bias))
    n = len(ops._PREPARED)
    del m
    import gc

    gc.collect()
    assert len(ops._PREPARED) == n - 1                            # a freed layer leaves nothing cached


def small_model(seed=0):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
    model = Transformer(args).eval()
    model.init_weights(seed)
    return quantize_model_(model, 32)


def test_compiled_model_matches_eager_without_graph_breaks():
    model = small_model()
    tokens = torch.randint(0, 128, (1, 12))
    model.setup_cache(1, 64)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        want = [model(tokens, 0)] + [model(tokens[:, i:i + 1], 12 + i) for i in range(3)]
        got = [compiled(tokens, 0)] + [compiled(tokens[:, i:i + 1], 12 + i) for i in range(3)]
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max().item())


def test_compiled_model_with_int4_table_and_8bit_head():
    """A model as a llama.cpp Q4_0 file loads (int4 token table, 8-bit head) compiles without graph breaks: the
    table's rows through quant4::dequantize, the head in torch ops (its float mode; int8 runs eagerly)."""
    from quant4 import Int4Embedding
    from quant4.int8_linear import Int8Linear

    model = small_model()
    model.tok_embeddings = Int4Embedding.from_float(model.tok_embeddings.weight)
    model.output = Int8Linear.from_float(model.output.weight)
    tokens = torch.randint(0, 128, (1, 12))
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        want, got = model(tokens), compiled(tokens)
    assert torch.allclose(want, got, rtol=0, atol=1e-5 * want.abs().max().item())


def test_export_records_the_custom_op():
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))
    quantize_model_(model, 32, lambda m, n: isinstance(m, nn.Linear))
    x = torch.randn(3, 64)
    ep = torch.export.export(model, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.quant4.linear.default) == 2
    assert torch.equal(ep.module()(x), model(x))


# -- config-style API ---------------------------------------------------------------------------------------

def test_quantize_with_default_config_equals_quantize_model():
    a, b = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128)), None
    a.init_weights(1)
    import copy

    b = copy.deepcopy(a)
    quantize_(a)
    quantize_model_(b, 32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


class HFNamed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(64, 64) for n in
                                                   ("q_proj", "k_proj", "o_proj", "down_proj")}) for _ in range(2))
        self.lm_head = nn.Linear(64, 100)


def test_hf_names_overrides_and_patterns():
    model = HFNamed()
    quantize_(model, Int4Config(group_size=32, overrides={"*.down_proj": {"group_size": 64},
                                                          "layers.1.k_proj": None, "lm_head": {"method": "search"}}))
    kinds = {n: (m.group_size if isinstance(m, Int4Linear) else "float") for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, Int4Linear))}
    assert kinds == {"layers.0.q_proj": 32, "layers.0.k_proj": 32, "layers.0.o_proj": 32, "layers.0.down_proj": 64,
                     "layers.1.q_proj": 32, "layers.1.k_proj": "float", "layers.1.o_proj": 32,
                     "layers.1.down_proj": 64, "lm_head": 32}
    reasons = {r.name: r.reason for r in model.quant4_report}
    assert "overrides['layers.1.k_proj']" in reasons["layers.1.k_proj"]
    assert reasons["lm_head"].startswith("int4 g32 search")


def test_presets_and_filter():
    model = HFNamed()
    quantize_(model, Int4Config(targets="meta"))
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    model = HFNamed()
    quantize_(model, Int4Config(targets=["o_proj"]), filter_fn=lambda m, n: n.startswith("layers.0"))
    assert [n for n, m in model.named_modules() if isinstance(m, Int4Linear)] == ["layers.0.o_proj"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=48), "group_size"), (dict(method="gptq"), "method"), (dict(activation="fp8"), "activation"),
    (dict(targets="gpt"), "targets"), (dict(overrides={"x": {"bits": 3}}), "unknown settings"),
    (dict(overrides={"x": {"group_size": 7}}), "group_size"), (dict(overrides={"x": 5}), "expected None"),
])
def test_config_is_checked_when_made(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Int4Config(**kwargs)


def test_a_bad_layer_leaves_the_model_unchanged():
    model = HFNamed()
    with torch.no_grad():
        model.layers[1].o_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.o_proj.*unchanged"):
        quantize_(model)
    assert not any(isinstance(m, Int4Linear) for m in model.modules())


# -- mixed group sizes under a budget ------------------------------------------------------------------------

def test_budget_plan_fits_and_spends_it():
    from quant4.budget import plan_bits_per_weight, plan_group_sizes, quantize_to_budget_, stored_bits

    assert stored_bits(10, 64, 32) == 10 * (4 * 64 + 32 * 2)             # 5.0 bits per weight at g32
    model = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=64, hidden_dim=256))
    model.init_weights(3)
    for bpw in (4.3, 4.5, 4.8, 5.0):
        plan = plan_group_sizes(model, bpw)
        got = plan_bits_per_weight(model, plan)
        assert got <= bpw and got > bpw - 0.25, (bpw, got)              # within the budget, most of it spent
    assert set(plan_group_sizes(model, 5.0).values()) == {32}            # g32 everywhere is exactly 5.0
    with pytest.raises(ValueError, match="budget"):
        plan_group_sizes(model, 4.0)
    tokens = torch.randint(0, 64, (2, 16))
    by_kl = plan_group_sizes(model, 4.5, kl_tokens=tokens)                # measured KL per layer and size
    assert plan_bits_per_weight(model, by_kl) <= 4.5
    quantize_to_budget_(model, 4.5, calibration=tokens)
    sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}
    assert len([m for m in model.modules() if isinstance(m, Int4Linear)]) == 14 and sizes <= {32, 64, 128, 256}


def test_kernel_plan_cache_holds_decode_shapes_only():
    m = layer(bias=False)
    p = m._prepared()
    for M in (1, 2, 9, 33, 100):
        m(torch.randn(M, 96))
    assert {key[0] for key in p.plans} == {1, 2}
