"""Other tools' int4 layouts, torch's int4 op, gpt-fast/torchchat state dicts, GGUF, and scripts/migrate.py."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from quant4.models.gguf import write_gguf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.load import CheckpointError
from quant4.models.load import build_quantized, load_model, load_tokenizer
from quant4.interop.torch_int4 import export_torch_int4
from quant4.serialization import save_quantized
from quant4.models.torch_int4 import describe_checkpoint, read_torch_int4
from quant4 import Int4Linear, quantize_model_, reference
from quant4.interop import layouts
from helpers import REPO, gguf_from_float

FIXTURES = REPO / "tests" / "fixtures" / "int4_layouts.safetensors"
ISA_LAYOUT = {"AVX512": "cpu-avx512", "AVX2": "cpu-avx2", "DEFAULT": "cpu-scalar"}


def _codes(N, K, seed=0):
    return torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---- layouts --------------------------------------------------------------------------------------------------

def test_layouts_match_golden_fixtures():
    # made by tests/fixtures/make_layout_fixtures.py from torch's own CPU op (per ISA) and a transliteration of
    # the CUDA packing kernel, independently of quant4.interop.layouts
    f = load_file(str(FIXTURES))
    q = f["codes"]
    N, K = q.shape
    seen = 0
    for name, packed in f.items():
        if name == "codes":
            continue
        layout, _, ikt = name.partition("-ikt")
        ikt = int(ikt or 8)
        assert torch.equal(layouts.pack_codes(q, layout, ikt), packed), name
        assert torch.equal(layouts.unpack_codes(packed, layout, N, K), q), name
        seen += 1
    assert seen == 7


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("N,K", [(16, 128), (48, 256), (64, 512), (80, 128), (208, 384)])
def test_layout_round_trip_is_bit_exact(layout, N, K):
    q = _codes(N, K, N + K)
    ikt = 2 if K % 128 else 8
    packed = layouts.pack_codes(q, layout, ikt)
    assert packed.numel() * packed.element_size() == N * K // 2
    assert torch.equal(layouts.unpack_codes(packed, layout, N, K), q)
    m = layouts.nibble_map(layout, N, K, ikt)
    assert torch.equal(m.sort().values, torch.arange(N * K))        # every weight exactly once


def test_unpack_reads_a_size1_dim_with_stride_0():
    # found by test_fuzz_loaders: a checkpoint's tensor may carry any stride on a size-1 dimension (here cuda-tiled
    # with 2 inner k tiles: int32 [N/8, K/32, 32, 1]); its bytes are still the packed weight
    q = _codes(16, 128, 7)
    packed = layouts.pack_codes(q, "cuda-tiled", 2)
    odd = torch.as_strided(packed.clone(), packed.shape, packed.stride()[:-1] + (0,))
    assert odd.stride()[-1] == 0 and torch.equal(odd, packed)
    assert torch.equal(layouts.unpack_codes(odd, "cuda-tiled", 16, 128), q)


@pytest.mark.parametrize("N,K", [(16, 64), (48, 32), (80, 256), (176, 128)])
def test_cpu_layout_equals_torch_op_on_this_cpu(N, K):
    layout = ISA_LAYOUT[torch.backends.cpu.get_cpu_capability()]
    q = _codes(N, K)
    assert torch.equal(layouts.pack_codes(q, layout), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_other_isa_layouts_drive_torch_op(isa, tmp_path):
    # torch on this machine, forced to another ISA, multiplies by quant4-made bytes of that ISA's layout
    # and gets quant4's result
    lin = Int4Linear.from_linear(nn.Linear(256, 96, bias=False), 32)
    x = torch.randn(3, 256)
    layout = {"avx2": "cpu-avx2", "default": "cpu-scalar"}[isa]
    codes = reference.unpack(lin.qweight)
    torch.save({"packed": layouts.pack_codes(codes, layout), "sz": layouts.scales_and_zeros(lin.scales, lin.zeros,
                torch.float32), "x": x, "y": lin(x)}, tmp_path / "case.pt")
    script = textwrap.dedent(f"""
        import torch
        d = torch.load({str(tmp_path / 'case.pt')!r})
        assert torch.backends.cpu.get_cpu_capability() == {isa.upper()!r}, torch.backends.cpu.get_cpu_capability()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(d["x"], d["packed"], 32, d["sz"])
        err = ((y - d["y"]).abs() / (d["y"].abs() + 1e-3)).max().item()
        print(err)
        assert err < 1e-4, err
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_export_drives_torch_op(dtype, tol):
    lin = Int4Linear.from_linear(nn.Linear(384, 160, bias=False), 64)
    sd = export_torch_int4(nn.ModuleDict({"l": lin}), dtype=dtype)
    x = torch.randn(5, 384)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), sd["l.weight"], 64, sd["l.scales_and_zeros"])
    ref = lin(x)
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < tol


