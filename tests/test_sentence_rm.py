"""SentenceRM and train_sentence_rm on tiny random models: markers against the splitter, the
telescoping sum, the attention aggregator, Bradley–Terry training, save/load, the frozen-backbone
cache, batching, errors and the `erm train-srm` handler."""
import argparse
import copy
import gzip
import json
import math

import pytest
import torch

import erm
from erm import SentenceRM, train_sentence_rm
from erm.data import DataError, Pair
from erm.evaluate import evaluate
from erm.sentence_rm import (is_sentence_rm_dir, load_for_eval, read_config,
                             sentence_markers)
from erm.sentences import split_sentences
from erm.cli.train_srm import add_parser
from tests.tiny import SRM_PAIRS, tiny_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is the capital of France?", "Hi",
           [{"role": "user", "content": "What is 2+2?"}], "Tell me a story.", "Berlin?"]
RESPONSES = ["The capital of France is Paris. It is big!",
             "Hello world. Second sentence! Third one?",
             "4.",
             "The quick brown fox jumps over the lazy dog. 1. First item\n2. Second item",
             "中文句子。你好！是吗？ Dr. Smith met Mr. Jones."]
PAIRS = SRM_PAIRS


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer("llama")


def make_rm(tiny, aggregate="attention", seed=0, **kw):
    model, tok = tiny
    torch.manual_seed(seed)
    return SentenceRM(model, tok, aggregate=aggregate, attn_dim=16, **kw)


# ---------------------------------------------------------------- markers
@pytest.mark.parametrize("response", RESPONSES)
def test_markers_match_the_splitter(tiny, response):
    rm = make_rm(tiny)
    enc = erm.lm.encode_pair(rm.tokenizer, "Q?", response, end_ids=rm.end_ids,
                             max_length=512, offsets=True)
    ex = rm.encode("Q?", response)
    n_ctx = len(enc.ids) - enc.n_resp
    assert ex.ids == enc.ids
    assert ex.ends[0] == n_ctx - 1  # end of the prompt
    assert ex.ends[-1] == len(ex.ids) - 1 and ex.ids[-1] in rm.end_ids  # end-of-turn: last
    assert ex.ends == sorted(set(ex.ends))
    spans = split_sentences(response)
    assert ex.spans == spans  # no two sentences of these end inside one token
    for k, (s, e) in enumerate(spans[:-1]):
        a, b = enc.offsets[ex.ends[k + 1] - n_ctx]
        assert a <= e - 1 < b, (response[s:e], (a, b))  # the token holding the last character
        nxt = enc.offsets[ex.ends[k + 1] - n_ctx + 1]
        assert nxt[0] >= e  # the next token starts after the sentence


def test_markers_merge_sentences_ending_in_one_token():
    # "Yes." and "Sure." both end in the token ". Sure."; the end-of-turn token ends "Ok"
    spans, ends = sentence_markers("Yes. Sure. Ok", [(0, 3), (3, 10), (10, 13), (13, 13)])
    assert spans == [(0, 10), (11, 13)] and ends == [1, 3]


# ---------------------------------------------------------------- rewards
@pytest.mark.parametrize("aggregate", ["attention", "sum", "last"])
def test_sentence_rewards_telescope(tiny, aggregate):
    rm = make_rm(tiny, aggregate)
    for p, r in zip(PROMPTS, RESPONSES):
        sents = rm.sentence_rewards(p, r)
        ex = rm.encode(p, r)
        with torch.no_grad():
            h = rm.marker_states([ex])[0]
            v = rm.head.value(h).squeeze(-1).double()
        total = sum(s.reward for s in sents)
        assert total == pytest.approx(float(v[-1] - v[0]), abs=1e-5)  # v(end_K) − v(end_0)
        assert [s.value for s in sents] == pytest.approx(v[1:].tolist(), abs=1e-5)
        assert [s.span for s in sents] == split_sentences(r)
        assert all(r[s.start:s.end] == s.text for s in sents)
        score = float(rm.score(p, r))
        if aggregate == "sum":
            assert score == pytest.approx(total, abs=1e-5)
        elif aggregate == "last":
            assert score == pytest.approx(float(v[-1]), abs=1e-5)
        else:
            assert score == pytest.approx(sum(s.weight * s.reward for s in sents), abs=1e-5)


