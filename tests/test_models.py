"""Llama model, checkpoint loaders (on files the tests write), quantized files, generation."""
import json
import struct

import pytest
import torch

from quant4.models.evaluate import encode_blocks, heldout_text, perplexity, perplexity_decode
from quant4.models.generate import generate, sample
from quant4.models.hf import permute, read_hf, unpermute, write_hf
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.llama2c import read_llama2c, write_llama2c
from quant4.models.load import CheckpointError
from quant4.models.load import EMBEDDED_MODEL, load_model, load_tokenizer
from quant4 import Int4Linear, quantize_model_
from quant4.serialization import FormatError, read_quantized, save_quantized
from helpers import sqnr_db

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=172, max_seq_len=64)


def _model(tie=True, seed=0):
    m = Transformer(ModelArgs(**ARGS, tie_embeddings=tie))
    m.init_weights(seed)
    with torch.no_grad():  # non-trivial norms so that loaders must get them right
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return m.eval()


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TOKENS = torch.tensor([[1, 5, 17, 33, 2, 70, 8, 9, 44, 3, 12, 61]])


def test_cache_matches_full_forward():
    m = _model()
    full = m(TOKENS)
    m.setup_cache(1, 32)
    steps = [m(TOKENS[:, :5], 0)]                   # prefill 5, then one token at a time
    for i in range(5, TOKENS.shape[1]):
        steps.append(m(TOKENS[:, i:i + 1], i))
    m.clear_cache()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_gqa_and_rope_shapes():
    a = ModelArgs(**ARGS)
    assert a.head_dim == 16 and a.n_kv_heads == 2
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        _model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("version,tie", [(0, True), (0, False), (1, True), (1, False)])
def test_llama2c_round_trip(tmp_path, version, tie):
    m = _model(tie)
    path = tmp_path / "m.bin"
    write_llama2c(path, m.args, _sd(m), version=version)
    loaded = load_model(path)
    assert loaded.kind == "llama2c" and loaded.args.tie_embeddings == tie
    assert torch.allclose(loaded.model(TOKENS), m(TOKENS), atol=1e-5)


def _write_v2(path, m, group_size=16):
    """llama2.c int8 (version 2) writer, following its documented layout."""
    a = m.args
    sd = _sd(m)
    header = struct.pack("<Ii7iBi", 0x616B3432, 2, a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                         a.vocab_size, a.max_seq_len, 1, group_size)
    with open(path, "wb") as f:
        f.write(header + b"\0" * (256 - len(header)))
        for kind in ("attention_norm", "ffn_norm"):
            for i in range(a.n_layers):
                f.write(sd[f"layers.{i}.{kind}.weight"].numpy().astype("<f4").tobytes())
        f.write(sd["norm.weight"].numpy().astype("<f4").tobytes())
        names = ["tok_embeddings.weight"] + [f"layers.{i}.{k}.weight" for k in
                                             ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
                                             for i in range(a.n_layers)]
        expected = {}
        for name in names:
            w = sd[name].reshape(-1, group_size)
            scale = w.abs().amax(1) / 127
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            f.write(q.numpy().tobytes())
            f.write(scale.numpy().astype("<f4").tobytes())
            expected[name] = (q.float() * scale[:, None]).reshape(sd[name].shape)
    return expected


def test_llama2c_int8_v2(tmp_path):
    m = _model()
    expected = _write_v2(tmp_path / "q.bin", m)
    args, sd = read_llama2c(tmp_path / "q.bin")
    for name, w in expected.items():
        assert torch.equal(sd[name], w)
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


