"""Kernels against the pure-torch reference: codes bit-exact, floats within stated bounds."""
import os
import platform

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import quant4
from quant4 import ops, reference
from quant4.scheme import GROUP_SIZES, padded_k, round_codes
from helpers import assert_matmul_close, available_builds

SHAPES_K = [64, 172, 288, 768, 1376]
SHAPES_N = [1, 7, 64, 172, 288, 512]
SHAPES_M = [1, 3, 4, 5, 17, 64]


def _rand_weight(N, K):
    # mixed scales per row so that groups have very different ranges
    return torch.randn(N, K) * torch.logspace(-3, 0, N)[:, None]


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("K", SHAPES_K)
def test_quantize_pack_bit_exact(K, g):
    for N in (1, 7, 64):
        w = _rand_weight(N, K)
        qweight, scales, zeros = quant4.quantize(w, g)
        q_ref, s_ref, z_ref = reference.quantize(w, g)
        assert torch.equal(scales, s_ref) and torch.equal(zeros, z_ref)
        assert torch.equal(qweight, reference.pack(q_ref))
        assert torch.equal(quant4.unpack(qweight), q_ref)
        assert torch.equal(reference.unpack(qweight), q_ref)
        assert qweight.shape == (N, padded_k(K, g) // 2)
        assert int(q_ref.max()) <= 15
        assert (q_ref[:, K:] == 0).all()  # padding nibbles are 0


@pytest.mark.parametrize("g", GROUP_SIZES)
def test_dequantize_error_within_half_step(g):
    w = _rand_weight(64, 1376)
    qweight, scales, zeros = quant4.quantize(w, g)
    d = quant4.dequantize(qweight, scales, zeros, g, 1376)
    assert torch.allclose(d, reference.dequantize(qweight, scales, zeros, g, 1376), rtol=1e-6, atol=1e-7)
    s = scales.float().repeat_interleave(g, 1)[:, :1376]
    z = zeros.float().repeat_interleave(g, 1)[:, :1376]
    # half a step, plus what rounding zero to float16 can shift the grid by (2**-11 relative)
    bound = 0.5 * s * (1 + 1e-3) + z.abs() * 2.0**-11 + 1e-7
    assert ((w - d).abs() <= bound).all()


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(4, 128)
    w[1] = 0.5
    w[2, :64] = -3.25
    w[2, 64:] = 7.0
    w[3, :32] = 1.0   # one constant group next to a varying one
    w[3, 32:] = torch.linspace(-1, 1, 96)
    for g in (32, 64):
        qweight, scales, zeros = quant4.quantize(w, g)
        d = quant4.dequantize(qweight, scales, zeros, g, 128)
        assert torch.equal(d[:3], w[:3])
        if g == 32:
            assert torch.equal(d[3, :32], w[3, :32])
        assert not torch.isnan(d).any()


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("K", SHAPES_K)
def test_matmul_matches_reference(K, g):
    for N in SHAPES_N:
        qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
        bias = torch.randn(N) if N % 2 else None
        for M in SHAPES_M:
            x = torch.randn(M, K)
            y = quant4.matmul(x, qweight, scales, zeros, g, K, bias)
            assert y.shape == (M, N) and y.dtype == torch.float32
            assert_matmul_close(y, x, qweight, scales, zeros, g, bias)


@pytest.mark.parametrize("small_m", [0, 4, 1000])
def test_decode_and_prefill_paths_agree(small_m):
    # every M through both the decode path and the tiled prefill path
    qweight, scales, zeros = quant4.quantize(_rand_weight(77, 4200), 64)
    for M in (1, 2, 3, 5, 9, 33):
        x = torch.randn(M, 4200)
        y = ops.matmul(x, qweight, scales, zeros, 64, 4200, small_m=small_m)
        assert_matmul_close(y, x, qweight, scales, zeros, 64)


@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)])
def test_matmul_half_inputs(dtype, rel):
    # M = 5: decode kernel; 17, 64: prefill (bf16 inputs take the AVX512-BF16 kernel where available, which
    # also rounds the dequantized weights to bf16: within the same 2**-7 bound)
    qweight, scales, zeros = quant4.quantize(_rand_weight(64, 288), 32)
    for M in (5, 17, 64):
        x = torch.randn(M, 288).to(dtype)
        y = quant4.matmul(x, qweight, scales, zeros, 32, 288)
        assert y.dtype == dtype
        # fp32 accumulation, one rounding of the result to x's dtype
        assert_matmul_close(y, x, qweight, scales, zeros, 32, rel=rel)


