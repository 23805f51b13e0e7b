"""The lean decode path (quant4.decode.DecodeStack via models/fast_decode.py) against the model's forward."""
import pytest
import torch
import torch.nn.functional as F

import quant4
from quant4 import ops
from quant4.decode import DecodeLayer, DecodeStack
from quant4.models.fast_decode import decode_step, lean_stack
from quant4.models.generate import generate
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.load import load_model

from helpers import available_builds


def _model(activation="float", **kw):
    args = dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=300, hidden_dim=160, max_seq_len=128)
    args.update(kw)
    group_size = args.pop("group_size", 32)
    m = Transformer(ModelArgs(**args))
    m.init_weights(seed=3)
    with torch.no_grad():          # norms away from 1 and biases non-zero, so that a wrong one shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    quant4.quantize_model_(m, group_size, activation=activation)
    return m.eval()


def _compare(model, cache_tol=1e-4, steps=24, prompt=(1, 5, 9, 13, 20, 7)):
    """Teacher-forced decode through forward and through decode_step from equal prefilled caches -> (largest
    logit difference relative to the largest logit, top-1 agreement, largest KL(forward || lean))."""
    with torch.inference_mode():
        c1, c2 = model.new_cache(1, 64), model.new_cache(1, 64)
        p = torch.tensor([list(prompt)])
        model(p, 0, c1)
        model(p, 0, c2)
        step = decode_step(model, c2)
        assert getattr(step, "lean", False)
        g = torch.Generator().manual_seed(0)
        worst, agree, kl = 0.0, 0, 0.0
        for i in range(steps):
            tok, pos = int(torch.randint(0, model.args.vocab_size, (1,), generator=g)), len(prompt) + i
            a = model(torch.tensor([[tok]]), pos, c1)[0, -1]
            b = step(tok, pos)
            worst = max(worst, float((a - b).abs().max() / a.abs().max()))
            agree += int(a.argmax() == b.argmax())
            kl = max(kl, float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum")))
        for x, y in zip(c1, c2):       # the caches hold the same keys and values
            assert torch.allclose(x.k, y.k, rtol=0, atol=cache_tol * float(x.k.abs().max()))
            assert torch.allclose(x.v, y.v, rtol=0, atol=cache_tol * float(x.v.abs().max()))
    return worst, agree / steps, kl


@pytest.mark.parametrize("kw", [
    {},                                                     # grouped-query attention, tied embeddings
    {"n_kv_heads": 6, "tie_embeddings": False},             # multi-head attention, separate head
    {"qkv_bias": True, "head_dim": 24},                     # Qwen2-style biases, head_dim != dim / n_heads
    {"group_size": 64},                                     # K = 96 and 160 padded to 128 and 192
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
    # frequencies that depend on the sequence's length: RoPE rows per step, not bound once (bind_rope)
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 16}},
])
def test_lean_matches_forward_float_activations(kw):
    worst, agree, kl = _compare(_model(**kw))
    assert worst < 1e-5 and agree == 1.0 and kl < 1e-6      # KL: fp32 noise


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8-activation kernel on this CPU")
def test_lean_matches_forward_int8_activations():
    # the same int8 kernels; the float parts (RMSNorm, SiLU's exp) differ from PyTorch's in the last bit, which
    # can move an activation across an int8 rounding boundary: equal in distribution, not bit for bit
    worst, agree, kl = _compare(_model("int8"), cache_tol=0.05)
    assert worst < 0.05 and agree >= 0.9 and kl < 1e-4


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8-activation kernel on this CPU")
def test_lean_int8_decode_of_symmetric_weights():
    # every zero 0 (as in a GGUF Q4_0 import): the int8 decode kernels of the lean path and of forward skip the
    # zeros (test_kernels checks that against the zeros read); the int8 prefill that filled the caches reads them
    m = _model("int8")
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, quant4.Int4Linear):
                mod.zeros.zero_()
    worst, agree, kl = _compare(m, cache_tol=0.05)
    assert worst < 0.05 and agree >= 0.9 and kl < 1e-4


def test_embedded_model_generates_the_same_tokens():
    model = load_model().model
    quant4.quantize_model_(model, 32)
    ids = [1, 40, 47, 26, 116]
    lean, s1 = generate(model, ids, 40)
    slow, s2 = generate(model, ids, 40, lean=False)
    assert lean == slow and len(lean) == 40


