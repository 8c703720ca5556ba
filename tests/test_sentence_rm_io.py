"""A saved SentenceRM read as a careless or hostile user may leave it: NaN in the head, edited
config fields, an unknown format version, a truncated / garbage / pickled head, a malformed
config, the named backbone's weights replaced at the same path. Each is refused with one error
naming the file (and the field or what changed); nothing is unpickled; version 1 directories
still load."""
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from erm import SentenceRM, cli
from erm.sentence_rm import load_for_eval
from erm.sentence_rm_io import fingerprint_changes, is_sentence_rm_dir, read_config
from tests.tiny import tiny_model_and_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is the capital of France?", "Hi"]
RESPONSES = ["The capital of France is Paris. It is big!", "Hello world. Second sentence!"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A SentenceRM on a backbone named by its path, saved: (srm dir, backbone dir, scores)."""
    root = tmp_path_factory.mktemp("srm")
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    torch.manual_seed(0)
    rm = SentenceRM.from_backbone(str(root / "lm"), aggregate="attention", attn_dim=16,
                                  device="cpu")
    rm.save_pretrained(root / "srm")
    return root / "srm", root / "lm", rm.score(PROMPTS, RESPONSES)


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved directory (config and head; the backbone stays named)."""
    src, _, _ = saved
    dst = tmp_path / "srm"
    dst.mkdir()
    for name in ("sentence_rm.json", "head.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit(path, **fields):
    cfg = json.loads((path / "sentence_rm.json").read_text())
    for k, v in fields.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "sentence_rm.json").write_text(json.dumps(cfg))


_DROP = object()


def test_round_trip_records_the_backbone_fingerprint(saved):
    path, lm_dir, want = saved
    cfg = read_config(path)
    assert cfg["version"] == 2 and cfg["base_model_fingerprint"]["files"]
    assert "model.safetensors" in cfg["base_model_fingerprint"]["files"]
    back = SentenceRM.from_pretrained(path, device="cpu")
    assert torch.equal(back.score(PROMPTS, RESPONSES), want)


def test_nan_in_the_head_is_refused(copy):
    state = load_file(str(copy / "head.safetensors"))
    state["value.weight"][0, 3] = float("nan")
    save_file(state, str(copy / "head.safetensors"))
    with pytest.raises(ValueError, match=r"head\.safetensors: tensor 'value\.weight' holds 1 "
                                         r"non-finite"):
        SentenceRM.from_pretrained(copy, device="cpu")
    state["value.weight"][0, 3] = 0.0
    state["key.weight"][1, 1] = float("inf")
    save_file(state, str(copy / "head.safetensors"))
    with pytest.raises(ValueError, match="'key.weight' holds 1 non-finite"):
        SentenceRM.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("field,value,message", [
    ("rope", "yes", "'rope' must be true or false"),
    ("rope", 1, "'rope' must be true or false"),
    ("rope_base", -5.0, "'rope_base' must be a finite number > 0"),
    ("attn_dim", 15, "'attn_dim' must be an even int"),
    ("batch_size", 0, "'batch_size' must be an int >= 1"),
    ("system_prompt", 3, "'system_prompt' must be a string or null"),
    ("backbone_saved", "false", "'backbone_saved' must be true or false"),
    ("version", 99, "format version 99 is not one this erm reads"),
    ("version", "2", "format version '2' is not one this erm reads"),
    ("version", _DROP, "format version None"),
    ("rope", _DROP, "the field 'rope' is missing"),
    ("adapter", "../elsewhere", "'adapter' must be null or \"adapter\""),
])
def test_edited_config_fields_are_refused(copy, field, value, message):
    _edit(copy, **{field: value})
    with pytest.raises(ValueError, match=message) as info:
        SentenceRM.from_pretrained(copy, device="cpu")
    assert "sentence_rm.json" in str(info.value)


def test_version_1_directories_still_load(saved, copy):
    _, _, want = saved
    _edit(copy, version=1, base_model_fingerprint=_DROP)
    back = SentenceRM.from_pretrained(copy, device="cpu")
    assert torch.equal(back.score(PROMPTS, RESPONSES), want)
    _edit(copy, base_model_fingerprint={"files": {}})
    with pytest.raises(ValueError, match="a version 2 field"):
        SentenceRM.from_pretrained(copy, device="cpu")


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "pickle"])
def test_a_damaged_head_names_the_file(copy, tmp_path, damage):
    head = copy / "head.safetensors"
    marker = tmp_path / "unpickled"
    data = head.read_bytes()
    head.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x93NUMPY not it" * 9,
                      "empty": b"", "pickle": pickle.dumps(_Payload(marker))}[damage])
    with pytest.raises(ValueError, match=r"head\.safetensors: not a readable safetensors"):
        SentenceRM.from_pretrained(copy, device="cpu")
    assert not marker.exists()  # the pickle was never loaded


