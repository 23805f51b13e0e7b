"""GPTQ: the stored format, equality with plain quantization when inputs are uncorrelated, lower output error
than round-to-nearest on correlated calibration inputs, the block-by-block model driver and the scripts."""
import copy

import pytest
import torch
from torch import nn

from quant4.models.calibration import calibration_windows, read_stories
from quant4.models.llama import ModelArgs, Transformer
from quant4.models.load import load_model
from quant4 import Int4Linear, gptq_quantize, quantize, quantize_model_, quantize_model_gptq_
from quant4 import reference
from helpers import REPO, STORIES, embedded_with_windows, load_script


def _correlated(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1          # uneven input magnitudes, like real activations
    return (torch.randn(n, k, generator=g) @ mix) * scale


def _out_err(x, w, qw, s, z, g):
    w_hat = reference.dequantize(qw, s, z, g, w.shape[1])
    return ((x @ (w - w_hat).t()) ** 2).mean().item()


@pytest.mark.parametrize("method", ["rtn", "search"])
@pytest.mark.parametrize("K,g", [(128, 32), (100, 32), (256, 64)])
def test_identity_hessian_equals_plain_quantizer(method, K, g):
    # no input correlation -> nothing to compensate: GPTQ's codes, scales and zeros are the plain ones
    w = torch.randn(48, K)
    qw, s, z = gptq_quantize(w, torch.eye(K), g, method=method)
    ref = quantize(w, g, method=method)
    assert torch.equal(qw, ref[0]) and torch.equal(s, ref[1]) and torch.equal(z, ref[2])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("method", ["rtn", "search"])
def test_gptq_lowers_output_error_on_calibration_inputs(method, act_order):
    K, N, g = 256, 96, 32
    x = _correlated(4096, K)
    w = torch.randn(N, K) * 0.05
    H = x.t() @ x / x.shape[0]
    err_plain = _out_err(x, w, *quantize(w, g, method=method), g)
    err_gptq = _out_err(x, w, *gptq_quantize(w, H, g, method=method, act_order=act_order), g)
    assert err_gptq < 0.75 * err_plain, (err_gptq, err_plain)     # measured: 0.45-0.62x


def test_gptq_stored_format_padding_and_dead_inputs():
    K, g = 100, 32                                             # padded to 128
    x = _correlated(2048, K)
    x[:, 7] = 0                                                 # an input that never fires
    w = torch.randn(40, K)
    qw, s, z = gptq_quantize(w, x.t() @ x / len(x), g)
    assert qw.shape == (40, 64) and qw.dtype == torch.uint8
    assert s.shape == z.shape == (40, 4) and s.dtype == z.dtype == torch.float16
    codes = reference.unpack(qw)
    assert int(codes[:, K:].max()) == 0                        # padding nibbles are 0, as the format requires
    mod = Int4Linear.from_packed(qw, s, z, in_features=K, group_size=g)
    torch.testing.assert_close(mod(x[:8]), reference.linear(x[:8], qw, s, z, g), rtol=1e-5, atol=1e-5)


def test_gptq_bad_inputs():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"hessian must be \[64, 64\]"):
        gptq_quantize(w, torch.eye(32), 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, torch.eye(64), 48)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.full((64, 64), float("nan")), 32)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, torch.eye(64), 32, damp=-1)
    with pytest.raises(TypeError, match="2-D float"):
        gptq_quantize(w.long(), torch.eye(64), 32)
    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, max_seq_len=16))
    with pytest.raises(ValueError, match="int64 tensor"):
        quantize_model_gptq_(m, torch.zeros(2, 8), 32)
    with pytest.raises(ValueError, match="ModuleList"):
        quantize_model_gptq_(nn.Sequential(nn.Linear(64, 64)), torch.zeros(2, 8, dtype=torch.long), 32,
                             filter_fn=lambda mod, n: isinstance(mod, nn.Linear))


def test_model_driver_beats_rtn_on_the_embedded_model():
    base, cal, held = embedded_with_windows(24)
    gptq = quantize_model_gptq_(copy.deepcopy(base), cal, 32)
    rtn = quantize_model_(copy.deepcopy(base), 32)
    swapped = [r for r in gptq.quant4_report if r.swapped]
    assert len(swapped) == 6 * 7 and all("gptq" in r.reason and r.sqnr_db > 15 for r in swapped)
    assert all(isinstance(m, Int4Linear) for n, m in gptq.named_modules() if n.endswith(("wq", "w2")))
    with torch.no_grad():
        ref = torch.log_softmax(base(held), -1)
        kl = {name: torch.nn.functional.kl_div(torch.log_softmax(m(held), -1), ref, log_target=True,
                                               reduction="batchmean").item()
              for name, m in (("gptq", gptq), ("rtn", rtn))}
    assert kl["gptq"] < 0.8 * kl["rtn"], kl


def test_layers_grouped_by_shared_input():
    # wq/wk/wv share one input, w1/w3 another: grouped by tensor identity (an address could be reused by a
    # later input once the first is freed, which once gave w1/w3 the Hessian of wq's input at random)
    from quant4.gptq import _input_sets
    from quant4.swap import is_projection

    m = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, max_seq_len=16))
    h = m.tok_embeddings(torch.tensor([[1, 2, 3, 4]]))
    for _ in range(5):
        sets = _input_sets(m.layers[0], "layers.0", is_projection, (h, torch.complex(*(t[:4] for t in m.rope(4))), 0), {})
        assert sets == [["attention.wq", "attention.wk", "attention.wv"], ["attention.wo"],
                        ["feed_forward.w1", "feed_forward.w3"], ["feed_forward.w2"]]


def test_calibration_windows():
    class Tok:
        def encode(self, s, bos=True):
            return [1] + [ord(c) for c in s]
    w = calibration_windows(Tok(), ["abcdefgh"] * 10, n_sequences=5, seq_len=6, seed=3)
    assert w.shape == (5, 6) and w.dtype == torch.long
    assert torch.equal(w, calibration_windows(Tok(), ["abcdefgh"] * 10, n_sequences=5, seq_len=6, seed=3))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        calibration_windows(Tok(), ["ab"], seq_len=64)
    with pytest.raises(FileNotFoundError, match="calibration text not found"):
        read_stories(REPO / "no-such-file.txt")


def test_quantize_script_gptq(tmp_path, capsys):
    quantize_script = load_script("quantize")
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(STORIES))
    out = tmp_path / "g.safetensors"
    quantize_script.main(["--method", "gptq", "--calibration", str(text), "--calib-sequences", "8",
                          "--calib-len", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "GPTQ calibration: 8 windows of 64 tokens" in printed and "weight SQNR mean" in printed
    loaded = load_model(out)
    assert len(loaded.quantized) == 42
    tokens = torch.tensor([[1, 50, 60, 70]])
    assert torch.isfinite(loaded.model(tokens)).all()


def test_gptq_on_an_int4_model_says_so():
    model = quantize_model_(load_model().model, 32)
    with pytest.raises(ValueError, match="already int4 \\(42 Int4Linear layers\\)"):
        quantize_model_gptq_(model, torch.randint(0, 100, (2, 16)), 32)
    table = str(model.quant4_report)                  # the report prints as a table
    assert "layers.0.attention.wq" in table and "int4 g32 refit" in table and "weight SQNR mean" in table