@pytest.mark.parametrize("activation", ["float", "int8"])
def test_results_do_not_depend_on_threads(activation):
    if activation == "int8" and not ops.int8_kernel_available():
        pytest.skip("no int8-activation kernel on this CPU")
    model = _model(activation)
    outs = []
    for threads in (1, 2):
        quant4.set_num_threads(threads)
        try:
            with torch.inference_mode():
                cache = model.new_cache(1, 32)
                model(torch.tensor([[3, 4, 5]]), 0, cache)
                step = decode_step(model, cache)
                outs.append(torch.stack([step(t, 3 + i) for i, t in enumerate((7, 8, 9))]
                                        + [step.prefill(list(range(20, 40)), 6)]))     # and a lean prefill
        finally:
            quant4.set_num_threads(None)
    assert torch.equal(outs[0], outs[1])


def _compare_prefill(model, n, start=0, cache_tol=1e-5):
    """Prefill n tokens at positions start.. (after a first `start` tokens, as a chat turn) through forward and
    through decode_step(...).prefill from equal caches -> (largest logit difference relative to the largest
    logit, KL(forward || lean), top-1 agreement); the caches must hold the same keys and values."""
    g = torch.Generator().manual_seed(n + start)
    ids = torch.randint(0, model.args.vocab_size, (start + n,), generator=g).tolist()
    with torch.inference_mode():
        c1, c2 = model.new_cache(1, start + n + 2), model.new_cache(1, start + n + 2)
        if start:
            model(torch.tensor([ids[:start]]), 0, c1)
            model(torch.tensor([ids[:start]]), 0, c2)
        a = model(torch.tensor([ids[start:]]), start, c1, last_only=True)[0, -1]
        step = decode_step(model, c2)
        assert getattr(step, "lean", False)
        b = step.prefill(ids[start:], start)
        for x, y in zip(c1, c2):
            end = start + n
            assert torch.allclose(x.k[:, :, :end], y.k[:, :, :end], rtol=0, atol=cache_tol * float(x.k.abs().max()))
            assert torch.allclose(x.v[:, :, :end], y.v[:, :, :end], rtol=0, atol=cache_tol * float(x.v.abs().max()))
            assert not y.k[:, :, end:].any()           # nothing written past the prompt
    kl = float(F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="sum"))
    return float((a - b).abs().max() / a.abs().max()), kl, bool(a.argmax() == b.argmax())


@pytest.mark.parametrize("kw", [
    {},                                                     # grouped-query attention (head_dim 16: blocked)
    {"n_kv_heads": 6, "tie_embeddings": False},             # multi-head attention, separate head
    {"qkv_bias": True, "head_dim": 24},                     # head_dim 24: attention a query at a time
    {"group_size": 64},                                     # K = 96 and 160 padded to 128 and 192
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},
])
@pytest.mark.parametrize("n, start", [(3, 0), (6, 0), (37, 0), (70, 0), (9, 61), (2, 20)])
def test_lean_prefill_matches_forward_float_activations(kw, n, start):
    # n <= SMALL_M: decode steps; 70 positions: two blocks of scores; start > 0: a later chat turn
    worst, kl, top1 = _compare_prefill(_model(**kw, max_seq_len=96), n, start)
    assert worst < 1e-5 and kl < 1e-6 and top1


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8-activation kernel on this CPU")
@pytest.mark.parametrize("n, start", [(3, 0), (37, 0), (9, 40)])
def test_lean_prefill_matches_forward_int8_activations(n, start):
    # the same int8 kernels; float parts equal to rounding, which can move an activation across an int8
    # rounding boundary (see test_lean_matches_forward_int8_activations)
    worst, kl, top1 = _compare_prefill(_model("int8"), n, start, cache_tol=0.05)
    assert worst < 0.05 and kl < 1e-4 and top1