def test_int4linear_to_torch_int4pack():
    lin = Int4Linear.from_linear(nn.Linear(256, 48, bias=False), 128)
    packed, sz = lin.to_torch_int4pack(torch.float32)
    x = torch.randn(2, 256)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
    assert (y - lin(x)).abs().max().item() <= 1e-5 * lin(x).abs().max().item()
    with pytest.raises(ValueError, match="out_features % 16"):
        Int4Linear.from_linear(nn.Linear(64, 40), 32).to_torch_int4pack()


def test_layout_errors():
    with pytest.raises(ValueError, match="unknown int4 layout"):
        layouts.pack_codes(_codes(16, 32), "avx1024")
    with pytest.raises(ValueError, match="N % 16"):
        layouts.pack_codes(_codes(8, 32), "cpu-avx2")
    with pytest.raises(ValueError, match="K % 128"):
        layouts.pack_codes(_codes(16, 64), "cuda-tiled", 8)
    with pytest.raises(ValueError, match="codes must be 0..15"):
        layouts.pack_codes(torch.full((16, 32), 16, dtype=torch.uint8), "quant4")
    with pytest.raises(TypeError, match="uint8 tensor"):
        layouts.pack_codes(torch.zeros(16, 32, dtype=torch.int32), "quant4")
    with pytest.raises(ValueError, match="holds 256 bytes"):
        layouts.unpack_codes(torch.zeros(16, 16, dtype=torch.uint8), "cpu-avx2", 16, 64)
    with pytest.raises(ValueError, match="float16's range"):
        layouts.to_quant4_qparams(torch.full((2, 16, 2), 1e6))
    with pytest.raises(ValueError, match="cannot infer a group size"):
        layouts.infer_group_size(96, 2)


# ---- gpt-fast / torchchat state dicts --------------------------------------------------------------------------

def _quant_model(dim=128, hidden=256, n_layers=2, vocab=96, g=32, seed=0):
    m = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                              hidden_dim=hidden, max_seq_len=64))
    m.init_weights(seed)
    return quantize_model_(m.eval(), g)


def _params(m, path):
    a = m.args
    (path / "params.json").write_text(json.dumps({"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
                                                   "n_kv_heads": a.n_kv_heads}))


def _fuse_wqkv(sd):
    for i in range(100):
        p = f"layers.{i}.attention."
        if p + "wq.weight" not in sd:
            break
        codes = [layouts.unpack_codes(sd.pop(p + f"w{c}.weight"), "cuda-tiled", *shape) for c, shape in
                 (("q", (128, 128)), ("k", (64, 128)), ("v", (64, 128)))]
        sd[p + "wqkv.weight"] = layouts.pack_codes(torch.cat(codes), "cuda-tiled", 8)
        sd[p + "wqkv.scales_and_zeros"] = torch.cat([sd.pop(p + f"w{c}.scales_and_zeros") for c in "qkv"], 1)
    return sd


@pytest.mark.parametrize("layout", ["cpu-avx512", "cpu-avx2", "cpu-scalar", "cuda-tiled", "uint8-hi-even"])
def test_torch_int4_state_dict_import(layout, tmp_path):
    m = _quant_model()
    sd = export_torch_int4(m, dtype=torch.float32, layout=layout)
    if layout == "cuda-tiled":
        sd = _fuse_wqkv(sd)                     # gpt-fast keeps q, k and v fused
    torch.save(sd, tmp_path / "model_int4.g32.pth")
    _params(m, tmp_path)
    ambiguous = layout in ("cpu-avx2", "cpu-scalar")
    if ambiguous:
        with pytest.raises(CheckpointError, match="cpu-avx2 and cpu-scalar equally") as info:
            read_torch_int4(tmp_path / "model_int4.g32.pth")
        assert info.value.option == "layout"             # the scripts turn it into "pass --layout"
        sys.path.insert(0, str(REPO / "scripts"))
        from _common import advice

        assert advice(info.value).endswith("; pass --layout")
    report = []
    args, lay, tensors = read_torch_int4(tmp_path / "model_int4.g32.pth", layout=layout if ambiguous else None,
                                         report=report)
    assert f"layout {layout}" in report[0]
    got = build_quantized(args, {"layers": lay, "tied": {}}, tensors) if not args.tie_embeddings else \
        build_quantized(args, {"layers": lay, "tied": {"output.weight": "tok_embeddings.weight"}}, tensors)
    for name, mod in m.named_modules():
        if isinstance(mod, Int4Linear):
            other = got.get_submodule(name)
            assert torch.equal(other.qweight, mod.qweight) and torch.equal(other.scales, mod.scales) \
                and torch.equal(other.zeros, mod.zeros), name
    tokens = torch.tensor([[1, 5, 9, 33, 70]])
    assert torch.equal(got(tokens), m(tokens))