def test_torch_checkpoint_with_params_and_embedded_args(tmp_path):
    m = _model(tie=False)
    d = tmp_path / "meta"
    d.mkdir()
    torch.save(_sd(m), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                               "vocab_size": -1, "norm_eps": 1e-5, "max_seq_len": 64}))
    loaded = load_model(d / "consolidated.00.pth")
    assert torch.allclose(loaded.model(TOKENS), m(TOKENS), atol=1e-5)
    # llama2.c train.py style: {"model": state_dict (compiled names), "model_args": {...}}
    sd = {"_orig_mod." + k: v for k, v in _sd(m).items()}
    torch.save({"model": sd, "model_args": dict(ARGS), "iter_num": 5}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    args = loaded.args
    assert args.n_kv_heads == 2 and args.hidden_dim == 172 and not args.tie_embeddings
    assert torch.allclose(loaded.model(TOKENS), m(TOKENS), atol=1e-5)


def test_torch_checkpoint_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(tmp_path / "evil.pt")


def test_hf_directory_undoes_rope_permutation(tmp_path):
    m = _model(tie=False)
    w = torch.randn(64, 64)
    assert torch.equal(unpermute(permute(w, 4), 4), w)
    assert not torch.equal(permute(w, 4), w)
    write_hf(tmp_path / "hf", m.args, _sd(m))
    loaded = load_model(tmp_path / "hf")
    assert loaded.kind == "hf"
    assert torch.allclose(loaded.model(TOKENS), m(TOKENS), atol=1e-5)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, model_type="gemma")))
    with pytest.raises(CheckpointError, match="model_type"):
        read_hf(tmp_path / "hf")


def test_quantized_save_load_identical_logits(tmp_path):
    m = _model()
    ref = m(TOKENS)
    quantize_model_(m, group_size=32)
    q_logits = m(TOKENS)
    assert sqnr_db(ref, q_logits) > 15
    path = save_quantized(m, tmp_path / "q.safetensors", model_info={"type": "llama", "config": m.args.to_dict()})
    loaded = load_model(path)
    assert loaded.kind == "quant4" and len(loaded.quantized) == 14
    assert isinstance(loaded.model.layers[1].feed_forward.w2, Int4Linear)
    assert torch.equal(loaded.model(TOKENS), q_logits)
    with pytest.raises(FileExistsError):
        save_quantized(m, path, model_info={"type": "llama", "config": m.args.to_dict()})


def _rewrite_meta(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["quant4"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta, tensors = change(meta, tensors)
    save_file(tensors, str(dst), metadata={"quant4": json.dumps(meta)})


def test_quantized_file_errors(tmp_path):
    m = quantize_model_(_model(), group_size=32)
    good = save_quantized(m, tmp_path / "q.safetensors", model_info={"type": "llama", "config": m.args.to_dict()})
    bad = tmp_path / "bad.safetensors"
    _rewrite_meta(good, bad, lambda meta, t: (dict(meta, format_version=7), t))
    with pytest.raises(FormatError, match="format_version 7"):
        read_quantized(bad)

    def shrink(meta, t):
        t["layers.0.attention.wq.scales"] = t["layers.0.attention.wq.scales"][:, :1].contiguous()
        return meta, t
    _rewrite_meta(good, bad, shrink)
    with pytest.raises(FormatError, match=r"layers\.0\.attention\.wq.*scales shape"):
        read_quantized(bad)
    data = good.read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_model(bad)


def test_llama2c_bad_files(tmp_path):
    m = _model()
    good = tmp_path / "m.bin"
    write_llama2c(good, m.args, _sd(m), version=1)
    data = good.read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match="does not match its header"):
        read_llama2c(bad)
    bad.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="too short"):
        read_llama2c(bad)
    bad.write_bytes(b"GGUF" + data[4:])   # wrong magic: read as a legacy header, which is absurd
    with pytest.raises(CheckpointError, match="out of range"):
        read_llama2c(bad)
    bad.write_bytes(data[:4] + struct.pack("<i", 9) + data[8:])
    with pytest.raises(CheckpointError, match="unknown llama2.c version 9"):
        read_llama2c(bad)
    bad.write_bytes(data[:8] + struct.pack("<i", 1 << 30) + data[12:])
    with pytest.raises(CheckpointError, match="dim=1073741824 is out of range"):
        read_llama2c(bad)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(good, tokenizer=tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer=PATH"):
        load_tokenizer(load_model(good))


def test_perplexity_matches_direct_computation():
    m = _model()
    ids = torch.randint(0, 80, (150,))
    logp = torch.log_softmax(m(ids[None, :64])[0, :-1], -1).gather(1, ids[1:64, None]).sum()
    logp += torch.log_softmax(m(ids[None, 64:128])[0, :-1], -1).gather(1, ids[65:128, None]).sum()
    logp += torch.log_softmax(m(ids[None, 128:])[0, :-1], -1).gather(1, ids[129:, None]).sum()
    expected = torch.exp(-logp / (63 + 63 + 21)).item()
    assert abs(perplexity(m, ids, window=64) - expected) < 1e-4 * expected
    assert abs(perplexity_decode(m, ids, window=64) - expected) < 1e-4 * expected


def test_sampling():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, 0.0, None, None, None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 2, None, g) for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logits, 1.0, None, 0.5, g) for _ in range(200)}
    assert draws == {1, 3} or draws == {1}


