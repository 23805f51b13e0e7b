"""Int4Linear and quantize_model_: accuracy, dtypes, state, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant4
from quant4 import Int4Linear, quantize_model_
from quant4.models.llama import ModelArgs, Transformer
from helpers import assert_matmul_close, sqnr_db


@pytest.mark.parametrize("g,min_db", [(32, 19.0), (64, 17.5), (128, 16.5), (256, 15.5)])
def test_from_linear_sqnr_and_oracle(g, min_db):
    lin = nn.Linear(1376, 288, bias=True)
    q = Int4Linear.from_linear(lin, group_size=g)
    x = torch.randn(8, 1376)
    y = q(x)
    # exactly the dequantized weight times x (fp32 accumulation bound), and close to the float layer
    assert_matmul_close(y, x, q.qweight, q.scales, q.zeros, g, q.bias)
    assert torch.allclose(y, F.linear(x, q.dequantize(), lin.bias), rtol=1e-4, atol=1e-5)
    # RTN int4 on uniform-random weights: ~20 dB at g=32, about 1 dB less per doubling of the group
    assert sqnr_db(lin(x), y) > min_db
    assert sqnr_db(lin.weight, q.dequantize()) > min_db


def test_forward_shapes_dtypes_and_noncontiguous():
    q = Int4Linear.from_linear(nn.Linear(172, 64), group_size=64)
    x = torch.randn(2, 3, 172)
    y = q(x)
    assert y.shape == (2, 3, 64)
    assert torch.allclose(y, q(x.reshape(6, 172)).reshape(2, 3, 64))
    xt = torch.randn(172, 6).t()  # non-contiguous
    assert not xt.is_contiguous()
    assert torch.equal(q(xt), q(xt.contiguous()))
    for dt in (torch.bfloat16, torch.float16):
        yd = q(x.to(dt))
        assert yd.dtype == dt
        assert torch.allclose(yd.float(), q(x.to(dt).float()), rtol=2**-7, atol=1e-2)
    assert q(torch.randn(0, 172)).shape == (0, 64)


def test_state_dict_round_trip_exact():
    q = Int4Linear.from_linear(nn.Linear(288, 100, bias=True), group_size=64)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias", "_extra_state"}
    assert sd["_extra_state"] == {"format_version": 1, "in_features": 288, "out_features": 100, "group_size": 64}
    fresh = Int4Linear(288, 100, bias=True, group_size=64)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 288)
    assert torch.equal(fresh(x), q(x))
    # saved with torch.save, loaded with weights_only=True
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh2 = Int4Linear(288, 100, bias=True, group_size=64)
    fresh2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh2(x), q(x))


def test_load_state_dict_mismatch_names_the_problem():
    q = Int4Linear.from_linear(nn.Linear(256, 64), group_size=32)
    other = Int4Linear(256, 64, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        other.load_state_dict(q.state_dict())
    sd = dict(q.state_dict())
    sd["qweight"] = torch.zeros(8, 1, 32, 4, dtype=torch.int32)  # a torch <= 2.4 tiled layout
    with pytest.raises(RuntimeError, match=r"qweight: checkpoint has torch.int32 \(8, 1, 32, 4\)"):
        Int4Linear(256, 64, group_size=32).load_state_dict(sd)
    sd = dict(q.state_dict())
    sd["_extra_state"] = dict(sd["_extra_state"], format_version=99)
    with pytest.raises(ValueError, match="format_version 99"):
        Int4Linear(256, 64, group_size=32).load_state_dict(sd)


def test_dtype_moves_keep_stored_format():
    q = Int4Linear.from_linear(nn.Linear(64, 32, bias=True), group_size=32)
    x = torch.randn(2, 64)
    y = q(x)
    q.to(torch.bfloat16)
    q.half()
    assert q.scales.dtype == torch.float16 and q.qweight.dtype == torch.uint8 and q.bias.dtype == torch.float32
    assert torch.equal(q(x), y)


def test_repr():
    r = repr(Int4Linear(172, 64, group_size=64))
    assert "in_features=172" in r and "group_size=64" in r and "padded_in=192" in r and "format=v1" in r


def test_num_threads_setting():
    lin = nn.Linear(128, 48)
    a = Int4Linear.from_linear(lin, num_threads=1)
    b = Int4Linear.from_linear(lin, num_threads=2)
    x = torch.randn(3, 128)
    assert torch.equal(a(x), b(x))
    quant4.set_num_threads(1)
    try:
        assert quant4.get_num_threads() == 1
    finally:
        quant4.set_num_threads(None)
    assert quant4.get_num_threads() == torch.get_num_threads()
    with pytest.raises(ValueError, match="num_threads"):
        quant4.set_num_threads(0)


# -------------------------------------------------------------------------------------------------
# bad input

def test_bad_weights():
    with pytest.raises(ValueError, match="non-finite"):
        quant4.quantize(torch.tensor([[1.0, float("nan")] * 16]), 32)
    with pytest.raises(ValueError, match="non-finite"):
        Int4Linear.from_linear(nn.Linear(32, 2).requires_grad_(False).apply(
            lambda m: m.weight.fill_(float("inf")) if isinstance(m, nn.Linear) else None))
    with pytest.raises(ValueError, match="group_size"):
        quant4.quantize(torch.randn(4, 64), 16)
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear(64, 4, group_size=48)
    with pytest.raises(TypeError, match="dtype"):
        quant4.quantize(torch.randint(0, 5, (4, 64)), 32)
    with pytest.raises(ValueError, match="2-D"):
        quant4.quantize(torch.randn(64), 32)
    with pytest.raises(ValueError, match="non-empty"):
        quant4.quantize(torch.randn(0, 64), 32)
    with pytest.raises(TypeError, match="CPU"):
        quant4.quantize(torch.randn(4, 64, device="meta"), 32)
    with pytest.raises(ValueError, match="float16"):
        quant4.quantize(torch.tensor([[-1e6] * 16 + [1e6] * 16]), 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="in_features"):
        Int4Linear(0, 4)


def test_bad_inputs_to_forward():
    q = Int4Linear.from_linear(nn.Linear(64, 16))
    with pytest.raises(ValueError, match=r"\(3, 63\)"):
        q(torch.randn(3, 63))
    with pytest.raises(ValueError, match="in_features"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="CPU"):
        q(torch.randn(2, 64, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q([1.0] * 64)


def test_bad_packed_tensors():
    qw, s, z = quant4.quantize(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="qweight shape"):
        quant4.matmul(torch.randn(1, 96), torch.zeros(8, 40, dtype=torch.uint8), s, z, 32, 96)
    with pytest.raises(TypeError, match="scales must have dtype"):
        quant4.matmul(torch.randn(1, 64), qw, s.float(), z, 32, 64)
    with pytest.raises(ValueError, match="zeros shape"):
        quant4.matmul(torch.randn(1, 64), qw, s, z[:, :1], 32, 64)
    with pytest.raises(ValueError, match="bias shape"):
        quant4.matmul(torch.randn(1, 64), qw, s, z, 32, 64, torch.zeros(3))


# -------------------------------------------------------------------------------------------------
# quantize_model_

def _tiny_llama():
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=172,
                                 max_seq_len=32))


def test_quantize_model_swaps_exactly_the_projections():
    model = _tiny_llama()
    model.init_weights(0)
    tokens = torch.randint(0, 96, (2, 12))
    ref = model(tokens)
    quantize_model_(model, group_size=32)
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear))
    expected = sorted(f"layers.{i}.{p}" for i in range(2) for p in
                      ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                       "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert swapped == expected
    assert isinstance(model.output, nn.Linear) and not isinstance(model.output, Int4Linear)
    kept = {r.name: r.reason for r in model.quant4_report if not r.swapped}
    assert kept == {"output": "not a projection (wq wk wv wo w1 w2 w3)"}
    assert sum(r.swapped for r in model.quant4_report) == 14
    # w2 has K=172: padded to 192 internally, still takes 172 inputs
    assert model.layers[0].feed_forward.w2.qweight.shape == (64, 96)
    assert sqnr_db(ref, model(tokens)) > 15


def test_quantize_model_filter_fn_and_errors():
    model = _tiny_llama()
    quantize_model_(model, group_size=64, filter_fn=lambda m, name: isinstance(m, nn.Linear))
    assert isinstance(model.output, Int4Linear)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 15
    with pytest.raises(TypeError, match="only nn.Linear"):
        quantize_model_(_tiny_llama(), filter_fn=lambda m, name: name == "norm")
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model_("model")
    bad = _tiny_llama()
    with torch.no_grad():
        bad.layers[1].attention.wk.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wk: .*non-finite"):
        quantize_model_(bad)


def test_gradient_flows_to_input():
    q = Int4Linear.from_linear(nn.Linear(96, 40), group_size=32)
    x = torch.randn(3, 96, requires_grad=True)
    q(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.linear(xr, q.dequantize(), q.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_set_activation_sets_every_int4_layer():
    from quant4 import set_activation_

    model = quantize_model_(_tiny_llama(), group_size=32)
    assert set_activation_(model, "bf16") == sum(isinstance(m, Int4Linear) for m in model.modules())
    assert all(m.activation == "bf16" for m in model.modules() if isinstance(m, Int4Linear))
    with pytest.raises(ValueError, match="activation"):
        set_activation_(model, "fp8")


def test_run_group_equals_separate_calls_and_respects_hooks():
    torch.manual_seed(0)
    mods = [Int4Linear.from_linear(torch.nn.Linear(96, n), 32) for n in (64, 32, 32)]
    for shape in ((1, 1, 96), (2, 5, 96)):
        x = torch.randn(shape)
        with torch.no_grad():
            got = Int4Linear.run_group(mods, x)
            want = [m(x) for m in mods]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    seen = []
    h = mods[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        Int4Linear.run_group(mods, torch.randn(1, 96))
    h.remove()
    assert seen == [torch.Size([1, 32])]          # a hooked module is called as a module
    x = torch.randn(1, 96, requires_grad=True)
    sum(y.sum() for y in Int4Linear.run_group(mods, x)).backward()   # gradients flow as with separate calls
    assert x.grad is not None


def test_oversubscription_warning(monkeypatch):
    """One warning per process when other runnable tasks plus quant4's threads exceed the CPUs; the advice
    depends on the OpenMP wait policy."""
    from quant4 import ops

    monkeypatch.setattr(ops, "_warned_oversubscribed", False)
    monkeypatch.setattr(ops.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ops, "get_num_threads", lambda: 2)
    idle = lambda: "0.10 0.20 0.30 2/300 12345"         # noqa: E731  our two threads, nothing else
    busy = lambda: "1.90 1.20 0.80 3/300 12345"         # noqa: E731  one more
    assert ops.runnable_elsewhere(2, idle) == 0 and ops.runnable_elsewhere(2, busy) == 1
    blips = iter(["0 0 0 5/300 1", "0 0 0 2/300 1", "0 0 0 5/300 1"])
    assert ops.runnable_elsewhere(2, lambda: next(blips)) == 0          # the fewest of three reads
    assert ops.runnable_elsewhere(2, lambda: "garbage") is None
    assert not ops.warn_if_oversubscribed(idle)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with pytest.warns(RuntimeWarning, match="OMP_WAIT_POLICY=PASSIVE"):
        assert ops.warn_if_oversubscribed(busy)
    assert not ops.warn_if_oversubscribed(busy)                            # once
    monkeypatch.setattr(ops, "_warned_oversubscribed", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with pytest.warns(RuntimeWarning, match="fewer threads") as rec:
        ops.warn_if_oversubscribed(busy)
    assert "OMP_WAIT_POLICY" not in str(rec[0].message)