@pytest.mark.skipif(not ops.bf16_kernel_enabled(), reason="no AVX512-BF16 kernel on this CPU/build")
def test_bf16_kernel_matches_fp32_kernel():
    qweight, scales, zeros = quant4.quantize(_rand_weight(77, 1376), 32)
    x = torch.randn(40, 1376).bfloat16()
    y_bf16 = quant4.matmul(x, qweight, scales, zeros, 32, 1376).float()
    y_fp32 = quant4.matmul(x.float(), qweight, scales, zeros, 32, 1376)
    mag = x.float().abs() @ quant4.dequantize(qweight, scales, zeros, 32, 1376).abs().t()
    assert ((y_bf16 - y_fp32).abs() <= 2**-7 * mag).all()
    ys = [quant4.matmul(x, qweight, scales, zeros, 32, 1376, num_threads=t) for t in (1, 2)]
    assert torch.equal(ys[0], ys[1])


@pytest.mark.skipif(not ops.bf16_kernel_enabled(), reason="no AVX512-BF16 kernel on this CPU/build")
@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("N,K", [(77, 1024), (5, 384), (300, 1408)])
def test_bf16_decode_kernel_is_exact_for_bf16_inputs(g, N, K):
    # M <= 4 bf16 decode: weights enter the bf16 dot products exactly (16 + q), products of bf16 values are
    # exact in fp32, so the result matches the fp32 reference on the same (bf16) inputs to fp32 rounding
    if K % g:
        pytest.skip("K not a multiple of g")
    qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
    bias = torch.randn(N)
    for M in (1, 2, 3, 4):
        x = torch.randn(M, K).bfloat16()
        out = torch.empty(M, N)
        ops._k.matmul(ops._half_bits(x), ops._as_np(qweight), ops._half_bits(scales), ops._half_bits(zeros), g,
                      ops._as_np(bias), out.numpy(), ops._k.KERNELS["bf16-decode"], False, 2)
        assert_matmul_close(out, x.float(), qweight, scales, zeros, g, bias, rel=1e-6)
        y = quant4.matmul(x, qweight, scales, zeros, g, K, bias)
        assert y.dtype == torch.bfloat16
        if M <= 2 or K <= 6144:                                         # the dispatch takes this kernel
            assert torch.equal(y, out.bfloat16())
        ys = [quant4.matmul(x, qweight, scales, zeros, g, K, bias, num_threads=t) for t in (1, 2, 3)]
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


