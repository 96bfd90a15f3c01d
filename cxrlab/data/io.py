"""Robust reading of radiographs: PNG, JPEG, BMP, TIFF and DICOM to one 2-D ``uint8`` array.

Everything that reads an image file goes through :func:`read_gray`, so that training,
evaluation, prediction and the service see the same pixels. Conventions:

- Output is grayscale ``uint8`` (H, W), MONOCHROME2 (air dark, bone bright).
- 8-bit data is kept as is. 16-bit, 32-bit and float data is scaled linearly from its actual
  min..max to 0..255 (DICOM: from the window when the file carries one), never truncated.
- Colour is converted to luminance (ITU-R 601 weights, as Pillow's ``convert("L")``).
- Alpha is composited on black: a transparent pixel carries no image, and black is what
  "no signal" (air, padding) looks like in a MONOCHROME2 radiograph.
- EXIF orientation is applied; MONOCHROME1 DICOM is inverted; multi-frame files give frame 0
  (with a warning, logged once per file).
- DICOM is recognised by content (the ``DICM`` magic at byte 128), not by the file name; a ``.dcm``
  without that magic is read as a preamble-less DICOM data set unless it is a PNG/JPEG/BMP/TIFF.
- The pixel count is checked from the header before any decoding (decompression bombs). The limit
  is :data:`DEFAULT_MAX_PIXELS`, or the environment variable ``CXRLAB_MAX_PIXELS`` (pixels).
- Every failure raises :class:`~cxrlab.errors.ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError, ImageReadError

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "CXRLAB_MAX_PIXELS"
_DICM_OFFSET = 128
# Magic numbers of the Pillow formats: a file starting with one is not DICOM, whatever its name.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8",
                b"\x00\x00\x00\x0cjP  ", b"\xff\x4f\xff\x51")
_PIL_LIMIT_LOCK = threading.Lock()
_PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8,
              "YCbCr": 8, "I": 32, "F": 32}


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file that folder scans should read as an image.

    That is a name with one of :data:`SUPPORTED_EXTENSIONS` (case-insensitive), or a DICOM file
    without an extension (or with a numeric one, as in UID-named files), as PACS exports name
    them (``IM0001``, ``1.2.840....``): those are recognised by the ``DICM`` magic, reading only
    their first 132 bytes. Hidden files, ``DICOMDIR`` and other extensions are excluded unread.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SUPPORTED_EXTENSIONS:
        return True
    if (suffix and not suffix[1:].isdigit()) or p.name.startswith(".") or p.name.upper() == "DICOMDIR":
        return False
    return _read_head(p, _DICM_OFFSET + 4)[_DICM_OFFSET:] == b"DICM"


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the content is DICOM, whatever the file name.

    That is the ``DICM`` magic at byte 128, or a ``.dcm``/``.dicom`` name on a file that does not
    start like a PNG, JPEG, BMP, TIFF, GIF or JPEG 2000 image (a DICOM data set without the
    128-byte preamble; :func:`read_gray` then checks it with pydicom). A PNG named ``a.dcm`` is
    therefore a PNG, and a DICOM named ``a.png`` or ``IM0001`` is DICOM.
    """
    head = _read_head(path, _DICM_OFFSET + 4)
    if head[_DICM_OFFSET:] == b"DICM":
        return True
    return Path(path).suffix.lower() in DICOM_EXTENSIONS and not head.startswith(_IMAGE_MAGIC)


def default_max_pixels() -> int:
    """The pixel limit of :func:`read_gray`: ``$CXRLAB_MAX_PIXELS`` when set, else 100 Mpx.

    Set it (in pixels, e.g. ``CXRLAB_MAX_PIXELS=300000000`` or ``3e8``) before ``cxrlab predict``,
    ``train`` or ``serve`` to accept genuine images above 100 Mpx; it also lifts Pillow's own
    decompression-bomb limit up to that size.

    Raises:
        CxrlabError: the variable is set but is not a positive number.
    """
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise CxrlabError(f"{MAX_PIXELS_ENV}={raw!r} is not a number of pixels; set it to a positive "
                          f"number such as {MAX_PIXELS_ENV}=300000000 (300 Mpx), or unset it for the "
                          f"default of {DEFAULT_MAX_PIXELS / 1e6:.0f} Mpx")
    return int(value)


