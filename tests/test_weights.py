"""Offline weight loading: formats, prefixes, stem adaptation, head skipping, refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from cxrlab.errors import CxrlabError
from cxrlab.models.weights import head_keys, load_local_weights, read_state_dict


class TinyNet(nn.Module):
    """A small resnet-like network: conv stem, one residual block, pooled linear head."""

    def __init__(self, num_classes: int = 2, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.fc(x.mean((2, 3)))


class Payload:
    """Not a tensor: unpickling it would need code."""


def _trained_like(**kw) -> TinyNet:
    torch.manual_seed(1)
    model = TinyNet(**kw)
    for bn in (model.stem[1], model.block[1]):  # non-default running stats so they are checked too
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model


def _body(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _assert_body_equal(a: nn.Module, b: nn.Module) -> None:
    for key, value in _body(a).items():
        assert torch.equal(value, _body(b)[key]), key


def test_state_dict_round_trip_with_other_head(tmp_path):
    src = _trained_like(num_classes=5)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = TinyNet(num_classes=2)
    fresh_head = dst.fc.weight.detach().clone()
    report = load_local_weights(dst, path, in_chans=3)
    _assert_body_equal(src, dst)
    assert torch.equal(dst.fc.weight, fresh_head)
    assert sorted(report.skipped_head) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == report.total and not report.mismatched


def test_same_head_is_loaded(tmp_path):
    src = _trained_like(num_classes=2)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = TinyNet(num_classes=2)
    load_local_weights(dst, tmp_path / "w.pt", in_chans=3)
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_module_prefix_is_stripped(tmp_path):
    src = _trained_like()
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "ddp.bin")
    dst = TinyNet()
    load_local_weights(dst, tmp_path / "ddp.bin", in_chans=3)
    _assert_body_equal(src, dst)


@pytest.mark.parametrize("container", ["cxrlab", "model_key"])
def test_checkpoint_like_containers(tmp_path, container):
    src = _trained_like(num_classes=3)
    if container == "cxrlab":
        obj = {"format_version": 1, "model": {"name": "tiny", "kwargs": {}, "num_classes": 3, "in_chans": 3},
               "class_names": ["A", "B", "C"], "mean": [0.5], "std": [0.25], "epoch": 4,
               "state_dict": src.state_dict()}
    else:
        obj = {"model": src.state_dict(), "epoch": 3}
    torch.save(obj, tmp_path / "ckpt.pt")
    dst = TinyNet(num_classes=2)
    load_local_weights(dst, tmp_path / "ckpt.pt", in_chans=3)
    _assert_body_equal(src, dst)


def test_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = _trained_like()
    safetensors_torch.save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst = TinyNet()
    load_local_weights(dst, tmp_path / "w.safetensors", in_chans=3)
    _assert_body_equal(src, dst)


def test_rgb_stem_summed_to_gray(tmp_path):
    src = _trained_like(in_chans=3).eval()
    torch.save(src.state_dict(), tmp_path / "rgb.pt")
    dst = TinyNet(in_chans=1)
    report = load_local_weights(dst, tmp_path / "rgb.pt", in_chans=1)
    dst.eval()
    assert report.adapted == ["stem.0.weight (3->1)"]
    assert torch.allclose(dst.stem[0].weight, src.stem[0].weight.sum(1, keepdim=True))
    gray = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(dst(gray), src(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_gray_stem_repeated_to_rgb(tmp_path):
    src = _trained_like(in_chans=1).eval()
    torch.save(src.state_dict(), tmp_path / "gray.pt")
    dst = TinyNet(in_chans=3)
    load_local_weights(dst, tmp_path / "gray.pt", in_chans=3)
    dst.eval()
    gray = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(dst(gray.repeat(1, 3, 1, 1)), src(gray), atol=1e-5)


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CxrlabError, match="not a PyTorch weights file"):
        load_local_weights(TinyNet(), path, in_chans=3)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch_save", "pickle_dump"])
def test_pickled_code_is_refused_for_safety(tmp_path, writer):
    path = tmp_path / "evil.pth"
    obj = {"state_dict": TinyNet().state_dict(), "extra": Payload()}
    if writer == "torch_save":
        torch.save(obj, path)
    else:
        with path.open("wb") as fh:
            pickle.dump(obj, fh)
    with pytest.raises(CxrlabError, match="needs arbitrary code to load; cxrlab refuses it for safety"):
        load_local_weights(TinyNet(), path, in_chans=3)


def test_other_architecture_lists_mismatches(tmp_path):
    torch.save(TinyNet(width=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CxrlabError) as info:
        load_local_weights(TinyNet(width=8), tmp_path / "wide.pt", in_chans=3)
    message = str(info.value)
    assert "wide.pt" in message and "0 of 10 tensors matched" in message
    assert "stem.0.weight: file (16, 3, 3, 3) vs model (8, 3, 3, 3)" in message


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(CxrlabError, match="not found"):
        load_local_weights(TinyNet(), tmp_path / "nope.pt", in_chans=3)
    torch.save({"epoch": 3, "notes": "no tensors"}, tmp_path / "meta.pt")
    with pytest.raises(CxrlabError, match="no state_dict found"):
        read_state_dict(tmp_path / "meta.pt")


def test_head_keys_last_linear():
    assert head_keys(TinyNet()) == {"fc.weight", "fc.bias"}