@pytest.mark.skipif(not ops.bf16_kernel_enabled(), reason="no AVX512-BF16 kernel on this CPU/build")
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_bf16_decode_error_bound_with_outlier_groups(g):
    # one outlier per group sets the scale, the rest sit near zero: the kernel's two terms per weight,
    # scale * (16 + q) and (zero - 24 scale), nearly cancel. The README's bound is relative to their size.
    N, K = 64, 4096
    gen = torch.Generator().manual_seed(g)
    w = torch.randn(N, K, generator=gen) * 1e-3
    w.view(N, K // g, g)[:, :, 0] = 4.0
    qweight, scales, zeros = quant4.quantize(w, g)
    s = scales.float().repeat_interleave(g, 1)
    z = zeros.float().repeat_interleave(g, 1)
    m = s.abs() * (16 + reference.unpack(qweight).float()) + (z - 24 * s).abs()
    for M in (1, 2):
        x = torch.randn(M, K, generator=gen).bfloat16()
        out = torch.empty(M, N)
        ops._k.matmul(ops._half_bits(x), ops._as_np(qweight), ops._half_bits(scales), ops._half_bits(zeros), g,
                      None, out.numpy(), ops._k.KERNELS["bf16-decode"], False, 2)
        ref = reference.linear(x.float(), qweight, scales, zeros, g)
        assert ((out - ref).abs() <= 1e-6 * (x.float().abs() @ m.t()) + 1e-6).all()


@pytest.mark.skipif(not ops.bf16_kernel_enabled(), reason="no AVX512-BF16 kernel on this CPU/build")
def test_bf16_activation_option_rounds_only_the_activations():
    # activation="bf16" on fp32 inputs = the bf16 kernels on x rounded to bf16, result kept in fp32
    qweight, scales, zeros = quant4.quantize(_rand_weight(96, 512), 32)
    for M in (1, 2, 4):
        x = torch.randn(M, 512)
        y = quant4.matmul(x, qweight, scales, zeros, 32, 512, activation="bf16")
        assert y.dtype == torch.float32
        assert_matmul_close(y, x.bfloat16().float(), qweight, scales, zeros, 32, rel=1e-6)   # decode: exact weights
    x = torch.randn(17, 512)
    y = quant4.matmul(x, qweight, scales, zeros, 32, 512, activation="bf16")
    assert_matmul_close(y, x.bfloat16().float(), qweight, scales, zeros, 32, rel=2**-7)       # prefill: bf16 weights
    q = quant4.Int4Linear.from_packed(qweight, scales, zeros, in_features=512, group_size=32, activation="bf16")
    assert "activation=bf16" in repr(q) and torch.equal(q(x[:1]), quant4.matmul(x[:1], qweight, scales, zeros, 32, 512,
                                                                                  activation="bf16"))


@pytest.mark.skipif(not ops.bf16_kernel_enabled(), reason="no AVX512-BF16 kernel on this CPU/build")
@pytest.mark.parametrize("N, K", [(90, 1376), (16, 96), (33, 4128)])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_bf16_prefill_matches_its_definition(N, K, g):
    """bf16 prefill = bf16 activations times the weights dequantized in fp32 (q * scale + (zero - 8 scale), one
    rounding) and rounded to bf16, accumulated in fp32: within 1e-5 of |x| @ |w| of that product computed in
    float64, whatever the thread count (slabs of 16 rows and tiles of several activation rows cut at odd
    places, padded K, several k panels, bias)."""
    qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
    Kp = qweight.shape[1] * 2
    q = reference.unpack(qweight).double()
    s = scales.double().repeat_interleave(g, 1)
    zm = (zeros.float() - 8 * scales.float()).double().repeat_interleave(g, 1)
    w = (q * s + zm).float().bfloat16().double()[:, :K]
    bias = torch.randn(N)
    for M in (5, 17, 64):
        x = torch.randn(M, K).bfloat16()
        ys = [quant4.matmul(x, qweight, scales, zeros, g, K, bias, num_threads=t) for t in (1, 2)]
        outs = []
        for t in (1, 2):
            out = torch.empty(M, N)
            ops._k.matmul(ops._half_bits(torch.nn.functional.pad(x, (0, Kp - K))), ops._as_np(qweight),
                          ops._half_bits(scales), ops._half_bits(zeros), g, ops._as_np(bias), out.numpy(),
                          ops._k.KERNELS["bf16-prefill"], False, t)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]) and torch.equal(ys[0], ys[1])
        ref = x.double() @ w.t() + bias.double()
        mag = x.double().abs() @ w.abs().t()
        assert ((outs[0].double() - ref).abs() <= 1e-5 * mag + 1e-6).all()
        assert ((ys[0].double() - ref).abs() <= 2**-8 * ref.abs() + 1e-5 * mag).all()    # bf16 result


def _torch_int4_op(x, qweight, scales, zeros, g):
    q = reference.unpack(qweight).to(torch.int32).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(x.dtype).contiguous()  # [K/g, N, 2]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, g, sz)


@pytest.mark.parametrize("g", GROUP_SIZES)
@pytest.mark.parametrize("M", [1, 4, 17])
def test_matches_torch_int4_op(g, M):
    """PyTorch's CPU int4 op, fed the same codes/scales/zeros, is an independent oracle (N % 16 == 0, K % g == 0)."""
    N, K = 96, 1024
    qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
    x = torch.randn(M, K)
    y = quant4.matmul(x, qweight, scales, zeros, g, K)
    y_ref = _torch_int4_op(x, qweight, scales, zeros, g)
    mag = x.abs() @ reference.dequantize(qweight, scales, zeros, g, K).abs().t()
    assert ((y - y_ref).abs() <= 1e-5 * mag + 1e-6).all()
    # bf16: torch rounds scales, zeros and each dequantized weight to bf16; bound 2**-7 of the magnitude
    xb = x.bfloat16()
    yb = quant4.matmul(xb, qweight, scales, zeros, g, K).float()
    yb_ref = _torch_int4_op(xb, qweight, scales, zeros, g).float()
    assert ((yb - yb_ref).abs() <= 2**-7 * mag + 1e-3).all()


