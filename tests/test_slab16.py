"""The slab16 layout: int8-activation weights held in memory with 16 rows in vector lanes (a permutation of the
stored bytes, made at run time and never saved). The permutation against its definition, the kernels on it
against the row kernels, and Int4Linear keeping the stored format visible everywhere while it holds slab16."""
import copy
import pickle

import numpy as np
import pytest
import torch

import quant4
from quant4 import Int4Embedding, Int4Linear, ops, set_activation_
from quant4.models.fast_decode import decode_step

needs_slab16 = pytest.mark.skipif(not ops.slab16_available(), reason="no AVX512-VNNI slab16 kernels on this CPU")


def _weight(N, K, group_size=32, seed=0, symmetric=False, bias=True):
    torch.manual_seed(seed)
    lin = Int4Linear.from_linear(torch.nn.Linear(K, N, bias=bias), group_size, activation="int8")
    if symmetric:
        with torch.no_grad():
            lin.zeros.zero_()
    return lin


def _slab16_reference(q, s, z):
    """The layout's definition in numpy: set t of 16 rows, block b, dword j, lane i <- row 16 t + i, bytes
    16 b + 4 j .. + 3; scales and zeros of a set as [G][16]."""
    N, ldq = q.shape
    G = s.shape[1]
    n = N // 16 * 16
    q2, s2, z2 = q.copy(), s.copy(), z.copy()
    q2[:n] = (q[:n].reshape(N // 16, 16, ldq // 16, 4, 4).transpose(0, 2, 3, 1, 4).reshape(n, ldq))
    for a, b in ((s, s2), (z, z2)):
        b[:n] = a[:n].reshape(N // 16, 16, G).transpose(0, 2, 1).reshape(n, G)
    return q2, s2, z2


@pytest.mark.parametrize("N, K, group_size", [(5, 64, 32), (16, 128, 32), (37, 576, 64), (64, 256, 128),
                                              (70, 96, 32)])
def test_the_permutation_is_the_layout_and_exact_both_ways(N, K, group_size):
    lin = _weight(N, K, group_size, bias=False)
    q, s, z = (t.clone() for t in (lin._buffers["qweight"], lin._buffers["scales"], lin._buffers["zeros"]))
    ref = _slab16_reference(q.numpy(), s.view(torch.int16).numpy(), z.view(torch.int16).numpy())
    versions = [t._version for t in (q, s, z)]
    ops.permute_slab16_(q, s, z, True)
    assert [t._version for t in (q, s, z)] != versions        # every Prepared of the old bytes stops matching
    for got, want in zip((q.numpy(), s.view(torch.int16).numpy(), z.view(torch.int16).numpy()), ref):
        assert np.array_equal(got, want)
    back = ops.rows_of_slab16(q, s, z)
    ops.permute_slab16_(q, s, z, False)
    for a, b, c in zip((q, s, z), back, (lin._buffers[k] for k in ("qweight", "scales", "zeros"))):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_the_permutation_checks_its_input():
    lin = _weight(32, 64)
    q, s, z = (lin._buffers[k] for k in ("qweight", "scales", "zeros"))
    with pytest.raises(ValueError, match="one weight"):
        ops.permute_slab16_(q, s[:16], z[:16], True)
    with pytest.raises(TypeError, match="scales"):
        ops.permute_slab16_(q, s.float(), z, True)
    with pytest.raises(ValueError, match="contiguous"):
        ops.permute_slab16_(q.t(), s, z, True)


@needs_slab16
@pytest.mark.parametrize("N, K, group_size, symmetric", [(64, 576, 32, False), (70, 256, 64, True),
                                                         (37, 4096, 128, False), (16, 128, 32, True),
                                                         (144, 1536, 32, True), (5, 64, 32, False),
                                                         (48, 96, 32, False), (32, 224, 32, True)])
def test_kernels_on_slab16_against_the_row_kernels(N, K, group_size, symmetric):
    lin = _weight(N, K, group_size, symmetric=symmetric)
    rows = ops.Prepared(lin.qweight, lin.scales, lin.zeros, group_size, K, lin.bias)
    q, s, z = (t.clone() for t in (lin.qweight, lin.scales, lin.zeros))
    ops.permute_slab16_(q, s, z, True)
    slab = ops.Prepared(q, s, z, group_size, K, lin.bias, slab16=True)
    g = torch.Generator().manual_seed(1)
    for M in (1, 2, 3, 4, 5, 9, 40):
        x = torch.randn(M, K, generator=g)
        a = ops.matmul_prepared(x, rows, activation="int8")
        b = ops.matmul_prepared(x, slab, activation="int8")
        if M > ops.SMALL_M:
            # prefill repacks the same vectors from either layout: bit for bit
            assert torch.equal(a, b)
        else:
            # decode: the same int32 block sums, added in another order (one accumulator per row)
            assert float((a - b).abs().max()) <= 2e-6 * float(a.abs().max())


@needs_slab16
def test_a_slab16_weight_refuses_other_kernels():
    lin = _weight(32, 64)
    q, s, z = (t.clone() for t in (lin.qweight, lin.scales, lin.zeros))
    ops.permute_slab16_(q, s, z, True)
    slab = ops.Prepared(q, s, z, 32, 64, slab16=True)
    for act in ("float", "bf16"):
        for M in (1, 8):
            with pytest.raises(ValueError, match="slab16"):
                ops.matmul_prepared(torch.randn(M, 64), slab, activation=act)


@needs_slab16
def test_int4linear_holds_slab16_and_shows_the_stored_format():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_weight(100, 256), _weight(40, 100, seed=1), _weight(8, 40, seed=2))
    state = copy.deepcopy(model.state_dict())
    x1, x8 = torch.randn(1, 256), torch.randn(8, 256)
    ref1, ref8 = model[0](x1), model(x8)           # the row layout, int8 activations
    set_activation_(model, "int8")
    assert [m.slab16 for m in model] == [True, True, False]      # 8 rows: no whole set of 16
    assert float((model[0](x1) - ref1).abs().max()) <= 2e-6 * float(ref1.abs().max())
    assert torch.equal(model(x8), ref8)
    # state_dict, pickles and copies: the stored row layout, the modules still in slab16
    got = model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state if isinstance(state[k], torch.Tensor))
    assert model[0].slab16
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not other[0].slab16 and torch.equal(other[0]._buffers["qweight"], state["0.qweight"])
        assert torch.equal(other(x8), ref8)
    assert model[0].slab16
    # reading a buffer gives the stored format: the module goes back to rows first
    assert torch.equal(model[0].qweight, state["0.qweight"]) and not model[0].slab16
    # load_state_dict writes rows into rows
    set_activation_(model, "int8")
    model.load_state_dict(state)
    assert not any(m.slab16 for m in model) and torch.equal(model(x8), ref8)
    # another activation mode reads rows: set_activation_ or the attribute itself
    set_activation_(model, "int8")
    set_activation_(model, "float")
    assert not any(m.slab16 for m in model)
    ref_float = model(x8)
    set_activation_(model, "int8")
    for m in model:
        m.activation = "float"
    assert torch.equal(model(x8), ref_float) and not any(m.slab16 for m in model)
    # a new tensor assigned to one buffer: the others are put back into rows first
    set_activation_(model, "int8")
    assert model[0].slab16
    model[0].zeros = state["0.zeros"].clone()
    assert not model[0].slab16 and torch.equal(model(x8), ref8)


@needs_slab16
def test_a_buffer_shared_with_another_module_stays_in_rows():
    head = _weight(64, 96, bias=False)
    table = Int4Embedding.from_packed(head.qweight, head.scales, head.zeros, embedding_dim=96, group_size=32)
    table_rows = table(torch.arange(64))
    model = torch.nn.ModuleDict({"emb": table, "out": head, "other": _weight(32, 96)})
    assert quant4.swap.arrange_layouts_(model) == 1
    assert not head.slab16 and model["other"].slab16
    assert torch.equal(table(torch.arange(64)), table_rows)


def test_without_the_kernels_everything_stays_in_rows(monkeypatch):
    monkeypatch.setattr(ops, "_SLAB16", False)
    model = torch.nn.Sequential(_weight(64, 64))
    set_activation_(model, "int8")
    assert not model[0].slab16
    with pytest.raises(ValueError, match="slab16"):
        model[0].set_slab16_(True)


@needs_slab16
@pytest.mark.parametrize("symmetric", [False, True])
def test_lean_decode_on_slab16_matches_rows(symmetric):
    # a model with 24- and 8-row projections (a set and a tail; a weight with no whole set)
    from quant4.models.llama import ModelArgs, Transformer

    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=1, vocab_size=200, hidden_dim=88,
                              max_seq_len=64, head_dim=8))
    m.init_weights(seed=5)
    quant4.quantize_model_(m.eval(), 32, activation="int8")
    mods = [x for x in m.modules() if isinstance(x, Int4Linear)]
    if symmetric:
        with torch.no_grad():
            for x in mods:
                x.zeros.zero_()
    set_activation_(m, "int8")
    assert any(x.slab16 for x in mods) and not all(x.slab16 for x in mods)
    logits = {}
    for slab in (True, False):
        for x in mods:
            x.set_slab16_(slab and x.out_features >= 16)
        cache = m.new_cache(1, 64)
        step = decode_step(m, cache)
        assert getattr(step, "lean", False)
        out = [step.prefill(list(range(3, 40)), 0)]
        out += [step(t, 37 + i) for i, t in enumerate((5, 9, 11, 2))]
        logits[slab] = torch.stack(out)
    a, b = logits[True], logits[False]
    # prefill: bit for bit; decode: the projections' sums in another order, then int8 rounding downstream
    assert torch.equal(a[0], b[0])
    assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@needs_slab16