class TorchOpLinear(nn.Module):
    """What torchchat / torchao run on CPU: torch's packed weight and its int4 op."""

    def __init__(self, in_features, out_features, group_size, dtype):
        super().__init__()
        self.g = group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype))

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).to(self.scales_and_zeros.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.g, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], -1).float()


def test_exported_model_runs_on_torch_op_with_same_logits():
    m = _quant_model(g=64)
    sd = export_torch_int4(m, dtype=torch.float32)
    ref = Transformer(m.args)
    for name, mod in list(ref.named_modules()):
        if name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            ref.set_submodule(name, TorchOpLinear(mod.in_features, mod.out_features, 64, torch.float32))
    ref.load_state_dict(sd, strict=True)
    tokens = torch.tensor([[1, 5, 9, 33, 70, 2, 8]])
    a, b = ref(tokens), m(tokens)
    assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()


class GptFastInt4Linear(nn.Module):
    """gpt-fast's WeightOnlyInt4Linear buffers: always the CUDA tile shape."""

    def __init__(self, in_features, out_features, groupsize=32, inner_k_tiles=8):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features // 8, in_features // (inner_k_tiles * 16), 32,
                                                   inner_k_tiles // 2, dtype=torch.int32))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2,
                                                             dtype=torch.bfloat16))


def test_seed_failure_and_its_migration(tmp_path, capsys):
    # the seed: a CPU-packed int4 checkpoint loaded into gpt-fast's module fails with a bare size mismatch
    lin = Int4Linear.from_linear(nn.Linear(2048, 2048, bias=False), 32)
    sd = {"wq." + k.split(".", 1)[1]: v for k, v in export_torch_int4(nn.ModuleDict({"x": lin})).items()}
    gf = nn.ModuleDict({"wq": GptFastInt4Linear(2048, 2048)})
    with pytest.raises(RuntimeError, match=r"copying a param with shape torch.Size\(\[2048, 1024\]\) from "
                                           r"checkpoint, the shape in current model is torch.Size\(\[256, 16, 32, 4\]\)"):
        gf.load_state_dict(sd)
    # quant4's module names the layout and the way out instead
    with pytest.raises(RuntimeError, match="torch >= 2.6 CPU packed.*scripts/migrate.py"):
        nn.ModuleDict({"wq": Int4Linear(2048, 2048)}).load_state_dict(sd)
    # the migration: CPU bytes -> gpt-fast's CUDA tiles, same codes
    codes = layouts.unpack_codes(sd["wq.weight"], ISA_LAYOUT[torch.backends.cpu.get_cpu_capability()], 2048, 2048)
    fixed = {"wq.weight": layouts.pack_codes(codes, "cuda-tiled", 8), "wq.scales_and_zeros": sd["wq.scales_and_zeros"]}
    gf.load_state_dict(fixed)
    assert torch.equal(layouts.unpack_codes(gf.wq.weight, "cuda-tiled", 2048, 2048),
                       reference.unpack(lin.qweight))


def test_load_model_reads_a_foreign_int4_pth_like_gguf(tmp_path):
    # one policy for other tools' int4 files: load_model reads them as int4 (as it does GGUF Q4_0/Q4_1)
    m = _quant_model()
    torch.save(export_torch_int4(m, layout="cuda-tiled", dtype=torch.float32), tmp_path / "gf.pth")
    _params(m, tmp_path)
    report = []
    loaded = load_model(tmp_path / "gf.pth", report=report)
    assert loaded.kind == "torch-int4" and len(loaded.quantized) == len(
        [n for n, mod in m.named_modules() if isinstance(mod, Int4Linear)])
    assert any("layout cuda-tiled" in line for line in report)
    tokens = torch.tensor([[1, 5, 9, 33]])
    assert torch.equal(loaded.model(tokens), m(tokens))
    assert "looks like cuda-tiled" in describe_checkpoint(torch.load(tmp_path / "gf.pth"), "gf.pth")