def test_threads_bitwise_identical():
    qweight, scales, zeros = quant4.quantize(_rand_weight(300, 1376), 32)
    for M in (1, 3, 40):
        x = torch.randn(M, 1376)
        ys = [quant4.matmul(x, qweight, scales, zeros, 32, 1376, num_threads=t) for t in (1, 2, 3)]
        assert all(torch.equal(ys[0], y) for y in ys[1:])
    w = _rand_weight(300, 1376)
    packs = [quant4.quantize(w, 32, num_threads=t) for t in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(*packs))


@pytest.mark.parametrize("build", available_builds(), ids=lambda m: m.build_isa())
def test_every_isa_build_matches_reference(build):
    N, K, g = 45, 288, 32
    qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
    # every path of the fp32 kernel: decode one row per pass, decode Q4_DR rows per pass, multi-row decode, prefill
    for M, decode, multi_row in ((1, True, False), (1, True, True), (3, True, False), (20, True, False),
                                 (1, False, False), (20, False, False)):
        x = torch.randn(M, K)
        out = torch.empty(M, N)
        kernel = build.KERNELS["fp32-decode" if decode else "fp32-prefill"]
        build.matmul(x.numpy(), qweight.numpy(), scales.view(torch.int16).numpy().view("uint16"),
                     zeros.view(torch.int16).numpy().view("uint16"), g, None, out.numpy(), kernel, multi_row, 2)
        assert_matmul_close(out, x, qweight, scales, zeros, g)


