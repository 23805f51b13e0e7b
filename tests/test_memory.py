"""quant4.memory: large weight tensors in memory advised for 2 MiB pages. Values never change; the pages are a
request the kernel may decline, so the huge-page checks run only where Linux offers transparent huge pages."""
import copy
import io
import pickle
import sys

import pytest
import torch

from quant4 import memory, ops
from quant4.nn import Int4Linear
from quant4.scheme import pack_codes

HP = memory.HUGE_PAGE
needs_thp = pytest.mark.skipif(not memory.huge_pages_available(), reason="no transparent huge pages here")


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_small_tensors_come_from_torch():
    t = memory.empty((HP // 4 - 1,), torch.float32)
    assert t.shape == (HP // 4 - 1,) and t.dtype == torch.float32
    small = torch.arange(100)
    assert memory.adopt(small) is small


@needs_thp
def test_large_tensors_start_on_a_huge_page_and_get_huge_pages():
    t = memory.empty((3 * HP + 12345,), torch.uint8)
    assert t.data_ptr() % HP == 0 and t.is_contiguous() and not t.any()     # mapped memory reads as zeros
    t.fill_(7)
    got = memory.mapped_bytes(t)
    # the three whole 2 MiB pages may be huge; the 12345-byte tail never is (at most the tensor's own bytes)
    assert HP <= got <= 3 * HP, got
    assert int(t.sum()) == 7 * t.numel()


@needs_thp
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32, torch.int64])
def test_adopt_copies_values_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    src = (torch.randn(2048, 1031, generator=g) * 100).to(dtype)       # >= 2 MiB in every dtype
    out = memory.adopt(src)
    assert out is not src and out.data_ptr() % HP == 0
    assert out.dtype == dtype and out.shape == src.shape and torch.equal(out, src)
    assert memory.adopt(out) is out                  # already there: no second copy
    strided = src.t()                                # not contiguous: a contiguous copy with the same values
    got = memory.adopt(strided)
    assert got.is_contiguous() and torch.equal(got, strided)


@needs_thp
def test_mappings_are_returned_when_the_tensors_die():
    before = _rss()
    for _ in range(24):
        t = memory.empty((32 << 20,), torch.uint8)
        t.fill_(1)
        view = t[1:].view(torch.uint8)       # a view keeps the mapping alive until it dies too
        del t
        assert int(view[-1]) == 1
        del view
    assert _rss() - before < 96 << 20, "24 x 32 MB mappings were not unmapped"


def test_off_switch(monkeypatch):
    monkeypatch.setenv("QUANT4_HUGE_PAGES", "0")
    memory.huge_pages_available.cache_clear()
    try:
        assert not memory.huge_pages_available()
        src = torch.ones(HP)
        assert memory.adopt(src) is src
    finally:
        monkeypatch.undo()
        memory.huge_pages_available.cache_clear()


@needs_thp
def test_mid_sized_weights_share_huge_pages_and_the_page_goes_when_they_die():
    import gc
    g = torch.Generator().manual_seed(3)
    srcs = [torch.randn(n, generator=g).to(dt) for n, dt in
            ((4096 * 8, torch.float32), (70001, torch.float16), (9000, torch.uint8), (100_000, torch.int32))]
    srcs[2] = torch.randint(0, 256, (memory.ARENA_MIN + 1,), dtype=torch.uint8, generator=g)
    outs = [memory.adopt(s) for s in srcs]
    for s, o in zip(srcs, outs):
        assert o is not s and o.dtype == s.dtype and o.shape == s.shape and torch.equal(o, s)
        assert o.data_ptr() % 64 == 0 and memory.in_shared_page(o)
        assert memory.adopt(o) is o                    # already there: no second copy
    # 128 + 137 + 17 + 391 KB fit one 2 MiB page: all four share it, without overlapping
    spans = sorted((o.data_ptr(), o.data_ptr() + o.numel() * o.element_size()) for o in outs)
    assert spans[-1][1] - spans[0][0] <= HP
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    outs[0].add_(1)                                    # writable, and the others keep their values
    assert all(torch.equal(o, s) for o, s in zip(outs[1:], srcs[1:]))
    tiny = torch.ones(100)
    assert memory.adopt(tiny) is tiny                  # below ARENA_MIN: torch's own memory
    # the page is unmapped when the last tensor in it dies
    page_refs = [p[0] for p in memory._arena_pages if p[0]() is not None]
    del outs, o
    gc.collect()
    assert all(r() is None for r in page_refs)


@needs_thp
def test_int4linear_weights_live_in_huge_page_memory_and_compute_the_same():
    g = torch.Generator().manual_seed(1)
    N, K = 2048, 4096
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N, K // 32, generator=g) * 1e-2 + 1e-3).half()
    zeros = (torch.randn(N, K // 32, generator=g) * 1e-3).half()
    layer = Int4Linear.from_packed(qweight, scales, zeros, in_features=K, group_size=32)
    assert layer.qweight.data_ptr() % HP == 0 and torch.equal(layer.qweight, qweight)
    # 256 KB: below a huge page, packed into a shared 2 MiB page (a copy with the same values)
    assert memory.in_shared_page(layer.scales) and torch.equal(layer.scales, scales)
    x = torch.randn(3, K, generator=g)
    want = ops.matmul(x, qweight.clone(), scales, zeros, 32, K)
    assert torch.equal(layer(x), want)
    built = Int4Linear(K, N, group_size=32)   # the constructor's buffers too, zero-filled
    assert built.qweight.data_ptr() % HP == 0 and not built.qweight.any()
    # copies, pickles and saved files hold the same bytes
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), want)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    loaded = Int4Linear(K, N, group_size=32)
    loaded.load_state_dict(torch.load(buf))
    assert torch.equal(loaded(x), want)


@needs_thp
def test_gguf_q4_blocks_convert_straight_into_huge_page_memory():
    from quant4.interop import ggml, layouts

    g = torch.Generator().manual_seed(2)
    N, K = 1024, 4096
    blocks = torch.randint(0, 256, (N, K // 32, 18), dtype=torch.uint8, generator=g)
    blocks[:, :, :2] = torch.tensor([0x00, 0x20], dtype=torch.uint8)       # d = 2**-7 in float16
    c = ggml.to_quant4(blocks.reshape(N, -1).numpy(), "Q4_0", (N, K), True)
    assert c.qweight.data_ptr() % HP == 0
    codes, s, z = layouts.from_ggml_q4(blocks.reshape(N, -1), "Q4_0", K)
    assert torch.equal(c.qweight, pack_codes(codes)) and torch.equal(c.scales, s) and torch.equal(c.zeros, z)


def test_pack_codes_into_out():
    codes = torch.randint(0, 16, (6, 8), dtype=torch.uint8)
    out = torch.empty(6, 4, dtype=torch.uint8)
    assert pack_codes(codes, out=out) is out and torch.equal(out, pack_codes(codes))
    for bad in (torch.empty(6, 5, dtype=torch.uint8), torch.empty(6, 4, dtype=torch.int16),
                torch.empty(4, 6, dtype=torch.uint8).t()):
        with pytest.raises(ValueError, match="out must be a contiguous uint8"):
            pack_codes(codes, out=bad)


@needs_thp
def test_zeros_and_the_meta_device():
    t = memory.zeros((HP,), torch.float32)           # a fresh mapping: zeros without writing them
    assert t.data_ptr() % HP == 0 and not t.any()
    small = memory.zeros((5, 3), torch.float16)
    assert small.dtype == torch.float16 and not small.any()
    with torch.device("meta"):                       # a model built on the meta device stays there
        assert memory.zeros((HP,), torch.float32).is_meta and Int4Linear(4096, 4096).qweight.is_meta


@needs_thp
def test_kv_cache_pages_become_resident_only_as_they_are_written():
    from quant4.models.llama import KVCache

    cache = KVCache(1, 8, 8192, 128, torch.float32)  # 2 x 32 MB, 4 MB per head
    assert cache.k.data_ptr() % HP == 0 and memory.mapped_bytes(cache.k, "Rss") == 0
    k = torch.randn(1, 8, 3, 128)
    got_k, _ = cache.update(0, k, k)
    assert torch.equal(got_k, k) and not cache.k[:, :, 3:].any()
    # three positions of 8 heads: at most one 2 MiB page per head
    assert 0 < memory.mapped_bytes(cache.k, "Rss") <= 8 * HP


@needs_thp
def test_q4_0_zeros_are_never_resident():
    """Q4_0 blocks are symmetric: their zeros (fp16 +0.0) come from a fresh mapping, which reads as zeros without
    a resident page, also after kernels that read the zero stream have run on them."""
    from quant4.interop import ggml

    N, K = 16384, 4096                               # zeros: 16384 x 128 fp16 = 4 MB
    blocks = torch.zeros(N, K // 32, 18, dtype=torch.uint8)
    blocks[:, :, 1] = 0x20                           # d = 2**-7
    blocks[:, :, 2:] = 0x9A                          # codes 10 and 9
    c = ggml.to_quant4(blocks.reshape(N, -1).numpy(), "Q4_0", (N, K), True)
    x = torch.ones(5, K)
    y = ops.matmul(x, c.qweight, c.scales, c.zeros, 32, K)          # prefill kernel: reads the zeros
    assert not c.zeros.any() and c.zeros.dtype == torch.float16
    assert torch.equal(y, torch.full((5, N), K / 2 * (2 + 1) / 128))
    assert memory.mapped_bytes(c.zeros, "Rss") == 0 and memory.mapped_bytes(c.qweight, "Rss") >= N * K // 2



@needs_thp
def test_a_saved_model_loads_into_huge_page_memory_with_the_same_logits(tmp_path):
    """quant4's file format: the loader's tensors are copied into 2 MiB-page memory layer by layer (the originals
    dropped as it goes) and the model computes exactly what the saved one did."""
    from quant4.models.llama import ModelArgs, Transformer
    from quant4.models.load import load_model
    from quant4.serialization import save_quantized
    from quant4.swap import quantize_model_

    args = ModelArgs(dim=512, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=8192)   # w1/w2/w3: 2 MB codes
    model = Transformer(args).eval()
    model.init_weights(seed=3)
    quantize_model_(model, method="rtn")
    path = save_quantized(model, tmp_path / "m.safetensors", model_info={"type": "llama", "config": args.to_dict()})
    got = load_model(path).model
    ff = got.layers[0].feed_forward
    assert all(m.qweight.data_ptr() % HP == 0 and memory.mapped_bytes(m.qweight) > 0 for m in (ff.w1, ff.w2, ff.w3))
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.inference_mode():
        assert torch.equal(got(tokens), model(tokens))


def test_drop_file_pages_unmaps_a_file_view_and_never_touches_anonymous_memory(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    anon = torch.randn(1 << 20)
    keep = anon.clone()
    memory.drop_file_pages(anon)                     # anonymous memory: DONTNEED would zero it; left alone
    assert torch.equal(anon, keep)
    src = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8)
    save_file({"w": src}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        view = f.get_tensor("w")
    assert int(view.sum()) == int(src.sum())         # every page read
    before = memory.mapped_bytes(view, "Rss")
    memory.drop_file_pages(view)
    after = memory.mapped_bytes(view, "Rss")
    assert torch.equal(view, src)                    # read again from the page cache
    if before >= len(src):                           # a file mapping (safetensors may also copy: then a no-op)
        assert after < before


@needs_thp
def test_all_zero_tensors_are_adopted_without_resident_pages():
    z = torch.zeros(2048, 1024, dtype=torch.float16)
    got = memory.adopt(z)
    assert torch.equal(got.view(torch.int16), z.view(torch.int16)) and memory.mapped_bytes(got, "Rss") == 0
    negative = torch.full((2048, 1024), -0.0, dtype=torch.float16)      # -0.0 is not every byte 0: copied
    got = memory.adopt(negative)
    assert torch.equal(got.view(torch.int16), negative.view(torch.int16))


def _resident_pages(t) -> int:
    """Pages of t's (page-aligned) memory that mincore(2) reports resident. smaps cannot tell for a small
    mapping: the kernel merges it with its anonymous neighbours into one region."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    n = (t.numel() * t.element_size() + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    assert t.data_ptr() % mmap.PAGESIZE == 0
    assert libc.mincore(ctypes.c_void_p(t.data_ptr()), ctypes.c_size_t(n * mmap.PAGESIZE), vec) == 0
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and anonymous mappings: Linux")
def test_small_all_zero_tensors_are_adopted_without_resident_pages():
    z = torch.zeros(512, 128, dtype=torch.float16)         # 128 KiB: below 2 MiB, still a page or more
    got = memory.adopt(z)
    assert got is not z and _resident_pages(got) == 0      # (checked before anything reads it)
    assert torch.equal(got, z)
    assert memory.adopt(got) is got                          # adopted again (a tied head): shared, not remapped
    tiny = torch.zeros(16)
    assert memory.adopt(tiny) is tiny                        # under a page: as it is