def read_gray(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file to a grayscale radiograph.

    Args:
        path: PNG, JPEG, BMP, TIFF or DICOM file (recognised by content, not by name).
        max_pixels: largest width x height accepted; checked from the header before decoding.
            None: :func:`default_max_pixels` (``$CXRLAB_MAX_PIXELS``, else 100 Mpx).

    Returns:
        2-D ``uint8`` array (H, W).

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, of an unsupported
            format, a DICOM without pixel data or in a transfer syntax that no installed
            decoder handles, or larger than ``max_pixels``.
        CxrlabError: ``$CXRLAB_MAX_PIXELS`` is set to something that is not a pixel count.
    """
    if max_pixels is None:
        max_pixels = default_max_pixels()
    _check_file(path)
    try:
        if is_dicom(path):
            from cxrlab.data.dicom import read_dicom

            return read_dicom(path, max_pixels)
        return _read_pil(path, max_pixels)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(path, "not enough memory to decode this image") from None
    except Exception as exc:  # noqa: BLE001 - never leak a decoder's own exception type
        raise ImageReadError(path, _describe(exc)) from exc


def read_header(path: str | os.PathLike) -> dict:
    """Format, size, mode and bit depth from the header only (no pixel decoding).

    Returns:
        ``{"format", "width", "height", "mode", "bits"}``.

    Raises:
        ImageReadError: as :func:`read_gray`, for what the header alone reveals.
    """
    _check_file(path)
    try:
        if is_dicom(path):
            from cxrlab.data.dicom import dcmread

            ds = dcmread(path, header_only=True)
            mode = str(ds.get("PhotometricInterpretation", "?"))
            return {"format": "DICOM", "width": int(ds.get("Columns", 0)), "height": int(ds.get("Rows", 0)),
                    "mode": mode, "bits": int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0)}
        with _open_pil(path, max_pixels=2**62) as im:
            bits = 16 if im.mode.startswith("I;16") else _MODE_BITS.get(im.mode, 8)
            return {"format": im.format, "width": im.width, "height": im.height, "mode": im.mode, "bits": bits}
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(path, _describe(exc)) from exc


def sniff_intensity_warning(arr: np.ndarray) -> str | None:
    """A warning when a decoded image looks wrong for a radiograph (as torchxrayvision does).

    Args:
        arr: 2-D ``uint8`` image from :func:`read_gray`.

    Returns:
        A human-readable warning, or None when the image looks plausible.
    """
    if arr.size == 0:
        return "empty image (0 pixels)"
    a = arr[:: max(1, arr.shape[0] // 512), :: max(1, arr.shape[1] // 512)]  # a cheap subsample
    std = float(a.std())
    if std < 2.0:
        return f"nearly constant image (std {std:.2f} of 255): blank, or a failed export?"
    saturated = float(np.mean((a == 0) | (a == 255)))
    if saturated > 0.5:
        return f"{saturated:.0%} of pixels are saturated (0 or 255): over-windowed, or a mask?"
    levels = len(np.unique(a))
    if levels < 8:
        return f"only {levels} grey levels: a segmentation mask or a thresholded image?"
    mean = float(a.mean())
    if mean > 225:
        return f"very bright image (mean {mean:.0f} of 255): inverted (MONOCHROME1) or washed out?"
    return None


def to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale ``arr`` linearly from ``lo..hi`` (default: its finite min..max) to ``uint8``.

    NaN maps to 0; a constant image maps to all zeros.
    """
    a = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(a)
    if lo is None or hi is None:
        if not finite.any():
            return np.zeros(a.shape, np.uint8)
        vals = a if finite.all() else a[finite]
        lo, hi = float(vals.min()), float(vals.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    out = (np.where(finite, a, lo) - lo) * (255.0 / (hi - lo)) + 0.5
    return np.clip(out, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- checks, errors


def _read_head(path, n: int) -> bytes:
    """The first ``n`` bytes of a file; ``b""`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _check_file(path) -> None:
    p = Path(path)
    if not p.exists():
        raise ImageReadError(path, "file not found")
    if p.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if p.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _check_pixels(path, width: int, height: int, max_pixels: int) -> None:
    n = int(width) * int(height)
    if n > max_pixels:
        raise ImageReadError(path, f"{width} x {height} = " + _too_many(n, max_pixels))


def _too_many(n: int, max_pixels: int) -> str:
    return (f"{n / 1e6:.0f} Mpx exceeds the limit of {max_pixels / 1e6:.0f} Mpx (a decompression bomb?). "
            f"For a genuine image this large, downscale it below {max_pixels / 1e6:.0f} Mpx first "
            "(e.g. `magick in.png -resize 50% out.png`), or raise the limit with the environment "
            f"variable {MAX_PIXELS_ENV} (pixels, e.g. {MAX_PIXELS_ENV}={math.ceil(n / 1e6)}000000)")


def _describe(exc: Exception) -> str:
    """A short human reason for a decoder exception."""
    from PIL import Image, UnidentifiedImageError

    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        m = re.search(r"\((\d+) pixels\).*?(\d+) pixels", msg)
        if m:
            return (f"{int(m[1]) / 1e6:.0f} Mpx exceeds Pillow's hard limit of {int(m[2]) / 1e6:.0f} Mpx; "
                    "a decompression bomb")
        return f"decompression bomb: {msg}"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify its format)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, EOFError) or "truncated" in msg.lower() or "premature end" in msg.lower():
        return f"truncated or corrupt file ({msg})"
    return f"cannot decode ({type(exc).__name__}: {msg})"


# ----------------------------------------------------------------------------- Pillow formats


def _open_pil(path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Open with Pillow, header only; supported formats only; Pillow's bomb warning silenced
    (our own ``max_pixels`` check replaces it)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise ImageReadError(path, _unidentified_reason(path)) from None
        except Image.DecompressionBombError as exc:  # Pillow's hard limit (2x MAX_IMAGE_PIXELS)
            m = re.search(r"\((\d+) pixels\)", str(exc))
            if m and int(m[1]) > max_pixels:
                raise ImageReadError(path, _too_many(int(m[1]), max_pixels)) from None
            raise ImageReadError(path, _describe(exc)) from None
    if im.format not in _PIL_FORMATS:
        fmt = im.format
        im.close()
        raise ImageReadError(path, f"unsupported format {fmt}; supported: PNG, JPEG, BMP, TIFF, DICOM")
    return im


@contextmanager
def _pil_pixel_limit(max_pixels: int):
    """Lift Pillow's hard bomb limit (2 x ``Image.MAX_IMAGE_PIXELS``) to ``max_pixels`` while
    opening, so that a raised ``$CXRLAB_MAX_PIXELS`` also works for Pillow formats."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is None or max_pixels <= 2 * Image.MAX_IMAGE_PIXELS:
        yield
        return
    with _PIL_LIMIT_LOCK:
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _unidentified_reason(path) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.strip() and all(c.isprintable() or c.isspace() for c in text):
        return f"not an image: the file holds text (starts with {text.strip()[:30]!r})"
    return f"not an image, or an unsupported format (first bytes {head[:8].hex(' ')})"


def _read_pil(path, max_pixels: int) -> np.ndarray:
    from PIL import ImageOps

    with _open_pil(path, max_pixels) as im:
        _check_pixels(path, im.width, im.height, max_pixels)
        im.load()  # full decode now: truncated files fail here (LOAD_TRUNCATED_IMAGES stays off)
        im = ImageOps.exif_transpose(im) or im
        return _pil_to_gray(im)


def _pil_to_gray(im) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":  # I;16*, I, F: scale the real range
        return to_uint8(np.asarray(im))
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        lum = rgba[..., :3] @ _LUMA * (rgba[..., 3] / 255.0)  # composite on black
        return np.clip(lum + 0.5, 0, 255).astype(np.uint8)
    if mode != "RGB":  # CMYK, YCbCr, LAB, HSV, 1, ...
        im = im.convert("RGB")
    return np.array(im.convert("L"), dtype=np.uint8)