@given(M=st.integers(1, 40), N=st.integers(1, 70), K=st.integers(1, 600), g=st.sampled_from(GROUP_SIZES),
       seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(M, N, K, g, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(M, K, generator=gen)
    qweight, scales, zeros = quant4.quantize(w, g)
    q_ref, _, _ = reference.quantize(w, g)
    assert torch.equal(quant4.unpack(qweight), q_ref)
    assert_matmul_close(quant4.matmul(x, qweight, scales, zeros, g, K), x, qweight, scales, zeros, g)


@pytest.mark.skipif(os.environ.get("QUANT4_SKIP_OPENMP_TEST") == "1", reason="QUANT4_SKIP_OPENMP_TEST=1")
def test_openmp_enabled():
    assert quant4.openmp_enabled(), "quant4 was built without OpenMP: kernels run on one thread"


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or platform.machine() not in ("x86_64", "AMD64"),
                    reason="reads x86 CPU flags from /proc/cpuinfo")
def test_kernel_build_in_use_follows_the_cpu_flags():
    # stated independently of quant4's code: which build each flag set must get
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = "avx2"
    else:
        expected = "generic"
    assert quant4.kernel_isa() == (os.environ.get("QUANT4_ISA") or expected)


@pytest.mark.parametrize("level, requested, expected", [
    (2, "", ["avx512", "avx2", "generic"]), (1, "", ["avx2", "generic"]), (0, "", ["generic"]),
    (2, "avx2", ["avx2"]), (2, " AVX512 ", ["avx512"]), (1, "generic", ["generic"]),
    (1, "avx512", ValueError), (0, "avx2", ValueError), (2, "sse9", ValueError)])
def test_isa_choice(level, requested, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="QUANT4_ISA"):
            ops.choose_isa(level, requested)
    else:
        assert ops.choose_isa(level, requested) == expected


@pytest.mark.parametrize("M, Kp, bf16, activation, int8_cpu, expected", [
    (1, 4096, False, "float", False, ("fp32-decode", False)),      # the activation row fits L1
    (1, 11008, False, "float", False, ("fp32-decode", True)),      # it does not: Q4_DR rows per pass
    (4, 11008, False, "float", False, ("fp32-decode", False)),
    (5, 4096, False, "float", False, ("fp32-prefill", False)),
    (1, 4096, False, "int8", True, ("int8-decode", False)),
    (2, 4096, False, "int8", True, ("int8-decode", False)),        # one pass over the codes for M = 2..4
    (1, 4096, False, "int8", False, ("fp32-decode", False)),       # no int8 kernel: the exact one
    (1, 4096, True, "float", False, ("bf16-decode", False)),
    (2, 11008, True, "float", False, ("bf16-decode", False)),
    (3, 11008, True, "float", False, ("fp32-decode", False)),      # four bf16 rows of K > 6144 crowd L1
    (4, 6144, True, "float", False, ("bf16-decode", False)),
    (1, 4000, True, "float", False, ("fp32-decode", False)),       # not whole 128-input runs
    (5, 4096, True, "float", False, ("bf16-prefill", False)),
    (5, 4096, False, "int8", True, ("int8-prefill", False)),       # AVX512-VNNI: int8 prefill too
    (512, 4096, True, "int8", True, ("int8-prefill", False)),
    (4, 4096, False, "int8", True, ("int8-decode", False)),
    (2, 4096, False, "int8", False, ("fp32-decode", False)),       # no int8 kernel: the exact one
])
def test_kernel_plan(monkeypatch, M, Kp, bf16, activation, int8_cpu, expected):
    monkeypatch.setattr(ops, "_INT8", int8_cpu)
    monkeypatch.setattr(ops, "_INT8_PREFILL", int8_cpu)
    assert tuple(ops.plan_matmul(M, Kp, bf16, activation)) == expected


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8 kernel (AVX512-VNNI or AVX2) on this CPU/build")
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_int8_activation_decode(g):
    """Opt-in int8 activations (decode, M <= 4): per-32-block rounding keeps the output within 35 dB SQNR of
    the exact kernel."""
    from helpers import sqnr_db

    K = 1376  # padded to whole groups, so the activation blocks include padding
    qweight, scales, zeros = quant4.quantize(_rand_weight(90, K), g)
    for M in (1, 3):
        x = torch.randn(M, K)
        bias = torch.randn(90)
        y8 = quant4.matmul(x, qweight, scales, zeros, g, K, bias, activation="int8")
        y = quant4.matmul(x, qweight, scales, zeros, g, K, bias)
        assert 35 < sqnr_db(y, y8) < 80   # rounded, but not the exact path
        ys = [quant4.matmul(x, qweight, scales, zeros, g, K, bias, activation="int8", num_threads=t) for t in (1, 2)]
        assert torch.equal(ys[0], ys[1])
    x0 = torch.zeros(1, K)   # all-zero activation blocks: scale 0, no 0/0
    assert torch.equal(quant4.matmul(x0, qweight, scales, zeros, g, K, activation="int8"), torch.zeros(1, 90))
    with pytest.raises(ValueError, match="activation"):
        quant4.matmul(x0, qweight, scales, zeros, g, K, activation="fp8")


def _int8_activation_reference(x, qweight, scales, zeros, g, K):
    """The int8-activation scheme in plain torch: x rounded to int8 per 32-input block (scale absmax/127),
    integer dot with the codes per block, then scale * d per block plus the exact-float zero term."""
    Kp = qweight.shape[1] * 2
    xp = torch.nn.functional.pad(x, (0, Kp - K)).view(-1, 32)
    d = xp.abs().amax(1) / 127
    xq = torch.round(xp * torch.where(d > 0, 1 / d, torch.zeros_like(d))[:, None])
    q = reference.unpack(qweight).float()
    N = q.shape[0]
    dots = (q.view(N, -1, 32) * xq[None]).sum(-1)
    y = (scales.float().repeat_interleave(g // 32, 1) * d[None] * dots).sum(1)
    return y + ((zeros.float() - 8 * scales.float()) * xp.view(-1, g).sum(1)[None]).sum(1)


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8 kernel (AVX512-VNNI or AVX2) on this CPU/build")
@pytest.mark.parametrize("K", [96, 160, 1376, 4128])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_int8_activation_matches_its_definition(K, g):
    qweight, scales, zeros = quant4.quantize(_rand_weight(40, K), g)
    x = torch.randn(1, K)
    y = quant4.matmul(x, qweight, scales, zeros, g, K, activation="int8")[0]
    y_ref = _int8_activation_reference(x[0], qweight, scales, zeros, g, K)
    assert ((y - y_ref).abs() <= 1e-5 * y_ref.abs().max() + 1e-6).all()


@pytest.mark.skipif(not ops.int8_kernel_available(), reason="no int8 kernel (AVX512-VNNI or AVX2) on this CPU/build")
def test_functional_matmul_caches_its_checks_and_sees_in_place_writes():
    # quant4.matmul keeps one Prepared per qweight (the scan for symmetric zeros is not repeated per call); an
    # in-place write to the zeros (symmetric -> not) must reach the result; inference tensors, which carry no
    # version counter, are prepared afresh on every call
    K, g = 256, 32
    qweight, scales, zeros = quant4.quantize(_rand_weight(24, K), g)
    x = torch.randn(1, K)
    for inference in (False, True):
        with torch.inference_mode(inference):
            q, s, z = (t.clone() for t in (qweight, scales, zeros))
            z.zero_()
            y_sym = quant4.matmul(x, q, s, z, g, K, activation="int8")[0]
            assert (ops.prepared_for(q, s, z, g, K) is ops.prepared_for(q, s, z, g, K)) is not inference
            z.add_(0.01)
            y = quant4.matmul(x, q, s, z, g, K, activation="int8")[0]
            ref = _int8_activation_reference(x[0], q, s, z, g, K)
            assert ((y - ref).abs() <= 1e-5 * ref.abs().max() + 1e-6).all(), inference
            assert not torch.equal(y, y_sym)


@pytest.mark.parametrize("build", [b for b in available_builds() if b.int8_available()], ids=lambda m: m.build_isa())
@pytest.mark.parametrize("K", [96, 160, 1376, 4128])   # 3, 5, 43, 129 blocks: every tail of the 4-, 8-, 16-block steps
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_every_build_of_the_int8_decode_matches_its_definition(build, K, g):
    # M = 1..6 activation rows: one weight row's codes meet up to 4 of them per pass (then the rest), asymmetric
    # and symmetric weights (zeros None: the zero stream is not read), with a bias
    qweight, scales, zeros = quant4.quantize(_rand_weight(21, K), g)
    p = ops.Prepared(qweight, scales, zeros, g, K, None)
    bias = torch.randn(21)
    for M in (1, 2, 3, 4, 6):
        x = torch.randn(M, K)
        xk = torch.nn.functional.pad(x, (0, p.Kp - K)).contiguous()
        for z in (p.zeros, None):
            zf = zeros if z is not None else torch.zeros_like(zeros)
            out = torch.empty(M, 21)
            build.matmul(xk.numpy(), p.qweight, p.scales, z, g, bias.numpy(), out.numpy(),
                         build.KERNELS["int8-decode"], False, 2)
            ref = torch.stack([_int8_activation_reference(x[m], qweight, scales, zf, g, K) for m in range(M)]) + bias
            assert ((out - ref).abs() <= 1e-5 * ref.abs().max() + 1e-6).all(), (M, z is None)
            if M == 1:        # four rows per call (their sums in vector lanes): each row as when it is alone
                for n in range(21):
                    one = torch.empty(1, 1)
                    build.matmul(xk.numpy(), p.qweight[n:n + 1], p.scales[n:n + 1],
                                 None if z is None else z[n:n + 1], g, bias[n:n + 1].numpy(), one.numpy(),
                                 build.KERNELS["int8-decode"], False, 1)
                    assert one[0, 0] == out[0, n], (n, z is None)


@pytest.mark.skipif(not ops.int8_prefill_kernel_available(), reason="no int8 prefill kernel (AVX512-VNNI)")
@pytest.mark.parametrize("N, K", [(90, 1376), (16, 96), (33, 4128), (64, 512)])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_int8_activation_prefill(N, K, g):
    """int8 prefill (repacked panels, 16 output columns per vpdpbusd) computes the same rounding as int8 decode:
    every row within 1e-5 of the largest of its definition and of the decode kernel run row by row, bias
    included, whatever the thread count; partial slabs, padding and several k panels included."""
    qweight, scales, zeros = quant4.quantize(_rand_weight(N, K), g)
    bias = torch.randn(N)
    x = torch.randn(37, K)
    x[5] = 0    # an all-zero row: scales 0, no 0/0
    ys = [quant4.matmul(x, qweight, scales, zeros, g, K, bias, activation="int8", num_threads=t) for t in (1, 2)]
    assert torch.equal(ys[0], ys[1])
    y = ys[0]
    y_ref = torch.stack([_int8_activation_reference(r, qweight, scales, zeros, g, K) for r in x]) + bias
    y_dec = torch.cat([quant4.matmul(r[None], qweight, scales, zeros, g, K, bias, activation="int8") for r in x])
    tol = 1e-5 * y_ref.abs().max()
    assert (y - y_ref).abs().max() <= tol
    assert (y - y_dec).abs().max() <= tol
    assert torch.equal(y[5], bias)


@pytest.mark.parametrize("K", [96, 1376, 4128])
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_symmetric_weights_skip_the_zero_stream(K, g):
    """Weights whose zeros are all 0 (+0 or -0: a GGUF Q4_0 import) run the decode kernels without the zeros
    (ops.Prepared.zeros_for gives None): the results equal those computed with the zeros read, bit for bit,
    and the int8 ones their definition; the other kernels keep the zeros, and refuse None."""
    qweight, scales, zeros = quant4.quantize(_rand_weight(40, K), g)
    zeros = torch.zeros_like(zeros)
    zeros[::3] = -0.0
    p = ops.Prepared(qweight, scales, zeros, g, K)
    assert p.zeros_for("int8-decode") is None and p.zeros_for("bf16-decode") is None
    assert p.zeros_for("fp32-decode") is p.zeros and p.zeros_for("int8-prefill") is p.zeros
    p_asym = ops.Prepared(*quant4.quantize(_rand_weight(40, K), g), g, K)
    assert p_asym.zeros_for("int8-decode") is p_asym.zeros
    x = torch.randn(1, K)
    xk = torch.nn.functional.pad(x, (0, p.Kp - K)).contiguous()
    runs = []
    for kernel, ok in (("int8-decode", ops.int8_kernel_available()),
                       ("bf16-decode", ops.bf16_kernel_enabled() and p.Kp % 128 == 0)):
        if not ok:
            continue
        xa = ops._half_bits(xk.bfloat16()) if kernel == "bf16-decode" else xk.numpy()
        outs = []
        for z in (p.zeros, None):
            out = torch.empty(1, 40)
            ops._k.matmul(xa, p.qweight, p.scales, z, g, None, out.numpy(), ops._k.KERNELS[kernel], False, 2)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), kernel
        runs.append(kernel)
    if "int8-decode" in runs:
        y = quant4.matmul(x, qweight, scales, zeros, g, K, activation="int8")[0]
        y_ref = _int8_activation_reference(x[0], qweight, scales, zeros, g, K)
        assert ((y - y_ref).abs() <= 1e-5 * y_ref.abs().max() + 1e-6).all()
    with pytest.raises(ValueError, match="symmetric"):
        ops._k.matmul(xk.numpy(), p.qweight, p.scales, None, g, None, torch.empty(1, 40).numpy(),
                      ops._k.KERNELS["fp32-decode"], False, 1)


def _group_sq_error(w, qweight, scales, zeros, g):
    K = w.shape[1]
    d = reference.dequantize(qweight, scales, zeros, g, K)
    e = torch.nn.functional.pad((w - d) ** 2, (0, padded_k(K, g) - K))
    return e.view(w.shape[0], -1, g).sum(-1)


@given(N=st.integers(1, 12), K=st.integers(1, 300), g=st.sampled_from(GROUP_SIZES),
       heavy=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_search_never_worse_than_rtn(N, K, g, heavy, seed):
    """Per group, the searched scale/zero reconstruct at least as well as round-to-nearest's."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    if heavy:   # outliers, where clipping pays
        w = w * (1 + 20 * (torch.rand(N, K, generator=gen) < 0.02))
    rtn = _group_sq_error(w, *quant4.quantize(w, g), g)
    srch = _group_sq_error(w, *quant4.quantize(w, g, method="search"), g)
    assert (srch <= rtn * (1 + 1e-5) + 1e-12).all()
    fit = _group_sq_error(w, *quant4.quantize(w, g, method="refit"), g)   # never worse than the search either
    assert (fit <= srch * (1 + 1e-5) + 1e-12).all()


def test_refit_reduces_error_further():
    """The least-squares refits lower the reconstruction error below the search's (measured: 2048 x 2048 normal
    weights with 0.1% outliers, mean squared error rtn 2.99e-6, search 2.58e-6, refit 2.41e-6)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1376, generator=gen) * 0.02
    w[torch.rand(w.shape, generator=gen) < 0.001] *= 10
    srch = _group_sq_error(w, *quant4.quantize(w, 32, method="search"), 32).sum()
    fit = _group_sq_error(w, *quant4.quantize(w, 32, method="refit"), 32).sum()
    assert fit < 0.97 * srch


@pytest.mark.parametrize("N,K,g", [(128, 1024, 32), (64, 100, 32), (64, 512, 128)])
def test_refit_kernel_matches_the_reference(N, K, g):
    # the kernel sums the line fit in float64, the oracle in float32: the same float16 pair for nearly every
    # group (measured 99.7%), and never a worse one by more than rounding
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(N, K, generator=gen)
    w[torch.rand(N, K, generator=gen) < 0.001] *= 20
    _, s, z = quant4.quantize(w, g, method="search")
    qk, sk, zk = quant4.quantize(w, g, method="refit")
    rs, rz = reference.refit(w, s, z, g)
    assert ((sk == rs) & (zk == rz)).float().mean() > 0.99
    Kp = padded_k(K, g)
    codes = round_codes(torch.nn.functional.pad(w, (0, Kp - K)).view(N, -1, g), rs[..., None].float(),
                        (rz.float() - 8 * rs.float())[..., None]).view(N, Kp).to(torch.uint8)
    codes[:, K:] = 0
    ref_err = _group_sq_error(w, reference.pack(codes), rs, rz, g)
    assert (_group_sq_error(w, qk, sk, zk, g) <= ref_err * (1 + 1e-3) + 1e-9).float().mean() > 0.99


def test_search_reduces_error_and_keeps_codes_consistent():
    w = torch.randn(256, 1376) * torch.logspace(-2, 0, 256)[:, None]
    rtn = _group_sq_error(w, *quant4.quantize(w, 32), 32).sum()
    qweight, scales, zeros = quant4.quantize(w, 32, method="search")
    srch = _group_sq_error(w, qweight, scales, zeros, 32).sum()
    assert srch < 0.95 * rtn
    # the codes are those of quant4.scheme for the chosen scale and zero
    m = zeros.float() - 8 * scales.float()
    wg = torch.nn.functional.pad(w, (0, padded_k(1376, 32) - 1376)).view(256, -1, 32)
    q = ((wg - m[..., None]) / scales.float()[..., None]).clamp(0, 15).round().view(256, -1).to(torch.uint8)
    q[:, 1376:] = 0
    assert torch.equal(quant4.unpack(qweight), q)
    with pytest.raises(ValueError, match="method"):
        quant4.quantize(w, 32, method="gptq")


def test_kernel_refuses_a_kernel_its_inputs_cannot_take():
    qweight, scales, zeros = quant4.quantize(_rand_weight(16, 128), 32)
    out = torch.empty(1, 16)
    args = (ops._as_np(qweight), ops._half_bits(scales), ops._half_bits(zeros), 32, None, out.numpy())
    with pytest.raises(ValueError, match="needs bf16"):
        ops._k.matmul(torch.randn(1, 128).numpy(), *args, ops._k.KERNELS["bf16-prefill"], False, 1)
    if ops.bf16_kernel_enabled():
        with pytest.raises(ValueError, match="needs fp32"):
            ops._k.matmul(ops._half_bits(torch.randn(1, 128).bfloat16()), *args, ops._k.KERNELS["fp32-decode"],
                          False, 1)
    else:
        with pytest.raises(RuntimeError, match="not available"):
            ops._k.matmul(ops._half_bits(torch.randn(1, 128).bfloat16()), *args, ops._k.KERNELS["bf16-decode"],
                          False, 1)
