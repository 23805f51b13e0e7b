"""Block-wise tuning (quant4.tune): its starting point is the plain quantizer bit for bit, the tuned model is
closer to the float model than the plain quantizers, and bad arguments are refused."""
import copy

import pytest
import torch
import torch.nn.functional as F

from quant4 import Int4Linear, ops, quantize_model_, tune_model_
from quant4.models.load import load_model
from quant4.tune import _Fake
from helpers import STORIES, embedded_with_windows


@pytest.mark.parametrize("init", ["rtn", "search"])
@pytest.mark.parametrize("K,g", [(128, 32), (100, 32), (192, 64)])
def test_the_starting_point_is_the_plain_quantizer(init, K, g):
    w = torch.randn(24, K)
    qw, s, z = _Fake(w, g, init, None).stored()
    ref = ops.quantize(w, g, method=init)
    assert torch.equal(qw, ref[0]) and torch.equal(s, ref[1]) and torch.equal(z, ref[2])


def test_stored_codes_are_the_fake_quantized_weights():
    torch.manual_seed(0)
    f = _Fake(torch.randn(16, 96), 32, "search", None)
    with torch.no_grad():
        f.v.uniform_(-0.5, 0.5)
        f.ls.uniform_(-0.1, 0.1)
        f.dz.uniform_(-0.3, 0.3)
    qw, s16, z16 = f.stored()
    with torch.no_grad():       # the fake weight with the fp16-rounded scale and zero is what the file holds
        f.ls.copy_(torch.log(s16.float() / f.s0))
        f.dz.copy_((z16.float() - f.z0) / f.s0)
        fake = f.weight()
    stored = ops.dequantize(qw, s16, z16, 32, 96)
    assert torch.allclose(stored, fake, rtol=0, atol=1e-4 * float(fake.abs().max()))


def test_tuning_beats_the_plain_quantizers_on_the_embedded_model():
    base, cal, held = embedded_with_windows(16)
    tuned = tune_model_(copy.deepcopy(base), cal, 32, iters=40)
    search = quantize_model_(copy.deepcopy(base), 32, method="search")
    swapped = [r for r in tuned.quant4_report if r.swapped]
    assert len(swapped) == 6 * 7 and all("tuned" in r.reason for r in swapped)
    assert all(isinstance(m, Int4Linear) for n, m in tuned.named_modules() if n.endswith(("wq", "w2")))
    with torch.no_grad():
        ref = torch.log_softmax(base(held), -1)
        kl = {name: F.kl_div(torch.log_softmax(m(held), -1), ref, log_target=True, reduction="batchmean").item()
              for name, m in (("tuned", tuned), ("search", search))}
    assert kl["tuned"] < 0.9 * kl["search"], kl


def test_bad_arguments():
    model = load_model().model
    cal = torch.randint(0, 100, (2, 16))
    with pytest.raises(ValueError, match="calibration"):
        tune_model_(model, cal.int(), 32)
    with pytest.raises(ValueError, match="init"):
        tune_model_(model, cal, 32, init="gptq")
    with pytest.raises(ValueError, match="lr"):
        tune_model_(model, cal, 32, lr=2.0)
    with pytest.raises(ValueError, match="iters"):
        tune_model_(model, cal, 32, iters=0)


def test_quantize_script_tune_and_awq(tmp_path, capsys, monkeypatch):
    from helpers import load_script

    monkeypatch.setitem(tune_model_.__kwdefaults__, "iters", 10)       # the script's path, not the tuning

    script = load_script("quantize")
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(STORIES))
    out = tmp_path / "t.safetensors"
    script.main(["--method", "tune", "--awq", "--calibration", str(text), "--calib-sequences", "4",
                 "--calib-len", "32", "--out", str(out)])
    assert "tuning on 4 calibration windows of 32 tokens" in capsys.readouterr().out
    loaded = load_model(out)
    assert len(loaded.quantized) == 42
    assert torch.isfinite(loaded.model(torch.tensor([[1, 50, 60, 70]]))).all()
    for bad, msg in ((["--method", "tune", "--gptq-refine", "1"], "--gptq-refine applies to --method gptq"),
                     (["--awq"], "only apply to --method gptq or tune")):
        with pytest.raises(SystemExit, match=msg):
            script.main(bad + ["--out", str(tmp_path / "x.safetensors")])
