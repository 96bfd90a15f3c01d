"""The one preprocessing preset shared by train, evaluate, predict, explain, export and serve.

An image is decoded to grayscale (`cxrlab.data.io.read_gray`), optionally contrast-equalised (globally, or
locally with CLAHE), and
resized to a square `img_size` uint8 array once; that array is what the cache stores. Turning a
uint8 batch into the model's float input (`to_model_input`) happens on tensors, on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageOps

from cxrlab.data.io import read_gray

PREPROCESS_VERSION = 1
CLAHE_TILES = 8  # tiles per side: each adapts to about an eighth of the image, whatever its resolution


@dataclass(frozen=True)
class Preprocess:
    """Settings that turn a file into the uint8 array a model sees (stored in every checkpoint).

    Attributes:
        img_size: square side in pixels.
        equalize: histogram-equalise each radiograph (evens out exposure between sites).
        crop_border: fraction of each side trimmed before resizing (removes borders and markers).
        clahe: clip limit of contrast-limited adaptive histogram equalisation (OpenCV's CLAHE on an 8x8
            grid of tiles, e.g. 2.0; 0: off): evens out contrast region by region, where `equalize`
            maps the whole image through one curve.
    """

    img_size: int = 224
    equalize: bool = False
    crop_border: float = 0.0
    clahe: float = 0.0

    def to_dict(self) -> dict:
        """Plain dict for checkpoints and cache keys."""
        d = asdict(self)
        if not self.clahe:  # presets without it keep the keys (and caches) they had before it existed
            del d["clahe"]
        return {**d, "version": PREPROCESS_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """Inverse of `to_dict` (unknown keys ignored, so older checkpoints load)."""
        return cls(**{k: d[k] for k in ("img_size", "equalize", "crop_border", "clahe") if k in d})

    @classmethod
    def of_checkpoint(cls, ckpt: dict) -> "Preprocess":
        """The preset stored in a checkpoint (or ONNX metadata) dict; older ones hold only `img_size`."""
        return cls.from_dict(ckpt.get("preprocess") or {"img_size": ckpt["img_size"]})

    def same_pixels_at(self, other: "Preprocess") -> bool:
        """True when `other` differs at most in image size (its arrays are these, resized)."""
        return replace(other, img_size=self.img_size) == self


def prepare_array(gray: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Apply the preset to a decoded grayscale image.

    Args:
        gray: 2-D uint8 array.
        pre: the preset.

    Returns:
        uint8 array of shape (img_size, img_size).
    """
    im = Image.fromarray(gray)
    if pre.crop_border > 0:
        w, h = im.size
        dx, dy = int(w * pre.crop_border), int(h * pre.crop_border)
        im = im.crop((dx, dy, w - dx, h - dy))
    if pre.equalize:
        im = ImageOps.equalize(im)
    if pre.clahe > 0:
        import cv2  # OpenCV comes with grad-cam; imported here so that other presets do not pay for it

        grid = cv2.createCLAHE(clipLimit=float(pre.clahe), tileGridSize=(CLAHE_TILES, CLAHE_TILES))
        im = Image.fromarray(grid.apply(np.ascontiguousarray(np.asarray(im, dtype=np.uint8))))
    if im.size != (pre.img_size, pre.img_size):
        im = im.resize((pre.img_size, pre.img_size), Image.BILINEAR, reducing_gap=None)
    return np.asarray(im, dtype=np.uint8)


def load_array(path, pre: Preprocess) -> np.ndarray:
    """Decode a file and apply the preset (raises `ImageReadError` for bad files)."""
    return prepare_array(read_gray(path), pre)


def to_model_input(batch: torch.Tensor, mean: list[float], std: list[float], in_chans: int) -> torch.Tensor:
    """uint8 (B, H, W) or (B, 1, H, W) -> normalised float (B, in_chans, H, W).

    Args:
        batch: uint8 or float (0..255) tensor.
        mean, std: per-channel statistics on the 0..1 scale, `in_chans` long.
        in_chans: channels the model expects (the gray channel is repeated).

    Returns:
        float32 tensor on the batch's device.
    """
    x = batch.float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if in_chans != x.shape[1]:
        x = x.expand(-1, in_chans, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
