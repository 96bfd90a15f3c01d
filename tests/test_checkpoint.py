"""Checkpoints: round trip from the file alone, weights_only safety, clear refusals."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from cxrlab.checkpoint import FORMAT_VERSION, build_model, load_checkpoint, save_checkpoint
from cxrlab.errors import CxrlabError


def test_round_trip_predicts_identically(tiny_run, synth_dir):
    from cxrlab.inference import load_model_bundle

    ckpt = load_checkpoint(tiny_run / "best.pt")
    for key in ("model", "class_names", "img_size", "mean", "std", "preprocess", "config", "epoch", "metric",
                "cxrlab_version", "format_version", "temperature", "history"):
        assert key in ckpt, key
    assert ckpt["class_names"] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert ckpt["img_size"] == 48 and ckpt["model"]["name"] == "custom_cnn"
    model = build_model(ckpt)
    copy = tiny_run / "copy.pt"
    save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format_version", "cxrlab_version")}, copy)
    again = build_model(load_checkpoint(copy))
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    files = sorted((synth_dir / "test").rglob("*.png"))[:4]
    a = load_model_bundle(tiny_run / "best.pt", device="cpu").logits_for_files(files)[0]
    b = load_model_bundle(copy, device="cpu").logits_for_files(files)[0]
    np.testing.assert_array_equal(a, b)


def test_last_checkpoint_has_training_state(tiny_run):
    last = load_checkpoint(tiny_run / "last.pt")
    assert {"optimizer", "scheduler", "stopper"} <= set(last["train_state"])
    assert last["epoch"] == 2 and len(last["history"]) == 2


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(CxrlabError, match="refuses for safety"):
        load_checkpoint(p)


def test_refuses_non_checkpoints(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CxrlabError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "raw.pt")
    with pytest.raises(CxrlabError, match="not a cxrlab checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")
    with pytest.raises(CxrlabError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_refuses_newer_format(tiny_run, tmp_path):
    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CxrlabError, match="newer than this cxrlab"):
        load_checkpoint(tmp_path / "future.pt")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint({"model": {}, "class_names": ["a", "b"], "state_dict": {}, "v": 1}, target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(CxrlabError, match="No space left"):
        save_checkpoint({"model": {}, "class_names": ["a", "b"], "state_dict": {}, "v": 2}, target)
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*tmp"))
