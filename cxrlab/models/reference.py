"""The two reference designs, reproduced faithfully.

* `chestxray_cnn` (design 1): VGG-style, 5 blocks of two 3x3 conv + BatchNorm + ReLU with
  64-128-256-512-512 channels, each block closed by 2x2 max-pooling and dropout
  0.25/0.25/0.3/0.3/0.3; adaptive average pooling to 7x7; classifier 25088-4096-2048-classes with
  ReLU and dropout 0.5; Kaiming initialisation of the convolutions (FC layers N(0, 0.01), as
  torchvision's VGG, which keeps the 25088-wide first FC layer from saturating the softmax). Its real size is ~120.6M parameters (the FC layers
  alone hold 111M); the design's author quoted ~40M, which the stated FC sizes cannot give.
* `custom_cnn` (design 2): 4 blocks of conv + BatchNorm + ReLU + max-pool (32-64-128-256); the
  flatten size is computed from the input size with a dry run, then FC 512 + dropout 0.5.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cxrlab.models import ModelSpec, register


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):  # as torchvision's VGG: Kaiming for convs, N(0, 0.01) for FC layers
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class ChestXrayCNN(nn.Module):
    """Reference design 1 (see module docstring)."""

    widths = (64, 128, 256, 512, 512)
    drops = (0.25, 0.25, 0.3, 0.3, 0.3)

    def __init__(self, num_classes: int = 3, in_chans: int = 3, dropout: float = 0.5):
        super().__init__()
        blocks, cin = [], in_chans
        for w, p in zip(self.widths, self.drops):
            blocks.append(nn.Sequential(*_conv_bn_relu(cin, w), *_conv_bn_relu(w, w), nn.MaxPool2d(2), nn.Dropout(p)))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 2048), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(2048, num_classes))
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class CustomCNN(nn.Module):
    """Reference design 2: 4 conv blocks, flatten size computed from `img_size`."""

    widths = (32, 64, 128, 256)

    def __init__(self, num_classes: int = 2, in_chans: int = 3, img_size: int = 224, dropout: float = 0.5):
        super().__init__()
        layers, cin = [], in_chans
        for w in self.widths:
            layers += [*_conv_bn_relu(cin, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, in_chans, img_size, img_size)).numel()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(n_flat, 512), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(512, num_classes))
        self.flatten_size = n_flat
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        from cxrlab.errors import CxrlabError

        raise CxrlabError(f"{name} is trained from scratch: it has no pretrained weights (use --weights FILE for your own)")


def _build_chestxray(num_classes, in_chans=3, pretrained=False, **kw):
    _no_pretrained("chestxray_cnn", pretrained)
    return ChestXrayCNN(num_classes, in_chans, **kw)


def _build_custom(num_classes, in_chans=3, pretrained=False, **kw):
    _no_pretrained("custom_cnn", pretrained)
    return CustomCNN(num_classes, in_chans, **kw)


register(ModelSpec("chestxray_cnn", _build_chestxray, lambda m: m.features[-1][5], img_size=224,
                   description="reference design 1: VGG-style 5-block CNN, ~120M parameters"))
register(ModelSpec("custom_cnn", _build_custom, lambda m: m.features[-2], img_size=224,
                   description="reference design 2: 4-block CNN, flatten size from the input size",
                   extra={"size_dependent": True}))