def test_a_malformed_config_names_the_file(copy):
    (copy / "sentence_rm.json").write_text('{"format": "erm-sentence-rm", "version": 2,')
    assert is_sentence_rm_dir(copy)  # still recognised: loading says what is wrong with it
    with pytest.raises(ValueError, match=r"sentence_rm\.json: not valid JSON"):
        SentenceRM.from_pretrained(copy, device="cpu")
    (copy / "sentence_rm.json").write_text('{"format": "erm-sentence-rm", "format": "x"}')
    with pytest.raises(ValueError, match=r"sentence_rm\.json: .*duplicate key\(s\) \['format'\]"):
        SentenceRM.from_pretrained(copy, device="cpu")


def test_a_missing_head_names_the_file(copy):
    (copy / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"head\.safetensors: missing"):
        SentenceRM.from_pretrained(copy, device="cpu")


def test_the_cli_gives_one_error_line_for_a_damaged_head(copy, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello. There."}) + "\n")
    (copy / "head.safetensors").write_bytes(b"garbage" * 10)
    rc = cli.main(["-q", "score", "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                   "--model", str(copy), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert err.startswith("erm: error:") and "head.safetensors" in err, err
    (copy / "sentence_rm.json").write_text("{not json")
    rc = cli.main(["-q", "score", "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                   "--model", str(copy), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("erm: error:") and "sentence_rm.json" in err, err


def test_weights_replaced_at_the_backbone_path_are_refused(saved, tmp_path):
    """The head was trained on the weights at the named path: other weights put there are
    refused naming what changed, unless check_backbone=False (then a warning names it)."""
    path, lm_dir, want = saved
    lm2 = tmp_path / "lm"
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(lm2)
    tok.save_pretrained(lm2)
    srm = tmp_path / "srm"
    torch.manual_seed(0)
    SentenceRM.from_backbone(str(lm2), attn_dim=16, device="cpu").save_pretrained(srm)
    other, _ = tiny_model_and_tokenizer("llama", seed=1)  # same shapes, other weights
    other.save_pretrained(lm2)
    with pytest.raises(ValueError, match=r"model\.safetensors sha256 .* -> .*check_backbone="
                                         r"False") as info:
        SentenceRM.from_pretrained(srm, device="cpu")
    assert str(lm2) in str(info.value) and "sentence_rm.json" in str(info.value)
    with pytest.warns(UserWarning, match="model.safetensors sha256"):
        rm = SentenceRM.from_pretrained(srm, device="cpu", check_backbone=False)
    assert torch.equal(rm.backbone.get_input_embeddings().weight,
                       other.get_input_embeddings().weight)
    # saved again, it records the weights it now sits on and loads without a warning
    rm.save_pretrained(tmp_path / "again")
    SentenceRM.from_pretrained(tmp_path / "again", device="cpu")


def test_fingerprint_changes():
    base = {"path": "/m", "config_sha256": "a" * 64,
            "files": {"model.safetensors": {"size": 10, "mtime_ns": 5}}}
    assert fingerprint_changes(base, json.loads(json.dumps(base))) == []
    moved = dict(base, files={"model.safetensors": {"size": 10, "mtime_ns": 6},
                              "extra.bin": {"size": 1, "mtime_ns": 1}})
    assert fingerprint_changes(base, moved) == ["extra.bin is new",
                                                "model.safetensors mtime_ns 5 -> 6"]
    assert fingerprint_changes(base, dict(base, config_sha256="b" * 64)) == [
        f"config.json sha256 {'a' * 12}… -> {'b' * 12}…"]
    embedded = {"kind": "embedded", "path": "/p/m.gguf", "files": {"m.gguf": {"size": 9,
                                                                             "mtime_ns": 1}}}
    reinstalled = dict(embedded, path="/q/m.gguf", files={"m.gguf": {"size": 9, "mtime_ns": 2}})
    assert fingerprint_changes(embedded, reinstalled) == []
    upgraded = dict(embedded, files={"m.gguf": {"size": 8, "mtime_ns": 2}})
    assert fingerprint_changes(embedded, upgraded) == ["m.gguf size 9 -> 8"]


def test_a_replaced_base_model_of_a_tuned_backbone_is_refused_for_eval(tmp_path):
    """A fine-tuned backbone is saved with the head; the EndoRM that `erm eval` puts beside it
    loads the base model by name, whose weights are checked against the saved fingerprint."""
    lm_dir = tmp_path / "lm"
    model, tok = tiny_model_and_tokenizer("llama")
    model.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    rm = SentenceRM.from_backbone(str(lm_dir), aggregate="sum", attn_dim=16, device="cpu")
    rm.backbone_tuned = True
    rm.save_pretrained(tmp_path / "srm")
    endo, _ = load_for_eval(tmp_path / "srm", device="cpu")
    assert endo is not None
    tiny_model_and_tokenizer("llama", seed=2)[0].save_pretrained(lm_dir)
    SentenceRM.from_pretrained(tmp_path / "srm", device="cpu")  # its own backbone: unchanged
    with pytest.raises(ValueError, match=r"the base model .* is not the model this SentenceRM "
                                         r"was saved with: model\.safetensors sha256"):
        load_for_eval(tmp_path / "srm", device="cpu")
    with pytest.warns(UserWarning, match="base model"):
        endo, _ = load_for_eval(tmp_path / "srm", device="cpu", check_backbone=False)
    assert endo is not None
