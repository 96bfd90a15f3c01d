"""`small_cnn`: a compact lesion-detector CNN for quick CPU runs (the demo's model).

Three conv + BatchNorm + ReLU + max-pool stages (16-32-48) bring the image to 1/8 of its size,
two more 3x3 convolutions (64) look at that grid, and a global MAX pool feeds the classifier:
"is there a lesion anywhere" is a max, not an average, so a small focal finding is not diluted
by the rest of the film. The Grad-CAM layer is the last ReLU, at 1/8 resolution (12x12 at 96 px).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cxrlab.models import ModelSpec, register


def _stage(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + ([nn.MaxPool2d(2)] if pool else [])


class SmallCNN(nn.Module):
    """Compact CNN with a global max-pooling head (~0.1M parameters)."""

    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: int = 16, dropout: float = 0.1):
        super().__init__()
        w = [width, 2 * width, 3 * width, 4 * width]
        self.features = nn.Sequential(*_stage(in_chans, w[0], True), *_stage(w[0], w[1], True),
                                      *_stage(w[1], w[2], True), *_stage(w[2], w[3], False),
                                      nn.Conv2d(w[3], w[3], 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(w[3], num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _build(num_classes, in_chans=1, pretrained=False, **kw):
    if pretrained:
        from cxrlab.errors import CxrlabError

        raise CxrlabError("small_cnn is trained from scratch: it has no pretrained weights")
    return SmallCNN(num_classes, in_chans, **kw)


register(ModelSpec("small_cnn", _build, lambda m: m.features[-1], img_size=96, in_chans=1, mean=(0.5, 0.5, 0.5),
                   std=(0.25, 0.25, 0.25), description="compact CNN with global max pooling (fast CPU demo model)"))