def test_attention_weights_sum_to_one_and_depend_on_rotary_positions(tiny):
    rm = make_rm(tiny)
    p, r = PROMPTS[1], RESPONSES[1]
    w = [s.weight for s in rm.sentence_rewards(p, r)]
    assert len(w) == 3 and sum(w) == pytest.approx(1.0, abs=1e-6) and min(w) > 0
    rm.head.rope = False
    w2 = [s.weight for s in rm.sentence_rewards(p, r)]
    assert sum(w2) == pytest.approx(1.0, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(w, w2)) > 1e-3
    # one sentence: weight 1, R = r_1
    rm.head.rope = True
    (s,) = rm.sentence_rewards("Q", "Paris.")
    assert s.weight == pytest.approx(1.0) and float(rm.score("Q", "Paris.")) == \
        pytest.approx(s.reward, abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batching_equals_one_at_a_time(arch):
    model, tok = tiny_model_and_tokenizer(arch)
    torch.manual_seed(0)
    rm = SentenceRM(model, tok, attn_dim=16, batch_size=3)
    batched = rm.score(PROMPTS, RESPONSES, progress=False)
    assert batched.dtype == torch.float32 and batched.shape == (len(PROMPTS),)
    single = torch.stack([rm.score(p, r)[0] for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    one = rm.score("Hi", ["Hello world.", "Bad. Good."])  # one prompt broadcast
    assert one.shape == (2,)
    assert not rm.training and not rm.backbone.training  # eval mode kept


# ---------------------------------------------------------------- training
def test_bt_loss_falls_to_full_accuracy_frozen(tiny):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rm, hist = train_sentence_rm(PAIRS, model=model, tokenizer=tok, freeze_backbone=True,
                                 eval_pairs=PAIRS, epochs=40, batch_size=4, head_lr=1e-2,
                                 warmup_ratio=0.0, attn_dim=16, progress=False)
    assert len(hist) == 40 and all({"step", "epoch", "loss", "lr"} <= set(h) for h in hist)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert hist[-1]["eval_accuracy"] == 1.0 and "eval_accuracy" in hist[0]
    s = rm.score([p["prompt"] for p in PAIRS] * 2,
                 [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS])
    assert bool((s[:4] > s[4:]).all())
    for k, v in model.state_dict().items():  # the frozen backbone did not move
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_bt_full_finetune_with_accumulation_and_checkpointing():
    model, tok = tiny_model_and_tokenizer("qwen2", seed=1)
    before = copy.deepcopy(model.state_dict())
    rm, hist = train_sentence_rm([Pair(**p) for p in PAIRS], model=model, tokenizer=tok,
                                 aggregate="sum", epochs=12, batch_size=2, grad_accum=2,
                                 lr=3e-3, weight_decay=0.01, warmup_ratio=0.2,
                                 l2_reward=1e-3, gradient_checkpointing=True, attn_dim=16,
                                 eval_pairs=PAIRS, progress=False)
    assert len(hist) == 12  # 2 batches of 2 pairs, accumulated into one step per epoch
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["eval_accuracy"] == 1.0
    assert hist[0]["lr"] < hist[1]["lr"] and hist[-1]["lr"] < max(h["lr"] for h in hist)
    assert rm.backbone_tuned and not rm.training
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_frozen_backbone_runs_once_per_example(tiny):
    model, tok = tiny
    calls = []
    hook = model.get_decoder().register_forward_hook(
        lambda m, a, o: calls.append(o.last_hidden_state.shape[0]))
    try:
        train_sentence_rm(PAIRS, model=model, tokenizer=tok, freeze_backbone=True,
                          eval_pairs=PAIRS[:3], epochs=3, batch_size=2, attn_dim=16,
                          progress=False)
    finally:
        hook.remove()
    assert sum(calls) == 2 * len(PAIRS) + 2 * 3  # every sequence once, not once per epoch


# ---------------------------------------------------------------- saving
def test_save_load_identical_scores(tiny, tmp_path):
    rm = make_rm(tiny, system_prompt="Be brief.")
    with torch.no_grad():  # a head that is not the initial one
        rm.head.value.bias.fill_(0.25)
    rm.save_pretrained(tmp_path / "srm")
    assert is_sentence_rm_dir(tmp_path / "srm") and not is_sentence_rm_dir(tmp_path)
    cfg = read_config(tmp_path / "srm")
    assert cfg["backbone"] == "backbone" and cfg["aggregate"] == "attention"  # an object: saved
    back = SentenceRM.from_pretrained(tmp_path / "srm", device="cpu")
    assert back.system_prompt == "Be brief." and back.head.attn_dim == 16
    torch.testing.assert_close(back.score(PROMPTS, RESPONSES), rm.score(PROMPTS, RESPONSES),
                               rtol=0, atol=0)


def test_named_backbone_is_not_copied(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    rm = SentenceRM.from_backbone(str(tmp_path / "lm"), aggregate="last", device="cpu",
                                  attn_dim=16)
    rm.save_pretrained(tmp_path / "srm")
    cfg = json.loads((tmp_path / "srm" / "sentence_rm.json").read_text())
    assert cfg["backbone"] == str(tmp_path / "lm") and not cfg["backbone_saved"]
    assert not (tmp_path / "srm" / "backbone").exists()
    back = SentenceRM.from_pretrained(tmp_path / "srm", device="cpu")
    assert torch.equal(back.score(PROMPTS, RESPONSES), rm.score(PROMPTS, RESPONSES))
    endo, srm = load_for_eval(tmp_path / "srm", device="cpu")
    assert endo.model is srm.backbone  # untrained backbone: one model in memory
    rep = evaluate(endo, PAIRS, methods=("endorm_sum", "srm"), srm=srm, progress=False)
    assert set(rep["methods"]) == {"endorm_sum", "srm"}
    assert rep["methods"]["srm"]["label"] == "SentenceRM"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SentenceRM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a saved SentenceRM"):
        SentenceRM.from_pretrained(tmp_path)
    (tmp_path / "sentence_rm.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a SentenceRM config"):
        SentenceRM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- errors
def test_bad_input_errors(tiny):
    model, tok = tiny
    rm = make_rm(tiny)
    with pytest.raises(ValueError, match="pair 1: empty response"):
        rm.score(["Q", "Q"], ["Fine.", "   "])
    with pytest.raises(ValueError, match="empty response"):
        rm.check_pair("Q", "\t")
    rm.check_pair("Q", "Fine.")
    with pytest.raises(ValueError, match="no sentences"):
        sentence_markers(" \n ", [(0, 1)])
    with pytest.raises(TypeError, match="responses must be"):
        rm.score("Q", 3)
    with pytest.raises(TypeError, match="prompt"):
        rm.score([3], ["x."])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        rm.score(["a", "b"], ["x."])
    bad = dict(PAIRS[0], rejected="  ")
    with pytest.raises(DataError, match="item 2: 'rejected' response is empty"):
        train_sentence_rm([PAIRS[1], bad], model=model, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="rejected of pair 0: empty response"):
        train_sentence_rm([Pair("Q", "Fine.", "\n")], model=model, tokenizer=tok,
                          progress=False)
    with pytest.raises(TypeError, match="must be a list"):
        train_sentence_rm(42, model=model, tokenizer=tok)
    with pytest.raises(TypeError, match="item 1 must be a dict"):
        train_sentence_rm([("q", "a", "b")], model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="aggregate"):
        train_sentence_rm(PAIRS, model=model, tokenizer=tok, aggregate="max")
    with pytest.raises(ValueError, match="epochs"):
        train_sentence_rm(PAIRS, model=model, tokenizer=tok, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train_sentence_rm(PAIRS, model=model, tokenizer=tok, lr=-1.0)
    with pytest.raises(ValueError, match="tokenizer"):
        train_sentence_rm(PAIRS, model=model)
    with pytest.raises(ValueError, match="attn_dim must be even"):
        SentenceRM(model, tok, attn_dim=15)
    with pytest.raises(TypeError, match="backbone"):
        SentenceRM("model", tok)
    with pytest.raises(ValueError, match="needs a SentenceRM"):
        evaluate(None, PAIRS, methods=("srm",), progress=False)


# ---------------------------------------------------------------- CLI
def test_cli_train_srm_end_to_end(tiny, tmp_path, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    held = tmp_path / "eval.jsonl.gz"  # HH-RLHF transcripts, gzip
    with gzip.open(held, "wt") as f:
        for p in PAIRS[:2]:
            f.write(json.dumps({"chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen']}",
                                "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant: "
                                            f"{p['rejected']}"}) + "\n")
    parser = argparse.ArgumentParser(prog="erm")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "srm"
    args = parser.parse_args(["-q", "train-srm", "--data", str(train), "--eval", str(held),
                              "--out", str(out), "--model", str(tmp_path / "lm"),
                              "--freeze-backbone", "--aggregate", "attention", "--epochs", "2",
                              "--batch-size", "2", "--attn-dim", "16", "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "epoch 2/2" in printed and "eval accuracy" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["out"] == str(out)
    assert is_sentence_rm_dir(out) and (out / "history.jsonl").is_file()
    rm = SentenceRM.from_pretrained(out, device="cpu")
    assert rm.aggregate == "attention" and rm.score("Q", "A. B.").shape == (1,)
    assert math.isfinite(float(rm.score("Q", "A. B.")))
