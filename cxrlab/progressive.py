"""Progressive resizing (`--progressive-size`): the early epochs train on smaller images, which cost less.

The simplest form of fastai's progressive resizing and EfficientNetV2's progressive learning: the first
`frac` of the planned epochs see every training image downsampled (antialiased, before augmentation) to
`small` px; the rest, where the cosine schedule anneals, train at the full size that validation, precise
BatchNorm, the shipped checkpoint and `predict` all use. A convolution's cost scales with the pixels, so
an epoch at `small` px costs about (small / full)^2 of a full one, and the time budget counts epochs in
those units until full-size epochs have run (measured on the 2-core Xeon with EfficientNet-Lite0: 192 px
epochs took 0.73 of the 224 px ones, the pixel ratio; 160 px epochs 0.55 against 0.51, since some per-step
costs do not shrink).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def epoch_size(epoch: int, planned_end: int, full: int, small: int, frac: float) -> int:
    """The image size epoch `epoch` trains at (1-based) when the run is expected to end at `planned_end`.

    Args:
        epoch: the epoch.
        planned_end: the last epoch of the run as now planned (the time budget's or --epochs).
        full: the training size (--img-size).
        small: the early epochs' size (0: progressive resizing off).
        frac: the share of the planned epochs trained at `small`.

    Returns:
        `small` for epochs 1..round(frac * planned_end), `full` after (and always when `small` is 0).
    """
    return small if small and epoch <= round(frac * planned_end) else full


def cost_fraction(size: int, full: int) -> float:
    """What an epoch at `size` px costs in epochs at `full` px (the pixel ratio)."""
    return (size / full) ** 2


def more_epochs_that_fit(epoch: int, budget_epochs: float, cap: int, full: int, small: int, frac: float) -> int:
    """How many epochs after `epoch` fit `budget_epochs` full-size epochs of time, with progressive resizing.

    The schedule depends on the planned end (its first `frac` trains small), so every end up to `cap` is
    tried and the latest whose remaining epochs fit is kept.

    Args:
        epoch: the epoch just finished (0 before the first).
        budget_epochs: the time left, in epochs at the full size (slack included).
        cap: the last epoch allowed (--epochs).
        full, small, frac: as in `epoch_size`.

    Returns:
        The number of further epochs (0 when none fits).
    """
    more = 0
    for end in range(epoch + 1, cap + 1):
        cost = sum(cost_fraction(epoch_size(e, end, full, small, frac), full) for e in range(epoch + 1, end + 1))
        if cost <= budget_epochs:
            more = end - epoch
    return more


def shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """Downsample a batch of images (B, H, W) or (B, 1, H, W), any dtype, so that the longer side is `size`
    px; antialiased bilinear, float on the 0..255 scale, (B, 1, h, w)."""
    x = images.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    if scale >= 1:
        return x
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)


def scaled_augment(cfg, ratio: float):
    """An AugmentConfig whose blur sigmas (in pixels) are scaled by `ratio` (< 1: for images shrunk by it), so
    that an image is blurred by the same share of its width at every size; other strengths are relative."""
    import dataclasses

    if ratio >= 1:
        return cfg
    return dataclasses.replace(cfg, blur=cfg.blur * ratio, class_blur=tuple(b * ratio for b in cfg.class_blur))