# ------------------------------------------------------------------------------------------------
# real models

def test_embedded_model_greedy_golden():
    if not EMBEDDED_MODEL.exists():
        pytest.fail(f"embedded model missing: {EMBEDDED_MODEL}")
    loaded = load_model()
    tok = load_tokenizer(loaded)
    ids, _ = generate(loaded.model, tok.encode("Once upon a time"), 40, stop_ids=(tok.bos_id, tok.eos_id))
    text = tok.decode(tok.encode("Once upon a time")[1:] + ids)
    assert text == GOLDEN_EMBEDDED


GOLDEN_EMBEDDED = 'Once upon a time, there was a little girl named Lily. She loved to play with her toys and play with her toys. One day, she went to the park to play with her toys. She saw a big'  # fp32 greedy, 40 new tokens


def test_stories260k_greedy(shared_dir):
    d = shared_dir / "models" / "stories260K"
    loaded = load_model(d / "stories260K.bin", tokenizer=d / "tok512.model")
    tok = load_tokenizer(loaded)
    prompt = tok.encode("Once upon a time")
    ids, _ = generate(loaded.model, prompt, 30, stop_ids=(tok.bos_id, tok.eos_id))
    assert tok.decode(prompt[1:] + ids).startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")


def test_stories260k_int4_perplexity(shared_dir):
    d = shared_dir / "models" / "stories260K"
    loaded = load_model(d / "stories260K.bin", tokenizer=d / "tok512.model")
    ids = encode_blocks(load_tokenizer(loaded), heldout_text(shared_dir / "data"), 4096)
    ppl_float = perplexity(loaded.model, ids)
    quantize_model_(loaded.model, group_size=32)
    ppl_int4 = perplexity(loaded.model, ids)
    # measured: about 4.1 -> 4.5 (+10%) with round-to-nearest g32 on this 260K-parameter model
    assert 3.5 < ppl_float < 4.6
    assert ppl_float < ppl_int4 < 1.15 * ppl_float


def test_generate_in_inference_mode_leaves_the_model_usable_with_autograd():
    """generate() runs under inference_mode; the RoPE tables it grows are kept and must stay normal tensors."""
    from quant4.models.generate import generate

    m = load_model().model
    generate(m, [1, 2, 3], 4)
    out = m(torch.tensor([[1, 2, 3, 4]]))
    out.sum().backward()          # inference tensors saved for backward would raise here
    assert m.tok_embeddings.weight.grad is not None


def test_last_only_logits_equal_the_full_forward_last_position():
    m = load_model().model
    toks = torch.tensor([[1, 5, 9, 20, 3, 77]])
    full = m(toks)
    last = m(toks, last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert torch.allclose(last[0, 0], full[0, -1], atol=1e-5, rtol=1e-5)


def test_page_out_keeps_the_values(tmp_path):
    """page_out only asks the kernel to reclaim pages: a tensor's values survive it, whether its memory is
    anonymous or a view of a file's memory map."""
    from safetensors.torch import load_file, save_file

    from quant4.memory import page_out

    t = torch.randn(1 << 20)
    want = t.clone()
    page_out(t)
    page_out(t[5:70000])                       # an unaligned view
    assert torch.equal(t, want)
    save_file({"w": want.view(1024, 1024)}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]
    page_out(mapped)
    assert torch.equal(mapped.view(-1), want)
