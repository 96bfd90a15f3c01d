"""torchvision backbones with the input channels and the head adapted.

`pretrained=True` takes torchvision's ImageNet weights (downloaded once into torch's hub cache;
offline machines pass `--weights FILE` instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cxrlab.errors import CxrlabError
from cxrlab.models import ModelSpec, register


def _first_conv_path(model: nn.Module) -> str:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError("model has no Conv2d")


def adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first convolution for `in_chans` inputs (pretrained RGB kernels summed to gray)."""
    path = _first_conv_path(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old: nn.Conv2d = getattr(parent, attr)
    if old.in_channels == in_chans:
        return
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, old.bias is not None)
    with torch.no_grad():
        w = old.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(w.repeat(1, in_chans, 1, 1) / in_chans)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, attr, new)


def _replace_head(model: nn.Module, attr: str, num_classes: int) -> None:
    parent_path, _, last = attr.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, last) if not last.isdigit() else parent[int(last)]
    new = nn.Linear(old.in_features, num_classes)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _builder(tv_name: str, head: str):
    def build(num_classes, in_chans=3, pretrained=False, **kwargs):
        import torchvision

        weights = "DEFAULT" if pretrained else None
        try:
            model = torchvision.models.get_model(tv_name, weights=weights, **kwargs)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise CxrlabError(f"could not get ImageNet weights for {tv_name} ({exc}). Offline? Download them "
                              f"elsewhere and pass --weights FILE") from exc
        _replace_head(model, head, num_classes)
        adapt_first_conv(model, in_chans)
        return model
    return build


_TV = {  # name: (classifier attribute to replace, Grad-CAM layer)
    "resnet18": ("fc", lambda m: m.layer4[-1]),
    "resnet50": ("fc", lambda m: m.layer4[-1]),
    "densenet121": ("classifier", lambda m: m.features.norm5),
    "efficientnet_b0": ("classifier.1", lambda m: m.features[-1]),
    "mobilenet_v3_small": ("classifier.3", lambda m: m.features[-1]),
}

for _name, (_head, _cam) in _TV.items():
    register(ModelSpec(_name, _builder(_name, _head), _cam, img_size=224, pretrained_tag="torchvision imagenet",
                       description=f"torchvision {_name}"))
