"""Adversarial cases around the kernels: module state that could go stale, program transforms the kernels cannot
see, files whose metadata claims sizes or types the data does not back, half-done model surgery. Every case must
end in the right numbers or a clean, named error: never stale results, garbage, a crash or a huge allocation."""
import copy
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import quant4
from quant4.models.gguf import write_gguf
from quant4.models.hf import write_hf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.load import load_model
from quant4 import Int4Linear, quantize_model_
from quant4.serialization import FormatError, save_quantized
from helpers import REPO

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128, max_seq_len=32)
TOK = REPO / "models" / "tiny" / "tokenizer.model"


def _pair(K=96, N=40, bias=True):
    """Two Int4Linear layers of one shape with different weights, and an input."""
    a = Int4Linear.from_linear(nn.Linear(K, N, bias=bias), 32)
    b = Int4Linear.from_linear(nn.Linear(K, N, bias=bias), 32)
    return a, b, torch.randn(3, K)


# ---- module state: the kernels' cached views never outlive what they view ------------------------------------

def _swap_by_load_state_dict(m, other):
    m.load_state_dict(other.state_dict())


def _swap_by_data(m, other):
    for name in ("qweight", "scales", "zeros", "bias"):
        getattr(m, name).data = getattr(other, name).clone()


def _swap_by_set(m, other):
    with torch.no_grad():
        for name in ("qweight", "scales", "zeros", "bias"):
            getattr(m, name).set_(getattr(other, name).clone())


def _swap_in_place(m, other):
    with torch.no_grad():
        for name in ("qweight", "scales", "zeros", "bias"):
            getattr(m, name).copy_(getattr(other, name))


def _swap_assign(m, other):
    m.load_state_dict(other.state_dict(), assign=True)


@pytest.mark.parametrize("swap", [_swap_by_load_state_dict, _swap_by_data, _swap_by_set, _swap_in_place,
                                  _swap_assign])
@pytest.mark.parametrize("copy_kind", ["same", "deepcopy", "torch.save", "pickle"])
def test_new_weights_are_used_after_any_copy_and_swap(swap, copy_kind):
    m, other, x = _pair()
    m(x)                                   # build the cache
    if copy_kind == "deepcopy":
        m = copy.deepcopy(m)
    elif copy_kind == "torch.save":
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m = torch.load(buf, weights_only=False)
    elif copy_kind == "pickle":
        m = pickle.loads(pickle.dumps(m))
    swap(m, other)
    assert torch.equal(m(x), other(x))


def test_share_memory_then_forward():
    m, _, x = _pair()
    before = m(x)
    m.share_memory()                       # moves every buffer to new (shared) memory: the old views are freed
    assert all(t.is_shared() for t in m.buffers())
    assert torch.equal(m(x), before)


def test_pickle_carries_the_weights_once():
    m, _, x = _pair(K=1024, N=256)
    cold = len(pickle.dumps(m))
    m(x)
    assert "_prep" not in copy.deepcopy(m).__dict__
    assert len(pickle.dumps(m)) == cold      # the kernel views are not pickled
    stored = sum(t.numel() * t.element_size() for t in m.buffers())
    assert cold < stored * 1.1


# ---- program transforms that cannot see the kernels are refused, never garbage -------------------------------

def test_jit_trace_is_refused():
    m, _, x = _pair()
    m(x)
    with pytest.raises(NotImplementedError, match="quant4.*torch.jit.trace"):
        torch.jit.trace(m, x)


def test_jit_script_is_refused_for_the_layer_and_a_model_holding_it():
    m, _, _ = _pair()
    with pytest.raises(NotImplementedError, match="quant4.*torch.jit.script"):
        torch.jit.script(m)
    with pytest.raises(NotImplementedError, match="quant4"):
        torch.jit.script(nn.Sequential(nn.ReLU(), m))


