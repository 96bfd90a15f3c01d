"""Robust reading of radiographs: PNG, JPEG, BMP, TIFF and DICOM to one 2-D ``uint8`` array.

Everything that reads an image file goes through :func:`read_gray`, so that training,
evaluation, prediction and the service see the same pixels. Conventions:

- Output is grayscale ``uint8`` (H, W), MONOCHROME2 (air dark, bone bright).
- 8-bit data is kept as is. 16-bit, 32-bit and float data is scaled linearly from its actual
  min..max to 0..255 (DICOM: from the window when the file carries one), never truncated.
- Colour is converted to luminance (ITU-R 601 weights, as Pillow's ``convert("L")``).
- Alpha is composited on black: a transparent pixel carries no image, and black is what
  "no signal" (air, padding) looks like in a MONOCHROME2 radiograph.
- EXIF orientation is applied; MONOCHROME1 DICOM is inverted; multi-frame files give frame 0.
- The pixel count is checked from the header before any decoding (decompression bombs).
- Every failure raises :class:`~cxrlab.errors.ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from cxrlab.errors import ImageReadError

SUPPORTED_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
DEFAULT_MAX_PIXELS = 100_000_000
_PIL_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "TIFF")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "RGBX": 8, "CMYK": 8,
              "YCbCr": 8, "I": 32, "F": 32}


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of :data:`SUPPORTED_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a ``.dcm``/``.dicom`` name or a file with the ``DICM`` magic at byte 128."""
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_gray(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to a grayscale radiograph.

    Args:
        path: PNG, JPEG, BMP, TIFF or DICOM file.
        max_pixels: largest width x height accepted; checked from the header before decoding.

    Returns:
        2-D ``uint8`` array (H, W).

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, of an unsupported
            format, a DICOM without pixel data, or larger than ``max_pixels``.
    """
    _check_file(path)
    try:
        if is_dicom(path):
            return _read_dicom(path, max_pixels)
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
            ds = _dcmread(path, header_only=True)
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
    return (f"{n / 1e6:.0f} Mpx exceeds the limit of {max_pixels / 1e6:.0f} Mpx; "
            "a decompression bomb? (pass a larger max_pixels for a genuine huge image)")


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

    with warnings.catch_warnings():
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


# ----------------------------------------------------------------------------- DICOM


def _dcmread(path, header_only: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        pass
    try:  # a .dcm without the 128-byte preamble: read it as a raw data set
        ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(path, f"not a valid DICOM file ({_describe(exc)})") from exc
    if "Rows" not in ds and "PixelData" not in ds:
        raise ImageReadError(path, "not a valid DICOM file (no DICM header and no image attributes)")
    return ds


def _read_dicom(path, max_pixels: int) -> np.ndarray:
    ds = _dcmread(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data (a report, or a presentation state?)")
    _check_pixels(path, int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    arr = _dicom_first_frame(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        lum = arr[..., :3].astype(np.float32) @ _LUMA
        return np.clip(lum + 0.5, 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else to_uint8(lum)
    out = _dicom_gray_to_uint8(arr, ds)
    return 255 - out if photometric == "MONOCHROME1" else out


def _dicom_first_frame(ds) -> np.ndarray:
    if hasattr(ds, "pixel_array_options"):  # pydicom >= 3: decode frame 0 only
        ds.pixel_array_options(index=0)
        return ds.pixel_array
    arr = ds.pixel_array  # pydicom 2.x: every frame
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    return arr[0] if frames > 1 and arr.ndim == (4 if spp > 1 else 3) else arr


def _dicom_luts():
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _dicom_gray_to_uint8(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT, then the VOI LUT or window when present, else the real min..max."""
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    raw_uint8 = arr.dtype == np.uint8
    arr = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence"):
        return to_uint8(apply_voi_lut(arr, ds, index=0))
    window = _window_bounds(ds)
    if window is not None:
        return to_uint8(arr, *window)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:  # SIGMOID etc.
        return to_uint8(apply_voi_lut(arr, ds, index=0))
    if raw_uint8 and arr.dtype == np.uint8:
        return arr
    return to_uint8(arr)


def _first(value) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


def _window_bounds(ds) -> tuple[float, float] | None:
    """(lo, hi) of a LINEAR / LINEAR_EXACT window (DICOM PS3.3 C.11.2.1.2), else None."""
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
    if function == "LINEAR_EXACT" and w > 0:
        return c - w / 2, c + w / 2
    if function == "LINEAR" and w > 1:
        return c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    return None