@pytest.mark.parametrize("chunk", [16, 33])
def test_a_long_prompt_prefills_in_chunks(monkeypatch, chunk):
    # chunks of 16 (the last of 70 tokens: 6) and 33 (the last: 4, as decode steps) against one call
    from quant4.models import fast_decode

    model = _model()
    ids = list(range(3, 73))
    with torch.inference_mode():
        c1, c2 = model.new_cache(1, 80), model.new_cache(1, 80)
        whole = decode_step(model, c1).prefill(ids, 0)
        monkeypatch.setattr(fast_decode, "PREFILL_CHUNK", chunk)
        parts = decode_step(model, c2).prefill(ids, 0)
    assert float((whole - parts).abs().max()) <= 1e-5 * float(whole.abs().max())
    for x, y in zip(c1, c2):
        assert torch.allclose(x.k, y.k, rtol=0, atol=1e-5 * float(x.k.abs().max()))


def test_lean_prefill_checks_its_input():
    model = _model()
    with torch.inference_mode():
        stack = lean_stack(model, model.new_cache(1, 16))
        x, cs = torch.zeros(8, 96), torch.zeros(8, 8)
        with pytest.raises(ValueError, match="M > 4"):
            stack.prefill(x[:4], 0, cs[:4], cs[:4])
        with pytest.raises(ValueError, match="positions"):
            stack.prefill(x, 9, cs, cs)
        with pytest.raises(ValueError, match="cos"):
            stack.prefill(x, 0, cs[:7], cs)
        with pytest.raises(TypeError, match="x must have dtype"):
            stack.prefill(x.double(), 0, cs, cs)
        step = decode_step(model, model.new_cache(1, 16))
        with pytest.raises(ValueError, match="at least one token"):
            step.prefill([], 0)
        with pytest.raises(ValueError, match="max_seq_len"):
            step.prefill([1] * 8, model.args.max_seq_len - 4)


def test_models_it_does_not_run_exactly_take_forward():
    model = _model()
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        assert lean_stack(model, cache) is not None
        model.train()
        assert lean_stack(model, cache) is None
        model.eval()
        h = model.layers[1].feed_forward.register_forward_hook(lambda *a: None)
        assert lean_stack(model, cache) is None
        h.remove()
        quant4.set_activation_(model.layers[0].attention.wq, "bf16")
        assert lean_stack(model, cache) is None
        quant4.set_activation_(model, "float")
        assert lean_stack(model.bfloat16(), model.new_cache(1, 16)) is None     # bf16: forward
    mixed = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100))
    quant4.quantize_model_(mixed, 32, filter_fn=lambda m, name: quant4.is_projection(m, name) and not name.endswith("w2"))
    with torch.inference_mode():
        cache = mixed.new_cache(1, 8)
        step = decode_step(mixed, cache)                     # a float projection: forward
        assert not getattr(step, "lean", False)
        mixed(torch.tensor([[1, 2]]), 0, cache)
        assert step(3, 2).shape == (100,)


def test_decode_stack_checks_its_input():
    model = _model()
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        stack = lean_stack(model, cache)
        x, cs = torch.zeros(96), torch.zeros(8)
        with pytest.raises(ValueError, match="pos"):
            stack.step(x, 16, cs, cs)
        with pytest.raises(TypeError, match="x must have dtype"):
            stack.step(x.double(), 0, cs, cs)
        with pytest.raises(ValueError, match="cos"):
            stack.step(x, 0, torch.zeros(9), cs)
        L = model.layers[0]
        a, f = L.attention, L.feed_forward
        layer = DecodeLayer(L.attention_norm.weight, a.wq._prepared(), a.wk._prepared(), a.wv._prepared(),
                            a.wo._prepared(), L.ffn_norm.weight, f.w1._prepared(), f.w3._prepared(),
                            f.w2._prepared(), cache[0].k[0], cache[0].v[0])
        kw = dict(n_heads=6, n_kv_heads=2, head_dim=16, eps=1e-5)
        DecodeStack([layer], model.norm.weight, **kw)
        with pytest.raises(ValueError, match="wk is"):
            DecodeStack([layer._replace(wk=a.wq._prepared())], model.norm.weight, **kw)
        with pytest.raises(ValueError, match="k_cache"):
            DecodeStack([layer._replace(k_cache=cache[0].k[0, :, :8])], model.norm.weight, **kw)
        with pytest.raises(ValueError, match="attn_norm"):
            DecodeStack([layer._replace(attn_norm=torch.ones(95))], model.norm.weight, **kw)
        with pytest.raises(ValueError, match="n_kv_heads"):
            DecodeStack([layer], model.norm.weight, **{**kw, "n_kv_heads": 4})
        with pytest.raises(ValueError, match="activation"):
            DecodeStack([layer], model.norm.weight, **kw, activation="bf16")
        one = DecodeStack([layer], model.norm.weight, **kw)
        with pytest.raises(ValueError, match="bound RoPE tables"):
            one.step_at(0)                                  # no tables bound yet
        with pytest.raises(ValueError, match="cos must be contiguous"):
            one.bind_rope(torch.zeros(16, 9), torch.zeros(16, 9))
        one.bind_rope(torch.zeros(8, 8), torch.zeros(8, 8))
        with pytest.raises(ValueError, match="pos 8 outside"):
            one.step_at(8)                                  # past the 8 rows bound