# ---- GGUF -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qname", ["Q4_0", "Q4_1"])
def test_gguf_import_matches_dequantized_reference(qname, tmp_path):
    import gguf

    m = Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=256,
                              max_seq_len=64))
    m.init_weights(1)
    deq = gguf_from_float(tmp_path / "m.gguf", m, getattr(gguf.GGMLQuantizationType, qname))
    loaded = load_model(tmp_path / "m.gguf")
    assert loaded.kind == "gguf" and len(loaded.quantized) == 14 and loaded.args.tie_embeddings
    for name in loaded.quantized:
        w = loaded.model.get_submodule(name).dequantize()
        # Q4_0: exact; Q4_1: the offset m + 8 d rounded once to float16
        tol = 0.0 if qname == "Q4_0" else 2e-3 * deq[name + ".weight"].abs().max().item()
        assert (w - deq[name + ".weight"]).abs().max().item() <= tol, name
    ref = Transformer(m.args)
    ref.load_state_dict({**deq, "output.weight": deq["tok_embeddings.weight"]}, strict=False)
    tokens = torch.tensor([[1, 5, 9, 33, 70]])
    a, b = loaded.model(tokens), ref.eval()(tokens)
    assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()


def test_gguf_round_trip_and_tokenizer(tmp_path):
    loaded = load_model()
    m = quantize_model_(loaded.model, 32)
    report = []
    write_gguf(m, loaded.args, tmp_path / "e.gguf", tokenizer=loaded.tokenizer, report=report)
    bound = float(report[-1].rsplit(" ", 1)[1])          # the largest float16 rounding of an offset
    back = load_model(tmp_path / "e.gguf")
    assert back.args == loaded.args and len(back.quantized) == 42
    for name in back.quantized:
        a, b = back.model.get_submodule(name), m.get_submodule(name)
        assert torch.equal(reference.unpack(a.qweight), reference.unpack(b.qweight))    # codes bit-exact
        assert torch.equal(a.scales, b.scales)                                          # d = scale exactly
        assert (a.dequantize() - b.dequantize()).abs().max().item() <= 2 * bound + 1e-7
    text = "Once upon a time, there was a little girl named Lily."
    assert load_tokenizer(back).encode(text) == load_tokenizer(loaded).encode(text)
    with pytest.raises(FileExistsError):
        write_gguf(m, loaded.args, tmp_path / "e.gguf")


def test_gguf_tokenizer_rebuilt_from_vocab(tmp_path):
    pytest.importorskip("google.protobuf")
    import gguf
    from quant4.models.gguf import TOKENIZER_KEY

    loaded = load_model()
    write_gguf(loaded.model, loaded.args, tmp_path / "f.gguf", tokenizer=loaded.tokenizer)
    # the same file as llama.cpp's converter would write it: vocab arrays only, no SentencePiece blob
    r = gguf.GGUFReader(str(tmp_path / "f.gguf"))
    assert r.get_field(TOKENIZER_KEY) is not None
    from quant4.models import gguf as mg
    raw = mg._field
    mg._field = lambda reader, key, default=None: default if key == TOKENIZER_KEY else raw(reader, key, default)
    try:
        back = load_model(tmp_path / "f.gguf")
    finally:
        mg._field = raw
    text = "Once upon a time, Tom and Sue found a big red ball in the park. \"Wow!\" said Sue."
    assert load_tokenizer(back).encode(text) == load_tokenizer(loaded).encode(text)


