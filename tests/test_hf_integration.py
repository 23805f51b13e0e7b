"""quant4 as a transformers quantizer (quant4.hf): quantize while loading, save/load in quant4's stored format,
compare with the float model and with quant4's own model class on the same weights."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import quant4.hf  # noqa: E402
from quant4 import DEFAULT_METHOD, Int4Config, Int4Linear, ops, quantize_  # noqa: E402
from quant4.models.generate import generate  # noqa: E402
from quant4.models.load import load_model  # noqa: E402
from test_hf_reference import TOKENS, hf_logits, make_hf  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def kl(ref_logits, logits) -> float:
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def quantized(path, **cfg):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant4.hf.Quant4Config(**cfg))


def int4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}


@pytest.mark.parametrize("variant", ["llama2", "llama3", "mistral", "qwen2"])
def test_from_pretrained_quantizes_the_projections(tmp_path, variant):
    ref = make_hf(tmp_path, variant)
    model = quantized(tmp_path)
    layers = int4_layers(model)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(HF_TARGETS)
    assert len(layers) == 7 * ref.config.num_hidden_layers
    assert type(model.lm_head) is torch.nn.Linear                    # output head kept in float by default
    # each layer holds exactly what quant4's quantizer makes of the float weight (and the float bias)
    for name, q in layers.items():
        lin = ref.get_submodule(name)
        want = ops.quantize(lin.weight.detach(), 32, method=DEFAULT_METHOD)     # Quant4Config's default
        assert all(torch.equal(a, b) for a, b in zip((q.qweight, q.scales, q.zeros), want)), name
        if lin.bias is not None:
            assert torch.equal(q.bias, lin.bias.detach().float()), name
    want, got = hf_logits(ref), hf_logits(model)
    # random tiny models have flat logits: measured KL 0.005-0.011, top-1 agreement 0.50-0.84
    assert kl(want, got) < 0.03, variant
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() >= 0.4, variant


@pytest.mark.parametrize("variant", ["llama3", "qwen2"])
def test_same_logits_as_quant4s_own_model(tmp_path, variant):
    make_hf(tmp_path, variant)
    hf = quantized(tmp_path, group_size=64)
    theirs = hf_logits(hf)
    mine = load_model(tmp_path).model
    quantize_(mine, Int4Config(group_size=64))
    with torch.no_grad():
        ours = mine(TOKENS)
    assert (ours - theirs).abs().max() < 2e-4 * theirs.abs().max()
    # and model.generate on quant4's kernels continues as quant4's own generator does
    with torch.no_grad():
        hf_tokens = hf.generate(TOKENS[:, :8], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                pad_token_id=0)[0, 8:].tolist()
    assert hf_tokens == generate(mine, TOKENS[0, :8].tolist(), 16)[0]


def test_bf16_model(tmp_path):
    ref = make_hf(tmp_path, "llama3")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                 quantization_config=quant4.hf.Quant4Config())
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16   # stored dtypes kept
    got = hf_logits(model)
    assert kl(hf_logits(ref), got) < 0.06


def test_save_and_load_round_trip(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int4"
    make_hf(src, "qwen2")
    model = quantized(src, group_size=32, method="search", group_sizes={"model.layers.0.mlp.down_proj": 64},
                      modules_to_not_convert=["model.layers.1.self_attn.o_proj"])
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quant4" and qc["method"] == "search" and qc["format_version"] == 1
    assert qc["group_sizes"]["model.layers.0.mlp.down_proj"] == 64
    assert "model.layers.1.self_attn.o_proj" not in qc["group_sizes"] and len(qc["group_sizes"]) == 13
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    q = model.model.layers[0].self_attn.q_proj
    for name in ("qweight", "scales", "zeros", "bias"):
        assert torch.equal(tensors[f"model.layers.0.self_attn.q_proj.{name}"], getattr(q, name))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.uint8
    assert not any(k.endswith("_extra_state") for k in tensors)

    again = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(again.model.layers[0].mlp.down_proj, Int4Linear)
    assert again.model.layers[0].mlp.down_proj.group_size == 64
    assert type(again.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    assert torch.equal(hf_logits(again), hf_logits(model))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="group_size"):
        quant4.hf.Quant4Config(group_size=48)
    with pytest.raises(ValueError, match="method"):
        quant4.hf.Quant4Config(method="gptq")
    with pytest.raises(ValueError, match="unknown settings"):
        quant4.hf.Quant4Config(bits=3)
    quantizer = quant4.hf.Quant4HfQuantizer(quant4.hf.Quant4Config(), pre_quantized=False)
    with pytest.raises(ValueError, match="CPU"):
        quantizer.validate_environment(device_map={"": "cuda:0"})
    quantizer.validate_environment(device_map={"": "cpu"})


def test_other_architectures_are_refused(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        quantized(tmp_path)


def test_compiled_transformers_model_matches_eager(tmp_path):
    make_hf(tmp_path, "llama3")
    model = quantized(tmp_path)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(TOKENS[:, :16]).logits, model(TOKENS[:, :16]).logits, atol=1e-5, rtol=0)


# -- quant4's own tools and transformers read each other's int4 directories ---------------------------------

def test_quantize_script_writes_a_directory_transformers_loads(tmp_path):
    import subprocess
    import sys

    from helpers import REPO

    src, out = tmp_path / "float", tmp_path / "int4"
    make_hf(src, "qwen2")
    (src / "tokenizer_config.json").write_text('{"bos_token": null}')
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "quantize.py"), "--checkpoint", str(src),
                        "--out", str(out), "--method", "search"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(out)
    direct = quantized(src, method="search")
    # the same bytes as transformers' on-the-fly quantization: identical logits
    assert torch.equal(hf_logits(theirs), hf_logits(direct))
    mine = load_model(out)
    assert mine.kind == "hf-int4" and len(mine.quantized) == 14
    with torch.no_grad():
        ours = mine.model(TOKENS)
    want = hf_logits(direct)
    assert (ours - want).abs().max() < 2e-4 * want.abs().max()
    # an int4 directory is not quantized again
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "quantize.py"), "--checkpoint", str(out),
                        "--out", str(tmp_path / "again.safetensors")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "already int4" in r.stderr


def test_quant4_loads_what_transformers_saved(tmp_path):
    src, out = tmp_path / "float", tmp_path / "int4"
    make_hf(src, "llama3")
    model = quantized(src, group_sizes={"model.layers.1.mlp.up_proj": 128})
    model.save_pretrained(out)
    mine = load_model(out)
    assert mine.model.layers[1].feed_forward.w3.group_size == 128
    with torch.no_grad():
        ours = mine.model(TOKENS)
    want = hf_logits(model)
    assert (ours - want).abs().max() < 2e-4 * want.abs().max()


def test_other_tools_quantized_directories_are_refused_by_name(tmp_path):
    from quant4.models.load import CheckpointError

    make_hf(tmp_path, "llama2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'gptq'"):
        load_model(tmp_path)
    cfg["quantization_config"] = {"quant_method": "quant4", "format_version": 1, "group_sizes": {"lm_head.x": 32}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head.x"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["missing", "resized"])
def test_a_damaged_int4_directory_is_refused(tmp_path, damage):
    """A tensor missing from the checkpoint would be left uninitialized by transformers with only a warning, a
    resized one re-initialized: both are errors, never a model computing garbage."""
    from safetensors.torch import load_file, save_file

    src, out = tmp_path / "float", tmp_path / "int4"
    make_hf(src, "qwen2")
    quantized(src).save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.scales"
    if damage == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.cat([tensors[key]] * 2, 1)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="q_proj.scales|size"):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("key", ["q_proj.qweight", "q_proj.bias"])
def test_quant4_refuses_an_int4_directory_missing_a_tensor(tmp_path, key):
    from safetensors.torch import load_file, save_file

    from quant4.serialization import FormatError

    src, out = tmp_path / "float", tmp_path / "int4"
    make_hf(src, "qwen2")
    quantized(src).save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    del tensors[f"model.layers.0.self_attn.{key}"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="layers.0.attention.wq"):
        load_model(out)
