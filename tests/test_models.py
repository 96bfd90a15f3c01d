"""Every registered model on random tensors: shape, finiteness, gradients; registry errors."""

from __future__ import annotations

import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, list_models, model_spec

ONE_CHANNEL = ["custom_cnn", "resnet18", "efficientnet_lite0"]  # the 1-channel stem adaptation is shared code


@pytest.mark.parametrize("name,in_chans", [(n, 3) for n in list_models()] + [(n, 1) for n in ONE_CHANNEL])
def test_every_model_forward_backward(name, in_chans):
    torch.manual_seed(0)
    size = 32 if name in ("chestxray_cnn", "densenet121") else 64
    kw = {"img_size": size} if model_spec(name).extra.get("size_dependent") else {}
    model = create_model(name, num_classes=3, in_chans=in_chans, **kw)
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{name}: parameters without a finite gradient: {missing[:5]}"
    layer = model_spec(name).cam_layer(model)
    assert isinstance(layer, torch.nn.Module)


def test_reference_designs_are_faithful():
    m = create_model("chestxray_cnn", num_classes=3)
    n = sum(p.numel() for p in m.parameters())
    assert 120_000_000 < n < 121_000_000, n  # ~120.6M, not the ~40M the design's author quoted
    fcs = [l for l in m.classifier if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in fcs] == [(25088, 4096), (4096, 2048), (2048, 3)]
    drops = [b[-1].p for b in m.features]
    assert drops == [0.25, 0.25, 0.3, 0.3, 0.3]
    assert [b[0].out_channels for b in m.features] == [64, 128, 256, 512, 512]


@pytest.mark.parametrize("size,flat", [(224, 256 * 14 * 14), (96, 256 * 6 * 6), (64, 256 * 4 * 4)])
def test_custom_cnn_flatten_follows_input_size(size, flat):
    m = create_model("custom_cnn", num_classes=2, img_size=size)
    assert m.flatten_size == flat
    assert m(torch.randn(1, 3, size, size)).shape == (1, 2)


def test_unknown_model_lists_valid_ones():
    with pytest.raises(CxrlabError) as e:
        create_model("resnet9000", num_classes=2)
    assert "resnet9000" in str(e.value) and "custom_cnn" in str(e.value) and "resnet18" in str(e.value)


def test_reference_models_refuse_pretrained():
    with pytest.raises(CxrlabError, match="from scratch"):
        create_model("custom_cnn", num_classes=2, pretrained=True)


def test_one_class_is_an_error():
    with pytest.raises(CxrlabError, match="num_classes"):
        create_model("resnet18", num_classes=1)