def _int8_head_reference(w, x):
    """The 8-bit head in plain torch: w and x rounded per 32 inputs (absmax / 127), block dot products scaled."""
    V = w.shape[0]
    wb, xb = w.view(V, -1, 32), x.view(-1, 32)
    dw, dx = wb.abs().amax(-1) / 127, xb.abs().amax(-1) / 127
    q = torch.round(wb / torch.where(dw > 0, dw, torch.ones_like(dw))[..., None])
    xq = torch.round(xb / torch.where(dx > 0, dx, torch.ones_like(dx))[:, None])
    return ((q * xq[None]).sum(-1) * dw * dx[None]).sum(-1)


@pytest.mark.skipif(not ops.int8_head_available(), reason="no 8-bit head kernel (AVX512-VNNI or AVX2) on this CPU")
@pytest.mark.parametrize("V, D", [(300, 96), (1000, 576), (7, 32), (65, 160)])
def test_int8_head_matches_its_definition(V, D):
    from quant4.decode import Int8Head

    w, x = torch.randn(V, D) * 0.05, torch.randn(D)
    w[3, :32] = 0          # an all-zero block: scale 0, no 0/0
    ys = []
    for threads in (1, 2):
        ys.append(Int8Head(w, num_threads=threads)(x).clone())
    assert torch.equal(ys[0], ys[1])
    ref = _int8_head_reference(w, x)
    assert (ys[0] - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert 35 < 10 * torch.log10((w @ x).pow(2).sum() / (ys[0] - w @ x).pow(2).sum())   # 42 dB seen
    with pytest.raises(ValueError, match="divisible by 32"):
        Int8Head(torch.randn(4, 48))
    with pytest.raises(ValueError, match="do not fit"):
        Int8Head(w)(torch.randn(D + 32))


@pytest.mark.parametrize("build", [b for b in available_builds() if b.int8_head_available()],
                         ids=lambda m: m.build_isa())
def test_every_build_of_the_8bit_head_matches_its_definition(build):
    # AVX512-VNNI (codes + 128 with vpdpbusd and a correction) and AVX2 (signed codes, vpsignb + vpmaddubsw)
    V, D = 77, 352
    w, x = torch.randn(V, D) * 0.05, torch.randn(D)
    w[5, 64:96] = 0
    wu, dw = torch.empty(V, D, dtype=torch.uint8), torch.empty(V, D // 32)
    build.q8_quantize_rows(w.numpy(), wu.numpy(), dw.numpy(), 2)
    out = torch.empty(V)
    build.q8_matvec(x.numpy(), wu.numpy(), dw.numpy(), out.numpy(), 2)
    ref = _int8_head_reference(w, x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(not ops.int8_head_available(), reason="no 8-bit head kernel (AVX512-VNNI or AVX2) on this CPU")
def test_int8_decode_uses_the_8bit_head_and_follows_its_weight():
    """Under int8 activations the lean path multiplies an 8-bit copy of the head, made once per head weight;
    a changed weight (in place, or a new tensor) gets a new copy, never the stale one."""
    from quant4.models.fast_decode import int8_head

    model = _model("int8", tie_embeddings=False)
    assert int8_head(_model("float")) is not None and int8_head(model) is int8_head(model)   # cached
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model(torch.tensor([[3, 4, 5]]), 0, cache)
        before = decode_step(model, cache)(7, 3).clone()
        with torch.no_grad():
            model.output.weight.mul_(2)
        after = decode_step(model, cache)(7, 3)
    assert torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))
