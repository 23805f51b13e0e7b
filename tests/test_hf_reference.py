"""quant4 against transformers on the checkpoints people hold: tiny random-weight Llama-2-, Llama-3-, Mistral- and
Qwen2-style models written with save_pretrained (RoPE scaling, GQA, tied embeddings, explicit head_dim, shards,
bf16), their logits and greedy tokens; and through GGUF, quant4's own file and int4."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quant4 import quantize_model_  # noqa: E402
from quant4.models.generate import generate  # noqa: E402
from quant4.models.gguf import write_gguf  # noqa: E402
from quant4.models.load import CheckpointError, load_model  # noqa: E402

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77, 150, 42, 8, 250, 11, 99, 17, 64, 128, 255] * 6])   # 96 positions
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=128, rms_norm_eps=1e-5)
VARIANTS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=256,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        max_position_embeddings=48)),
    "yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=1, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=128,
                                                            tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                      rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 1000000.0})),
}


def make_hf(path, variant, dtype=torch.float32, shard=None):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**dict(BASE, **extra))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():        # larger weights than the init's: logits with structure
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if p.dim() == 1 and p.numel() == BASE["hidden_size"]:
                p.add_(1.0)
    model.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model.float()


def hf_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float_logits_and_greedy_match_transformers(tmp_path, variant):
    ref = make_hf(tmp_path, variant)
    loaded = load_model(tmp_path)
    mine = loaded.model(TOKENS)
    want = hf_logits(ref)
    diff = (mine - want).abs().max().item()
    assert diff < 2e-4 * want.abs().max().item(), f"{variant}: max abs diff {diff}"
    prompt = TOKENS[0, :8].tolist()
    with torch.no_grad():
        theirs = ref.generate(TOKENS[:, :8], max_new_tokens=24, do_sample=False, min_new_tokens=24,
                              pad_token_id=0)[0, 8:].tolist()
    ours, _ = generate(loaded.model, prompt, 24)
    assert ours == theirs, variant


@pytest.mark.parametrize("variant", ["llama3", "qwen2", "yarn"])
def test_int4_stays_close_to_float(tmp_path, variant):
    ref = make_hf(tmp_path, variant)
    model = load_model(tmp_path).model
    quantize_model_(model, 32)
    p = torch.log_softmax(hf_logits(ref), -1)
    q = torch.log_softmax(model(TOKENS), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    print(f"{variant}: int4 g32 KL {kl:.4f}, top-1 agreement {agree:.2%}")
    assert kl < 0.03        # measured 0.010-0.013 (random weights: near-flat logits, so agreement is not a measure)


def test_sharded_bf16_directory(tmp_path):
    ref = make_hf(tmp_path, "llama3", dtype=torch.bfloat16, shard="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded = load_model(tmp_path, dtype=torch.float32)
    ref_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    diff = (loaded.model(TOKENS) - hf_logits(ref_bf16)).abs().max().item()
    assert diff < 1e-3, diff
    del ref
    # a shard the index names is missing: a clear error naming it
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[0]
    shard.rename(tmp_path / "moved.bin")
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path)


def test_old_style_rope_scaling_config(tmp_path):
    """Checkpoints on the Hub write rope_scaling + rope_theta (transformers 5 writes rope_parameters)."""
    ref = make_hf(tmp_path, "llama3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    diff = (load_model(tmp_path).model(TOKENS) - hf_logits(ref)).abs().max().item()
    assert diff < 1e-3


@pytest.mark.parametrize("field, value, match", [
    ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}, "longrope"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("model_type", "gemma", "model_type"),
])
def test_unsupported_config_fields_are_refused_by_name(tmp_path, field, value, match):
    make_hf(tmp_path, "llama2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path)


def test_mistral_context_is_capped_at_its_window(tmp_path):
    make_hf(tmp_path, "mistral")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, sliding_window=64)))
    report = []
    loaded = load_model(tmp_path, report=report)
    assert loaded.args.max_seq_len == 64 and any("sliding-window" in r for r in report)
    with pytest.raises(ValueError, match="max_seq_len"):
        loaded.model(TOKENS)        # 96 tokens > the 64-token window: refused, never silently wrong


@pytest.mark.parametrize("variant", ["llama3", "yarn", "linear"])
def test_gguf_and_quant4_files_keep_rope_scaling_and_head_dim(tmp_path, variant):
    from quant4.serialization import save_quantized

    make_hf(tmp_path / "hf", variant)
    loaded = load_model(tmp_path / "hf")
    want = loaded.model(TOKENS)
    write_gguf(loaded.model, loaded.args, tmp_path / "f.gguf")
    back = load_model(tmp_path / "f.gguf")
    assert (back.model(TOKENS) - want).abs().max().item() < 1e-3
    q = quantize_model_(load_model(tmp_path / "hf").model, 32)
    want_q = q(TOKENS)
    save_quantized(q, tmp_path / "q.safetensors", model_info={"type": "llama", "config": loaded.args.to_dict()})
    assert torch.equal(load_model(tmp_path / "q.safetensors").model(TOKENS), want_q)
