"""Augmentation on whole uint8 batches (one `grid_sample` per batch instead of PIL per image).

Reproduces the reference design's augmentations (horizontal flip, rotation 15 degrees, affine
translation 0.1, brightness/contrast 0.2, random resized crop with scale 0.8-1.0) as one random
affine warp per image, plus optional stronger photometric changes (gamma, noise) that make a
model lean less on each site's exposure. All randomness comes from the given generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (0 disables a transform).

    Attributes:
        flip: probability of a horizontal flip.
        rotation: maximum rotation in degrees.
        translate: maximum shift as a fraction of the side.
        crop_scale_min: smallest area kept by the random resized crop (1.0 disables it).
        crop_scale_max: largest area; above 1 the image is also zoomed out (shrunk onto a black frame, at a
            random place inside it), so the model sees each class at smaller and larger scales than the
            data's framing. Sites frame radiographs differently; a model that learned "anatomy fills the
            frame = disease" fails on tightly framed normals.
        brightness, contrast: jitter factors, drawn from [1 - v, 1 + v].
        gamma: gamma drawn log-uniformly from [1/(1+v), 1+v].
        noise: standard deviation of added Gaussian noise (0..1 scale).
        blur: largest Gaussian blur sigma in pixels; each image gets a sigma drawn from [0, blur].
            Sites differ in detector resolution and in how their images were resized; in the
            Kermany set the normals were scaled down from larger originals than the pneumonias and
            are sharper, a shortcut this takes away.
        class_blur: per class (by index), the largest extra blur sigma for that class's images, drawn per
            image from [0, v] and combined with `blur` (sigmas add in quadrature); empty: none. Set by
            `sharpness_matching_blur` so that sharpness stops telling the classes apart (`--aug-blur-match`).
        frame: largest width of a black band painted over an edge of the film, as a fraction of the side;
            each of the four sides of each image gets one with probability 0.5, its width drawn from
            [0, frame]. Sites differ in collimation, black borders and burnt-in markers at the film's
            edges; when one source of a class has them, the edges alone give the class away
            (`cxrlab explain --regions` measures it). Painted after the geometric transforms and before
            the photometric ones, so the bands get the same exposure changes and noise as real borders.
    """

    flip: float = 0.5
    rotation: float = 15.0
    translate: float = 0.1
    crop_scale_min: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    crop_scale_max: float = 1.0
    class_blur: tuple[float, ...] = ()
    frame: float = 0.0


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def random_affine_matrices(n: int, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-image affine matrices (n, 2, 3) mapping output to input coordinates in [-1, 1]."""
    area = _uniform(n, cfg.crop_scale_min, cfg.crop_scale_max, g)
    rescale = cfg.crop_scale_min < 1 or cfg.crop_scale_max > 1
    log_r = _uniform(n, math.log(3 / 4), math.log(4 / 3), g) if rescale else torch.zeros(n)
    side_max = max(1.0, math.sqrt(cfg.crop_scale_max))
    sx = torch.sqrt(area * torch.exp(log_r)).clamp(max=side_max)
    sy = torch.sqrt(area / torch.exp(log_r)).clamp(max=side_max)
    # a crop's centre keeps the crop inside the image; a zoomed-out image stays whole inside the frame
    cx = (1 - sx) * _uniform(n, -1, 1, g)
    cy = (1 - sy) * _uniform(n, -1, 1, g)
    flip = torch.where(torch.rand(n, generator=g) < cfg.flip, -1.0, 1.0)
    ang = torch.deg2rad(_uniform(n, -cfg.rotation, cfg.rotation, g))
    tx = 2 * _uniform(n, -cfg.translate, cfg.translate, g)
    ty = 2 * _uniform(n, -cfg.translate, cfg.translate, g)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx * flip, -sin * sy
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx * flip, cos * sy
    theta[:, 0, 2], theta[:, 1, 2] = cx + tx, cy + ty
    return theta


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of x (B, 1, H, W) with its own Gaussian sigma (B,), in pixels; sigma 0 is identity."""
    n = x.shape[0]
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.device, x.dtype).clamp(min=1e-3).view(n, 1)
    k = torch.exp(-0.5 * (t.view(1, -1) / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, 2r+1); a tiny sigma gives a delta kernel
    y = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")  # (1, B, H+2r, W+2r)
    y = F.conv2d(y, k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


def sharpness_batch(images: torch.Tensor) -> torch.Tensor:
    """Per image, the mean absolute difference between neighbouring pixels (vertical plus horizontal),
    on the 0..255 scale: `cxrlab audit`'s sharpness, measured at the size the images have."""
    x = images.float()
    if x.ndim == 4:
        x = x[:, 0]
    return (x.diff(dim=1).abs().mean(dim=(1, 2)) + x.diff(dim=2).abs().mean(dim=(1, 2)))


def sharpness_matching_blur(images: torch.Tensor, labels: torch.Tensor, num_classes: int, sample: int = 256,
                            seed: int = 0) -> tuple[tuple[float, ...], dict]:
    """Per-class extra blur that takes away sharpness as a cue for the class (`--aug-blur-match`).

    When the classes come from differently sized originals, one class is sharper at the model's scale
    and a network learns "sharp = that class" (measured on the Kermany set: misclassified test normals are
    the less sharp ones). For every class sharper than the least sharp one, this finds by bisection the
    Gaussian sigma s_c that brings the class's median sharpness down to the least sharp class's median; its
    images then get an extra blur drawn from [0, 2 s_c] in training, so that the classes' sharpness ranges
    overlap. Measured on up to `sample` images per class (seeded subset).

    Args:
        images: uint8 training images (N, H, W), as training sees them.
        labels: class indices (N,).
        num_classes: number of classes.
        sample: images per class to measure.
        seed: subset seed.

    Returns:
        (largest extra sigma per class, {"median": per-class median sharpness, "sigma": per-class s_c}).
    """
    g = torch.Generator().manual_seed(seed)
    picks, medians = {}, {}
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        idx = idx[torch.randperm(len(idx), generator=g)[:sample]]
        picks[c] = images[idx].float().unsqueeze(1)
        medians[c] = float(sharpness_batch(picks[c]).median())
    if len(medians) < 2:
        return (), {"median": medians, "sigma": {}}
    target = min(medians.values())
    sigma = {}
    for c, x in picks.items():
        if medians[c] <= target * 1.02:
            sigma[c] = 0.0
            continue
        lo, hi = 0.0, 6.0
        for _ in range(14):
            mid = (lo + hi) / 2
            blurred = gaussian_blur_batch(x, torch.full((len(x),), mid))
            lo, hi = (mid, hi) if float(sharpness_batch(blurred).median()) > target else (lo, mid)
        sigma[c] = (lo + hi) / 2
    return tuple(2 * sigma.get(c, 0.0) for c in range(num_classes)), {"median": medians, "sigma": sigma}


def random_frames(n: int, h: int, w: int, frame: float, g: torch.Generator) -> torch.Tensor:
    """Float masks (n, 1, h, w), 1 inside random edge bands: each side of each image gets a band with
    probability 0.5, its width drawn from [0, frame] of the side (top/bottom of h, left/right of w)."""
    on = torch.rand(n, 4, generator=g) < 0.5
    width = torch.rand(n, 4, generator=g) * frame * on
    px = (width * torch.tensor([h, h, w, w], dtype=torch.float32)).floor()
    r = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    c = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    top, bottom, left, right = (px[:, k].view(n, 1, 1) for k in range(4))
    band = (r < top) | (r >= h - bottom) | (c < left) | (c >= w - right)
    return band.unsqueeze(1).float()


def augment_batch(batch: torch.Tensor, cfg: AugmentConfig, g: torch.Generator,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
    """Augment a batch of grayscale images.

    Args:
        batch: uint8 (B, H, W) or (B, 1, H, W) tensor, on any device.
        cfg: strengths.
        g: CPU generator (the random draws are made on the CPU so results match across devices).
        labels: class indices (B,), needed only for `cfg.class_blur`.

    Returns:
        float tensor (B, 1, H, W) on the 0..255 scale, same device.
    """
    x = batch.float()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    n = x.shape[0]
    theta = random_affine_matrices(n, cfg, g).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.frame > 0:
        x = x * (1 - random_frames(n, x.shape[-2], x.shape[-1], cfg.frame, g).to(x.device))
    if cfg.blur > 0 or any(cfg.class_blur):
        sigma = _uniform(n, 0.0, cfg.blur, g) if cfg.blur > 0 else torch.zeros(n)
        if any(cfg.class_blur):
            if labels is None:
                raise ValueError("AugmentConfig.class_blur needs the batch's labels")
            top = torch.tensor(cfg.class_blur, dtype=torch.float32)[labels.cpu()]
            sigma = torch.sqrt(sigma**2 + (top * torch.rand(n, generator=g)) ** 2)
        x = gaussian_blur_batch(x, sigma)
    b = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, g).to(x.device).view(n, 1, 1, 1)
    c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g).to(x.device).view(n, 1, 1, 1)
    x = x * b
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp_(0, 255)
    if cfg.gamma > 0:
        lg = math.log(1 + cfg.gamma)
        gam = torch.exp(_uniform(n, -lg, lg, g)).to(x.device).view(n, 1, 1, 1)
        x = 255.0 * (x / 255.0).pow(gam)
    if cfg.noise > 0:
        noise = torch.randn(x.shape, generator=g).to(x.device)
        x = (x + 255.0 * cfg.noise * noise).clamp_(0, 255)
    return x
