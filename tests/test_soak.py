"""Soak: several Python threads generate with one shared int4 model while another thread loads, quantizes and
saves a second model, for a fixed number of tokens. Every output must equal the serial run's, resident memory
must stay flat after the warm-up round, and no file descriptor or temporary file may be left behind.
Marked slow (about 20 s); `make test` runs it, `pytest -m "not slow"` skips it."""
import os
import threading

import pytest

from quant4.models.generate import generate
from quant4.models.load import load_model
from quant4.models.tokenizer import SentencePieceTokenizer
from quant4 import quantize_model_
from quant4.serialization import save_quantized
from helpers import REPO

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "One day, a bird"]
TOKENS = 48
ROUNDS = 4


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_shared_model_under_concurrent_generation_and_loading(tmp_path):
    tok = SentencePieceTokenizer(REPO / "models" / "tiny" / "tokenizer.model")
    model = quantize_model_(load_model().model, 32)
    prompts = [tok.encode(p) for p in PROMPTS]
    stop = (tok.bos_id, tok.eos_id)
    expected = [generate(model, ids, TOKENS, stop_ids=stop)[0] for ids in prompts]

    errors, results = [], {}
    rss = []

    def generator(i):
        try:
            for r in range(ROUNDS):
                results[(i, r)] = generate(model, prompts[i], TOKENS, stop_ids=stop)[0]
        except BaseException as exc:      # reported below: a thread's exception must fail the test
            errors.append(exc)

    def loader():
        try:
            for r in range(ROUNDS):
                other = quantize_model_(load_model().model, 64, method="search")
                save_quantized(other, tmp_path / f"other{r}.safetensors", model_info={"type": "llama"})
                del other
        except BaseException as exc:
            errors.append(exc)

    fds_before = _fds()
    for rnd in range(3):      # round 0 warms up allocator pools and thread teams; rounds 1-2 must not grow
        threads = [threading.Thread(target=generator, args=(i,)) for i in range(len(PROMPTS))]
        threads.append(threading.Thread(target=loader))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for (i, r), out in results.items():
            assert out == expected[i], f"thread {i} round {r} differs from the serial run"
        results.clear()
        for p in tmp_path.iterdir():
            p.unlink()
        rss.append(_rss_bytes())
    tokens = 2 * len(PROMPTS) * ROUNDS * TOKENS
    growth = rss[-1] - rss[0]
    print(f"soak: {tokens} tokens, RSS after each round (MB): {[round(r / 2**20, 1) for r in rss]}")
    assert growth < 32 << 20, f"RSS grew {growth / 2**20:.1f} MB over {tokens} tokens after the warm-up ({rss})"
    assert _fds() == fds_before
    assert list(tmp_path.iterdir()) == []
