"""A fixed corpus of damaged checkpoints for every loader (llama2.c, .pt, quant4 and float safetensors, GGUF,
other tools' int4 .pth, Hugging Face directories) and of bad script arguments. Each case must end in a clean
ValueError / OSError (or, for damage inside tensor data, a model that loads and runs): never a crash, a
hang or a huge allocation. tests/test_fuzz_loaders.py adds random damage on top (hypothesis)."""
import json
import resource
import struct

import pytest
import torch

from quant4.models.gguf import write_gguf
from quant4.models.hf import write_hf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import write_llama2c
from quant4.models.load import load_model
from quant4.interop.torch_int4 import export_torch_int4
from quant4 import quantize_model_
from quant4.serialization import save_quantized
from helpers import REPO

CLEAN = (ValueError, OSError)
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128, max_seq_len=32)
TOK = REPO / "models" / "tiny" / "tokenizer.model"


def _float_model():
    m = Transformer(ARGS)
    m.init_weights(0)
    return m.eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """name -> bytes of one good file of every kind."""
    d = tmp_path_factory.mktemp("good")
    m = _float_model()
    sd = {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")}
    write_llama2c(d / "v0.bin", ARGS, sd, version=0)
    write_llama2c(d / "v1.bin", ARGS, sd, version=1)
    torch.save({"model": sd, "model_args": {"n_heads": 4, "n_kv_heads": 2}}, d / "m.pt")
    q = quantize_model_(_float_model(), 32)
    save_quantized(q, d / "q.safetensors", model_info={"type": "llama", "config": ARGS.to_dict()})
    write_gguf(q, ARGS, d / "q.gguf", tokenizer_path=TOK)
    torch.save(export_torch_int4(q, layout="cuda-tiled", inner_k_tiles=2), d / "gf.pth")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _try(path):
    """Load (and run) a file; a clean error or a working model pass, anything else fails the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))       # a "huge allocation" would fail loudly
    try:
        loaded = load_model(path)
        out = loaded.model(torch.tensor([[1, 2, 3]]))
        assert out.shape == (1, 3, loaded.args.vocab_size)
        return None
    except CLEAN as exc:
        return exc
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---- truncations and byte damage, for every kind -------------------------------------------------------------

FILES = ["v0.bin", "v1.bin", "m.pt", "q.safetensors", "q.gguf", "gf.pth"]
CUTS = [0, 1, 3, 4, 7, 8, 12, 23, 24, 40, 100, 255, 256, 300, 1000, -4096, -100, -1]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("cut", CUTS)
def test_truncated(tmp_path, good, name, cut):
    raw = good[name]
    if abs(cut) >= len(raw):
        pytest.skip("file shorter than the cut")
    path = tmp_path / ("x" + name[name.index("."):])
    path.write_bytes(raw[:cut])
    exc = _try(path)
    assert exc is not None, f"{name} truncated to {len(raw[:cut])} of {len(raw)} bytes loaded"


FLIPS = [0, 1, 4, 5, 8, 9, 16, 20, 28, 33, 64, 130]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("offset", FLIPS)
def test_header_bytes_flipped(tmp_path, good, name, offset):
    raw = bytearray(good[name])
    raw[offset] ^= 0xFF
    path = tmp_path / ("x" + name[name.index("."):])
    path.write_bytes(bytes(raw))
    _try(path)          # either refused cleanly or still a consistent model that runs


# ---- targeted damage ------------------------------------------------------------------------------------------

def _st_with_meta(good, edit):
    """The quant4 safetensors file with its JSON header rewritten by edit(header_dict)."""
    raw = good["q.safetensors"]
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


def _quant4_meta(fn):
    def edit(h):
        meta = json.loads(h["__metadata__"]["quant4"])
        fn(meta)
        h["__metadata__"]["quant4"] = json.dumps(meta)
    return edit


def _tensor(key, fn):
    def edit(h):
        fn(h[key])
    return edit


SAFETENSORS_CASES = {
    "header not json": lambda g: struct.pack("<Q", 5) + b"{nope" + g["q.safetensors"][13:],
    "header is a list": lambda g: struct.pack("<Q", 2) + b"[]",
    "header length 2**63": lambda g: struct.pack("<Q", 1 << 63) + g["q.safetensors"][8:],
    "header length 0": lambda g: struct.pack("<Q", 0) + g["q.safetensors"][8:],
    "metadata not object": lambda g: _st_with_meta(g, lambda h: h.__setitem__("__metadata__", "x")),
    "no quant4 key": lambda g: _st_with_meta(g, lambda h: h["__metadata__"].pop("quant4")),
    "quant4 not json": lambda g: _st_with_meta(g, lambda h: h["__metadata__"].__setitem__("quant4", "{")),
    "quant4 is a list": lambda g: _st_with_meta(g, lambda h: h["__metadata__"].__setitem__("quant4", "[]")),
    "format other": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.__setitem__("format", "gptq"))),
    "version 99": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.__setitem__("format_version", 99))),
    "version string": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.__setitem__("format_version", "1"))),
    "layers missing": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.pop("layers"))),
    "layers a list": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.__setitem__("layers", []))),
    "model missing": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m.pop("model"))),
    "model type gpt2": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"].__setitem__("type", "gpt2"))),
    "config missing": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"].pop("config"))),
    "config dim 10**12": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"]["config"].__setitem__("dim", 10**12))),
    "config layers 10**9": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["model"]["config"].__setitem__("n_layers", 10**9))),
    "config seq 2**40": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["model"]["config"].__setitem__("max_seq_len", 2**40))),
    "config heads 0": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"]["config"].__setitem__("n_heads", 0))),
    "config vocab -1": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"]["config"].__setitem__("vocab_size", -1))),
    "config unknown key": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["model"]["config"].__setitem__("moe", 8))),
    "group size 48": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"]["layers.0.attention.wq"].__setitem__("group_size", 48))),
    "in_features string": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"]["layers.0.attention.wq"].__setitem__("in_features", "64"))),
    "in_features 2**40": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"]["layers.0.attention.wq"].__setitem__("in_features", 2**40))),
    "out_features wrong": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"]["layers.0.attention.wq"].__setitem__("out_features", 65))),
    "layer not in model": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"].__setitem__("layers.7.attention.wq", m["layers"]["layers.0.attention.wq"]))),
    "layer entry a string": lambda g: _st_with_meta(g, _quant4_meta(
        lambda m: m["layers"].__setitem__("layers.0.attention.wq", "x"))),
    "tied to missing": lambda g: _st_with_meta(g, _quant4_meta(lambda m: m["tied"].__setitem__("output.weight", "nope"))),
    "tensor dtype F32": lambda g: _st_with_meta(g, _tensor("layers.0.attention.wq.qweight",
                                                           lambda t: t.__setitem__("dtype", "F32"))),
    "tensor shape wrong": lambda g: _st_with_meta(g, _tensor("layers.0.attention.wq.scales",
                                                             lambda t: t.__setitem__("shape", [64, 1]))),
    "tensor offsets beyond file": lambda g: _st_with_meta(g, _tensor("layers.0.attention.wq.qweight",
                                                                     lambda t: t.__setitem__("data_offsets", [0, 2**40]))),
    "tensor offsets reversed": lambda g: _st_with_meta(g, _tensor("layers.0.attention.wq.qweight",
                                                                  lambda t: t.__setitem__("data_offsets", [64, 0]))),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_quant4_file_damage(tmp_path, good, case):
    path = tmp_path / "x.safetensors"
    path.write_bytes(SAFETENSORS_CASES[case](good))
    assert _try(path) is not None, case


def _gguf_header(good, version=None, n_tensors=None, n_kv=None, magic=None):
    raw = bytearray(good["q.gguf"])
    if magic is not None:
        raw[:4] = magic
    if version is not None:
        raw[4:8] = struct.pack("<I", version)
    if n_tensors is not None:
        raw[8:16] = struct.pack("<Q", n_tensors)
    if n_kv is not None:
        raw[16:24] = struct.pack("<Q", n_kv)
    return bytes(raw)


def _gguf_model(tmp_path, args=ARGS, arch="llama", drop=(), meta=None, qtype="Q4_0", edit=None):
    """A GGUF made with the gguf package, optionally broken: wrong arch, missing tensors, bad keys."""
    import gguf

    from quant4.models.gguf import add_llama_metadata, gguf_name

    m = Transformer(args)
    m.init_weights(0)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), arch=arch)
    add_llama_metadata(w, args)
    for key, val in (meta or {}).items():
        w.add_uint32(key, val) if isinstance(val, int) else w.add_string(key, val)
    for key, t in m.state_dict().items():
        if key.startswith("rope") or key == "output.weight" or key in drop:
            continue
        name = key[: -len(".weight")]
        arr = t.detach().float().numpy()
        if edit:
            arr = edit(name, arr)
        if name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return (tmp_path / "g.gguf").read_bytes()


GGUF_CASES = {
    "magic GGML": (lambda g, t: _gguf_header(g, magic=b"GGML"), "not a GGUF file"),
    "magic zero": (lambda g, t: _gguf_header(g, magic=b"\0\0\0\0"), "not a GGUF file"),
    "version 1": (lambda g, t: _gguf_header(g, version=1), "version 1"),
    "version 4": (lambda g, t: _gguf_header(g, version=4), "version 4"),
    "version 2**31": (lambda g, t: _gguf_header(g, version=2**31), "version"),
    "tensors 2**40": (lambda g, t: _gguf_header(g, n_tensors=2**40), "claims"),
    "keys 2**40": (lambda g, t: _gguf_header(g, n_kv=2**40), "claims"),
    "tensors 2**63": (lambda g, t: _gguf_header(g, n_tensors=2**63), "claims"),
    "tensors +1": (lambda g, t: _gguf_header(g, n_tensors=12), None),
    "tensors -1": (lambda g, t: _gguf_header(g, n_tensors=10), None),
    "keys +5": (lambda g, t: _gguf_header(g, n_kv=40), None),
    "keys 0": (lambda g, t: _gguf_header(g, n_kv=0), None),
    "arch gpt2": (lambda g, t: _gguf_model(t, arch="gpt2"), "architecture 'gpt2' is not 'llama'"),
    "arch qwen2": (lambda g, t: _gguf_model(t, arch="qwen2"), "architecture 'qwen2' is not 'llama'"),
    "arch falcon": (lambda g, t: _gguf_model(t, arch="falcon"), "is not 'llama'"),
    "no token_embd": (lambda g, t: _gguf_model(t, drop=("tok_embeddings.weight",)), "token_embd"),
    "missing wq": (lambda g, t: _gguf_model(t, drop=("layers.0.attention.wq.weight",)), "missing"),
    "missing norm": (lambda g, t: _gguf_model(t, drop=("norm.weight",)), "missing"),
    "block_count 0": (lambda g, t: _gguf_model(t, meta={"llama.block_count": 0}), None),
    "block_count 2**30": (lambda g, t: _gguf_model(t, meta={"llama.block_count": 2**30}), None),
    "block_count 3": (lambda g, t: _gguf_model(t, meta={"llama.block_count": 3}), "claims 3 layers"),
    "heads 0": (lambda g, t: _gguf_model(t, meta={"llama.attention.head_count": 0}), None),
    "heads 3": (lambda g, t: _gguf_model(t, meta={"llama.attention.head_count": 3}), None),
    "kv heads 3": (lambda g, t: _gguf_model(t, meta={"llama.attention.head_count_kv": 3}), None),
    "context 2**31": (lambda g, t: _gguf_model(t, meta={"llama.context_length": 2**31}), None),
    "embedding 2**24": (lambda g, t: _gguf_model(t, meta={"llama.embedding_length": 2**24}), None),
    "ffn 7": (lambda g, t: _gguf_model(t, meta={"llama.feed_forward_length": 7}), None),
    "rope dims 3": (lambda g, t: _gguf_model(t, meta={"llama.rope.dimension_count": 3}), None),
    "arch key a number": (lambda g, t: _gguf_model(t, meta={"general.architecture": 5}), None),
    "Q4_1 projections with vocab mismatch": (lambda g, t: _gguf_model(
        t, args=ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=96),
        meta={"llama.feed_forward_length": 128}, qtype="Q4_1"), None),
    "Q8_0 projections": (lambda g, t: _gguf_model(t, qtype="Q8_0"), "LOADS"),
    "nan norm": (lambda g, t: _gguf_model(t, edit=lambda n, a: a * float("nan") if n == "norm" else a), "LOADS"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_damage(tmp_path, good, case):
    make, match = GGUF_CASES[case]
    data = make(good, tmp_path)
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    exc = _try(path)
    if match == "LOADS":
        assert exc is None, exc          # legal files, not damage: Q8_0 is re-quantized, NaN floats are data
        return
    assert exc is not None, case
    if match:
        assert match in str(exc), str(exc)


def _int4_pth(tmp_path, good, edit, params='{"n_heads": 4}'):
    sd = torch.load(__import__("io").BytesIO(good["gf.pth"]), weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "x.pth")
    if params is not None:
        (tmp_path / "params.json").write_text(params)
    return tmp_path / "x.pth"


INT4_PTH_CASES = {
    "no params": (lambda sd: None, None, "n_heads"),
    "params not json": (lambda sd: None, "{", None),
    "params n_heads 0": (lambda sd: None, '{"n_heads": 0}', "n_heads"),
    "sz rank 2": (lambda sd: sd.__setitem__("layers.0.attention.wq.scales_and_zeros",
                                            sd["layers.0.attention.wq.scales_and_zeros"][..., 0]), '{"n_heads": 4}', "K/g, N, 2"),
    "sz int": (lambda sd: sd.__setitem__("layers.0.attention.wq.scales_and_zeros",
                                         sd["layers.0.attention.wq.scales_and_zeros"].int()), '{"n_heads": 4}', "float"),
    "packed float": (lambda sd: sd.__setitem__("layers.0.attention.wq.weight",
                                               sd["layers.0.attention.wq.weight"].float()), '{"n_heads": 4}', "uint8 or int32"),
    "packed halved": (lambda sd: sd.__setitem__("layers.0.attention.wq.weight",
                                                sd["layers.0.attention.wq.weight"][:4]), '{"n_heads": 4}', None),
    "weight missing": (lambda sd: sd.pop("layers.0.attention.wq.weight"), '{"n_heads": 4}', "no packed tensor"),
    "groups 3": (lambda sd: sd.__setitem__("layers.0.attention.wq.scales_and_zeros",
                                           torch.zeros(3, 64, 2)), '{"n_heads": 4}', None),
    "sz inf": (lambda sd: sd["layers.0.attention.wq.scales_and_zeros"].fill_(float("inf")), '{"n_heads": 4}', None),
    "random codes": (lambda sd: [v.random_(-2**31, 2**31 - 1) for k, v in sd.items() if v.dtype == torch.int32],
                     '{"n_heads": 4}', "Cannot pick the layout"),
    "no embeddings": (lambda sd: sd.pop("tok_embeddings.weight"), '{"n_heads": 4}', None),
}


@pytest.mark.parametrize("case", list(INT4_PTH_CASES))
def test_foreign_int4_damage(tmp_path, good, case):
    from quant4.models.torch_int4 import read_torch_int4

    edit, params, match = INT4_PTH_CASES[case]
    path = _int4_pth(tmp_path, good, edit, params)
    with pytest.raises(CLEAN) as info:
        read_torch_int4(path)
    if match:
        assert match in str(info.value), str(info.value)
    assert _try(path) is not None            # load_model refuses other tools' int4 outright


HF_CASES = {
    "config not json": lambda d: (d / "config.json").write_text("{"),
    "config a list": lambda d: (d / "config.json").write_text("[]"),
    "no hidden_size": lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "hidden_size"})),
    "hidden_size 2**40": lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "hidden_size": 2**40})),
    "no weights": lambda d: [p.unlink() for p in d.glob("*.safetensors")],
    "weights truncated": lambda d: [p.write_bytes(p.read_bytes()[:200]) for p in d.glob("*.safetensors")],
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_directory_damage(tmp_path, case):
    m = _float_model()
    write_hf(tmp_path, ARGS, {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")})
    HF_CASES[case](tmp_path)
    assert _try(tmp_path) is not None, case


# ---- scripts: bad arguments end in a message, not a traceback ----------------------------------------------------

def _script(name):
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SCRIPT_CASES = [
    ("quantize", ["--out", "x.bin"]), ("quantize", ["--out", "{tmp}/q.safetensors", "--group-size", "48"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--threads", "0"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--checkpoint", "{tmp}/missing.bin"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--method", "awq"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--include", "nothing", "--exclude", "wq", "wk", "wv", "wo",
                  "w1", "w2", "w3"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--method", "gptq", "--calibration", "{tmp}/missing.txt"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--method", "gptq", "--calibration", "{tmp}/empty.txt"]),
    ("quantize", ["--out", "{tmp}/q.safetensors", "--method", "gptq", "--calib-sequences", "0"]),
    ("generate", ["--max-new-tokens", "-1"]), ("generate", ["--temperature", "-1"]),
    ("generate", ["--top-p", "1.5"]), ("generate", ["--checkpoint", "{tmp}/missing.bin"]),
    ("generate", ["--threads", "-2"]), ("generate", ["--top-k", "-3"]),
    ("eval", ["--tokens", "1"]), ("eval", ["--window", "1"]), ("eval", ["--method", "awq"]),
    ("eval", ["--checkpoint", "embedded", "{tmp}/missing.bin", "--tokenizer", "-"]),
    ("eval", ["--text", "{tmp}/missing.txt"]),
    ("migrate", ["{tmp}/missing.pth", "--inspect"]), ("migrate", ["{tmp}/empty.txt", "--inspect"]),
    ("migrate", ["{repo}/models/tiny/model.safetensors", "--out", "{tmp}/x.gguf"]),   # float: nothing to migrate
    ("migrate", ["{repo}/models/tiny/model.safetensors", "--out", "{tmp}/x.onnx"]),
    ("migrate", ["{repo}/models/tiny/model.safetensors"]),
    ("migrate", ["{repo}/models/tiny/model.safetensors", "--layout", "avx3", "--inspect"]),
]


@pytest.mark.parametrize("script,argv", SCRIPT_CASES, ids=[f"{s}:{' '.join(a)}" for s, a in SCRIPT_CASES])
def test_script_bad_arguments(tmp_path, script, argv, capsys):
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(tmp=tmp_path, repo=REPO) for a in argv]
    with pytest.raises(SystemExit) as info:
        _script(script).main(argv)
    assert info.value.code not in (0, None)
    msg = str(info.value.code) + capsys.readouterr().err
    assert msg.strip() and "Traceback" not in msg