def test_functorch_and_forward_ad_are_refused():
    from torch.autograd import forward_ad as fwAD

    m, _, x = _pair()
    with pytest.raises(NotImplementedError, match="quant4.*torch.func"):
        torch.func.vmap(m)(x[:, None])
    with pytest.raises(NotImplementedError, match="quant4"):
        torch.func.jvp(m, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="quant4.*forward-mode"):
        with fwAD.dual_level():
            m(fwAD.make_dual(x, torch.ones_like(x)))
    # reverse mode to the input still works, and plain calls inside an unused dual level too
    xr = x.clone().requires_grad_()
    m(xr).sum().backward()
    assert torch.allclose(xr.grad, m.dequantize().sum(0).expand_as(x), atol=1e-5)
    with fwAD.dual_level():
        assert torch.equal(m(x), m(x))


# ---- quantize_model_: all or nothing; a shared layer once ----------------------------------------------------

def test_quantize_model_is_all_or_nothing():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[5, 7] = float("inf")
    with pytest.raises(ValueError, match=r"^2: .*non-finite.*left unchanged"):
        quantize_model_(model, filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
    assert all(type(layer) is nn.Linear for layer in model)
    assert not hasattr(model, "quant4_report")


def test_a_linear_shared_under_two_names_is_quantized_once():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    model.add_module("again", model[0])
    quantize_model_(model, filter_fn=lambda mod, name: isinstance(mod, nn.Linear))
    assert isinstance(model[0], Int4Linear) and model.again is model[0]
    names = sorted(r.name for r in model.quant4_report if r.swapped)
    assert names == ["0", "1", "again"]
    assert "shared with again" in next(r.reason for r in model.quant4_report if r.name == "0")


# ---- files: non-finite values, wrong JSON types, sizes the data does not back --------------------------------

def _quantized_file(path, config=None, mutate=None):
    m = Transformer(ARGS)
    m.init_weights(0)
    q = quantize_model_(m.eval(), 32)
    if mutate:
        mutate(q)
    save_quantized(q, path, model_info={"type": "llama", "config": config or ARGS.to_dict()})
    return path


def _set_scale_nan(q):
    q.layers[0].feed_forward.w2.scales[3, 1] = float("nan")


def _set_zero_inf(q):
    q.layers[0].attention.wk.zeros[0, 0] = float("-inf")


def _set_norm_nan(q):
    with torch.no_grad():
        q.norm.weight[0] = float("nan")


@pytest.mark.parametrize("mutate, where", [(_set_scale_nan, "feed_forward.w2.scales"),
                                           (_set_zero_inf, "attention.wk.zeros"), (_set_norm_nan, "norm.weight")])
def test_non_finite_values_in_a_quant4_file_are_refused(tmp_path, mutate, where):
    path = _quantized_file(tmp_path / "q.safetensors", mutate=mutate)
    with pytest.raises(FormatError, match=f"{where}.*non-finite"):
        load_model(path)


def test_rope_theta_zero_is_refused(tmp_path):
    path = _quantized_file(tmp_path / "q.safetensors", config=dict(ARGS.to_dict(), rope_theta=0.0))
    with pytest.raises(ValueError, match="rope_theta"):
        load_model(path)


def _rewrite_quant4_meta(path, edit):
    """Rewrite the JSON inside a quant4 file's header (same tensors), as a damaged or hostile writer would."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["quant4"])
    edit(meta)
    header["__metadata__"]["quant4"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


WRONG_TYPES = [["a", 1], {"x": 1}, "text", 2.5, None, True, -3]
QUANT4_FIELDS = ["format_version", "layers", "tied", "model", "tokenizer", "model.type", "model.config",
                 "model.config.dim", "model.config.n_heads", "model.config.rope_theta", "model.config.tie_embeddings",
                 "layers.0", "layers.0.in_features", "layers.0.group_size", "layers.0.out_features", "tied.0"]


def _set_field(meta, dotted, value):
    parts = dotted.split(".")
    obj = meta
    for p in parts[:-1]:
        obj = obj[p] if p != "0" else obj[next(iter(obj))]
    key = parts[-1] if parts[-1] != "0" else next(iter(obj), "x")
    obj[key] = value


@pytest.mark.parametrize("field", QUANT4_FIELDS)
def test_quant4_metadata_of_the_wrong_type_is_a_format_error(tmp_path, field):
    base = _quantized_file(tmp_path / "base.safetensors", config=dict(ARGS.to_dict(), tie_embeddings=True))
    for i, value in enumerate(WRONG_TYPES):
        path = tmp_path / f"q{i}.safetensors"
        path.write_bytes(base.read_bytes())
        if field == "tied.0":
            _rewrite_quant4_meta(path, lambda m: m["tied"].__setitem__("output.weight", value))
        else:
            _rewrite_quant4_meta(path, lambda m: _set_field(m, field, value))
        try:
            loaded = load_model(path)
        except ValueError:
            continue                       # FormatError / CheckpointError / a named config error
        except Exception as exc:           # TypeError, KeyError, AttributeError: a crash of the reader
            pytest.fail(f"{field}={value!r}: {type(exc).__name__}: {exc}")
        loaded.model(torch.tensor([[1, 2]]))


HF_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
             "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
             "model_type"]


@pytest.mark.parametrize("field", HF_FIELDS)
def test_hf_config_of_the_wrong_type_is_a_checkpoint_error(tmp_path, field):
    m = Transformer(ARGS)
    m.init_weights(0)
    write_hf(tmp_path, ARGS, {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")})
    cfg = json.loads((tmp_path / "config.json").read_text())
    for value in WRONG_TYPES:
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{field: value})))
        try:
            loaded = load_model(tmp_path)
        except ValueError:
            continue
        except Exception as exc:
            pytest.fail(f"{field}={value!r}: {type(exc).__name__}: {exc}")
        loaded.model(torch.tensor([[1, 2]]))


# Sizes that a header claims but the data does not back must not be allocated. Each loader runs in a child process
# whose peak RSS growth is measured after a warm-up load: it must stay within 16 MB + 4x the file, whatever the
# config claims (measured: 0-7 MB for 40-170 KB files claiming dim 65,536 and 2^20 positions).
_MEASURE = textwrap.dedent("""
    import resource, sys, torch
    sys.path.insert(0, {repo!r})
    from quant4.models.load import load_model
    import quant4.models.gguf, quant4.models.hf  # noqa: F401  imports and torch's first-use set-up are not data:
    load_model()                                # warm both up on the embedded model before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_model({path!r})
        outcome = "loaded"
    except ValueError as exc:
        outcome = "refused: " + str(exc)[:200]
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(grew * 1024, outcome)
""")


def _peak_growth(path):
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(repo=str(REPO), path=str(path))],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grew, outcome = out.stdout.strip().split(" ", 1)
    return int(grew), outcome


HUGE = dict(dim=1 << 16, n_heads=1, n_kv_heads=1, max_seq_len=1 << 20)


def _huge_quant4(path):
    return _quantized_file(path, config=dict(ARGS.to_dict(), **HUGE, hidden_dim=1 << 16))


def _huge_hf(path):
    m = Transformer(ARGS)
    m.init_weights(0)
    write_hf(path, ARGS, {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")})
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_size=1 << 16, num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=1 << 20)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _huge_gguf(path):
    import gguf

    m = quantize_model_(Transformer(ARGS).eval(), 32)
    big = ModelArgs(dim=1 << 16, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=64, hidden_dim=1 << 16,
                    max_seq_len=1 << 20)
    write_gguf(m, ARGS, path, tokenizer_path=TOK)
    # same tensors, a header that claims the big shapes
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    from quant4.models.gguf import add_llama_metadata

    add_llama_metadata(w, big)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_shape=None if t.tensor_type in (gguf.GGMLQuantizationType.F32,) else
                     t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (path.parent / (path.name + ".tmp")).replace(path)
    return path


@pytest.mark.parametrize("make", [_huge_quant4, _huge_hf, _huge_gguf], ids=["quant4", "hf", "gguf"])
def test_claimed_sizes_are_not_allocated(tmp_path, make):
    target = tmp_path / "huge" if make is _huge_hf else tmp_path / ("huge" + (".gguf" if make is _huge_gguf
                                                                           else ".safetensors"))
    if make is _huge_hf:
        target.mkdir()
    path = make(target)
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    grew, outcome = _peak_growth(path)
    assert outcome.startswith("refused"), outcome
    assert grew < (16 << 20) + 4 * size, f"loading a {size}-byte file grew RSS by {grew >> 20} MB ({outcome})"


# ---- thread counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [100000, 1 << 40])
def test_absurd_thread_counts_are_refused(n):
    with pytest.raises(ValueError, match="num_threads"):
        quant4.set_num_threads(n)
    with pytest.raises(ValueError, match="num_threads"):
        Int4Linear(32, 32, num_threads=n)
    m, _, x = _pair()
    with pytest.raises(ValueError, match="num_threads"):
        quant4.matmul(x, m.qweight, m.scales, m.zeros, 32, 96, num_threads=n)


GGUF_KEYS = ["general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length",
             "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count",
             "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_space_prefix",
             "quant4.tokenizer.sentencepiece"]


def _gguf_wrong_values():
    import gguf

    T = gguf.GGUFValueType
    return [("text", T.STRING), (7, T.UINT32), (-2.5, T.FLOAT32), (True, T.BOOL), ([1, 2, 3], T.ARRAY),
            (["a", "b"], T.ARRAY), ([0.5] * 3, T.ARRAY)]


def _gguf_files_with(tmp_path, monkeypatch, key, *, drop=()):
    """One GGUF file per wrong value of `key` (keys in `drop` left out), written by the gguf package."""
    import gguf

    model = quantize_model_(Transformer(ARGS).eval(), 32)
    original = gguf.GGUFWriter.add_key_value
    for i, (value, vtype) in enumerate(_gguf_wrong_values()):
        def patched(self, k, v, t, *rest, **kw):
            if k in drop:
                return None
            if k == key:
                return original(self, k, value, vtype)
            return original(self, k, v, t, *rest, **kw)

        monkeypatch.setattr(gguf.GGUFWriter, "add_key_value", patched)
        path = tmp_path / f"m{i}.gguf"
        write_gguf(model, ARGS, path, tokenizer_path=TOK)
        monkeypatch.setattr(gguf.GGUFWriter, "add_key_value", original)
        yield value, path


def _assert_each_loads_or_fails_cleanly(key, value_paths):
    """Each file loads (model, forward, tokenizer) or fails with ValueError/OSError; anything else fails."""
    from quant4.models.load import load_tokenizer

    for value, path in value_paths:
        try:
            loaded = load_model(path)
            loaded.model(torch.tensor([[1, 2]]))
            load_tokenizer(loaded)
        except (ValueError, OSError):
            continue
        except Exception as exc:
            pytest.fail(f"{key}={value!r}: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("key", GGUF_KEYS)
def test_gguf_metadata_of_the_wrong_type_is_a_checkpoint_error(tmp_path, monkeypatch, key):
    from quant4.models.gguf import TOKENIZER_KEY

    key = TOKENIZER_KEY if key == "quant4.tokenizer.sentencepiece" else key
    _assert_each_loads_or_fails_cleanly(key, _gguf_files_with(tmp_path, monkeypatch, key))


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                                 "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_space_prefix"])
def test_gguf_vocabulary_fields_of_the_wrong_type(tmp_path, monkeypatch, key):
    # without quant4's embedded SentencePiece blob the tokenizer is rebuilt from tokenizer.ggml.*
    from quant4.models.gguf import TOKENIZER_KEY

    _assert_each_loads_or_fails_cleanly(key, _gguf_files_with(tmp_path, monkeypatch, key, drop=(TOKENIZER_KEY,)))


@pytest.mark.parametrize("field", ["n_heads", "n_kv_heads", "norm_eps", "rope_theta", "max_seq_len"])
def test_pt_params_of_the_wrong_type_are_a_checkpoint_error(tmp_path, field):
    m = Transformer(ARGS)
    m.init_weights(0)
    sd = {k: v.detach() for k, v in m.state_dict().items() if not k.startswith("rope")}
    for i, value in enumerate(WRONG_TYPES):
        path = tmp_path / f"m{i}.pt"
        torch.save({"model": sd, "model_args": dict({"n_heads": 4, "n_kv_heads": 2}, **{field: value})}, path)
        try:
            load_model(path).model(torch.tensor([[1, 2]]))
        except ValueError:
            continue
        except Exception as exc:
            pytest.fail(f"{field}={value!r}: {type(exc).__name__}: {exc}")