def test_compile_runs_the_slab16_layout_and_export_refuses_it():
    from quant4 import torch_ops

    m = _weight(40, 64)
    set_activation_(m, "int8")
    b = m._buffers
    args = (torch.randn(3, 64), b["qweight"], b["scales"], b["zeros"], b["bias"], 32, 64, "int8", None, True)
    torch.library.opcheck(torch_ops.linear, args)
    torch.library.opcheck(torch_ops.linear, (args[0].clone().requires_grad_(),) + args[1:])
    x = torch.randn(2, 64)
    want = m(x)
    got = torch.compile(m, fullgraph=True)(x)
    assert m.slab16 and torch.equal(got, want)
    with pytest.raises(ValueError, match="slab16"):
        torch.export.export(m, (x,))
    m.set_slab16_(False)
    assert torch.allclose(torch.export.export(m, (x,)).module()(x), want, rtol=0, atol=2e-6)


@needs_slab16
def test_a_decode_stack_refuses_weights_permuted_after_it_was_built():
    from quant4.models.llama import ModelArgs, Transformer

    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=96,
                              max_seq_len=32))
    m.init_weights(seed=1)
    quant4.quantize_model_(m.eval(), 32, activation="int8")
    step = decode_step(m, m.new_cache(1, 32))
    step(3, 0)
    m.layers[0].attention.wq.qweight       # reading the stored format puts the layer back into rows
    with pytest.raises(RuntimeError, match="build a new one"):
        step(4, 1)
    step = decode_step(m, m.new_cache(1, 32))
    step(3, 0)


@needs_slab16
def test_weights_made_under_inference_mode_are_permuted_too():
    with torch.inference_mode():
        m = torch.nn.Sequential(_weight(32, 64))
        x = torch.randn(2, 64)
        ref = m(x)
    set_activation_(m, "int8")
    assert m[0].slab16
    with torch.inference_mode():
        assert float((m(x) - ref).abs().max()) <= 2e-6 * float(ref.abs().max())