def test_gguf_rejects_other_architectures(tmp_path):
    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, hidden_dim=128, max_seq_len=16))
    import gguf
    gguf_from_float(tmp_path / "g.gguf", m, gguf.GGMLQuantizationType.Q4_0, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not 'llama'"):
        load_model(tmp_path / "g.gguf")


# ---- scripts/migrate.py -----------------------------------------------------------------------------------------

def _migrate(argv):
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("migrate", REPO / "scripts" / "migrate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_migrate_script_all_directions(tmp_path, capsys):
    loaded = load_model()
    q = quantize_model_(loaded.model, 32)
    from quant4.serialization import save_quantized
    src = tmp_path / "q.safetensors"
    save_quantized(q, src, model_info={"type": "llama", "config": loaded.args.to_dict()})
    tokens = torch.tensor([[1, 430, 440, 261, 397]])
    ref = q(tokens)
    _migrate([str(src), "--out", str(tmp_path / "t.pth"), "--torch-dtype", "fp32", "--torch-layout", "cuda-tiled"])
    _migrate([str(tmp_path / "t.pth"), "--inspect"])
    out = capsys.readouterr().out
    assert "layout cuda-tiled" in out and "42 int4 layers, group size 32" in out
    _migrate([str(tmp_path / "t.pth"), "--out", str(tmp_path / "back.safetensors")])
    assert torch.equal(load_model(tmp_path / "back.safetensors").model(tokens), ref)
    _migrate([str(tmp_path / "back.safetensors"), "--out", str(tmp_path / "m.gguf")])
    _migrate([str(tmp_path / "m.gguf"), "--out", str(tmp_path / "g.safetensors")])
    g = load_model(tmp_path / "g.safetensors").model(tokens)
    assert (g - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    before = (tmp_path / "m.gguf").read_bytes()
    with pytest.raises(SystemExit, match="exists"):
        _migrate([str(tmp_path / "back.safetensors"), "--out", str(tmp_path / "m.gguf")])
    assert (tmp_path / "m.gguf").read_bytes() == before
    with pytest.raises(SystemExit, match="--layout must be one of"):
        _migrate([str(tmp_path / "t.pth"), "--layout", "nope", "--inspect"])


def test_two_exports_in_one_folder_keep_their_own_parameters(tmp_path):
    # the params.json collision: a second .pth export in the same folder once kept the first one's params.json,
    # and importing it back ran the weights with the wrong heads (garbage text, exit 0)
    a = _quant_model(dim=128, n_layers=2, seed=1)
    b = Transformer(ModelArgs(dim=128, n_layers=3, n_heads=8, n_kv_heads=8, vocab_size=96, hidden_dim=256,
                              max_seq_len=64))
    b.init_weights(2)
    b = quantize_model_(b.eval(), 32)
    for name, m in (("a", a), ("b", b)):
        save_quantized(m, tmp_path / f"{name}.safetensors", model_info={"type": "llama", "config": m.args.to_dict()})
        _migrate([str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / f"{name}.pth"),
                  "--torch-dtype", "fp32", "--torch-layout", "cuda-tiled"])
    assert (tmp_path / "a.params.json").exists() and (tmp_path / "b.params.json").exists()
    tokens = torch.tensor([[1, 5, 9, 33]])
    for name, m in (("a", a), ("b", b)):
        loaded = load_model(tmp_path / f"{name}.pth")
        assert (loaded.args.n_heads, loaded.args.n_layers) == (m.args.n_heads, m.args.n_layers)
        assert torch.allclose(loaded.model(tokens), m(tokens), atol=1e-4)
    # a params file that disagrees with the tensors is refused, naming the field
    (tmp_path / "b.params.json").write_text((tmp_path / "a.params.json").read_text())
    with pytest.raises(CheckpointError, match="n_layers=2 but the tensors have 3"):
        load_model(tmp_path / "b.pth")


def test_migrate_inspect_describes_any_checkpoint(capsys):
    from quant4.models.load import EMBEDDED_MODEL

    assert _migrate([str(EMBEDDED_MODEL), "--inspect"]) == 0
    out = capsys.readouterr().out
    assert "no int4 layers (a float checkpoint)" in out and "1.31 M float params" in out
    assert "config: dim 128, 6 layers, 4 heads (2 kv), hidden 384, vocab 1024, context 512" in out
    assert "tokenizer: " in out and "tokenizer.model" in out


def test_gguf_round_trip_says_which_int4_layers_become_float(tmp_path, capsys):
    # GGUF blocks hold 32 inputs: a layer with in_features 172 cannot be Q4_1; export and import both say so
    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=172, max_seq_len=32))
    m.init_weights(0)
    q = quantize_model_(m.eval(), 32)
    out_report, in_report = [], []
    write_gguf(q, m.args, tmp_path / "k.gguf", report=out_report)
    assert any("layers.0.feed_forward.w2: in_features 172" in r and "F32" in r for r in out_report)
    loaded = load_model(tmp_path / "k.gguf", report=in_report)
    assert any(r.startswith("1 projections are float in the file") and "feed_forward.w2" in r for r in in_report)
    assert len(loaded.quantized) == 6 and "layers.0.feed_forward.w2" not in loaded.quantized
