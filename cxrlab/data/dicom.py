"""DICOM decoding for `cxrlab.data.io.read_gray`: modality and VOI LUTs, windows, MONOCHROME1,
frame 0 of multi-frame files (with a warning), and compressed transfer syntaxes that no installed
decoder handles named with the fix."""

from __future__ import annotations

import logging
import re

import numpy as np

from cxrlab.data.io import _LUMA, _check_pixels, _describe, to_uint8
from cxrlab.errors import ImageReadError

log = logging.getLogger(__name__)

_MULTIFRAME_WARNED: set[str] = set()
_NO_DECODER = "pydicom has no decoder for this transfer syntax"


def dcmread(path, header_only: bool = False):
    """Read a DICOM data set (with or without the 128-byte preamble); ImageReadError when it is none."""
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


def read_dicom(path, max_pixels: int) -> np.ndarray:
    """Frame 0 of a DICOM file as a grayscale uint8 radiograph (see `cxrlab.data.io.read_gray`)."""
    ds = dcmread(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data (a report, or a presentation state?)")
    _check_pixels(path, int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), max_pixels)
    _warn_multiframe(path, ds)
    arr = _decode_first_frame(path, ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        lum = arr[..., :3].astype(np.float32) @ _LUMA
        return np.clip(lum + 0.5, 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else to_uint8(lum)
    out = _dicom_gray_to_uint8(arr, ds)
    return 255 - out if photometric == "MONOCHROME1" else out


def _warn_multiframe(path, ds) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and str(path) not in _MULTIFRAME_WARNED:
        _MULTIFRAME_WARNED.add(str(path))
        log.warning("%s: multi-frame DICOM: frame 0 of %d frames used, the other %d ignored",
                    path, frames, frames - 1)


def _decode_first_frame(path, ds) -> np.ndarray:
    """Frame 0; a compressed transfer syntax that cannot be decoded names itself and the fix."""
    ts = _transfer_syntax(ds)
    if ts is None or not _is_compressed(ts):
        return _dicom_first_frame(ds)
    missing = _missing_decoder(ts)
    if missing:
        raise ImageReadError(path, _codec_reason(ts, missing))
    try:
        return _dicom_first_frame(ds)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's RuntimeError/NotImplementedError/ValueError
        why = f"the installed decoders failed ({_plugin_errors(exc)}): corrupt, or needs another decoder"
        raise ImageReadError(path, _codec_reason(ts, why)) from exc


def _transfer_syntax(ds):
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid or None


def _is_compressed(ts) -> bool:
    try:
        return bool(ts.is_compressed)
    except ValueError:  # not a transfer syntax pydicom knows (e.g. JPEG XL in pydicom 3.0)
        return True


def _missing_decoder(ts) -> str | None:
    """Why no installed pydicom plugin can decode ``ts``; None when one can (or pydicom 2.x)."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.x: its errors are mapped after decoding
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return _NO_DECODER
    if not decoder.is_available:
        return "no pixel data decoder for it is installed"
    return None


def _codec_reason(ts, why: str) -> str:
    known = ts.name != str(ts)
    desc = f"{ts.name}, transfer syntax UID {ts}" if known else f"transfer syntax UID {ts}, unknown to pydicom"
    convert = "convert the file to uncompressed DICOM first: `gdcmconv --raw in.dcm out.dcm`"
    if not known or why == _NO_DECODER:
        return f"compressed DICOM ({desc}) cannot be decoded: {why}; {convert}, or export it as PNG"
    return (f"compressed DICOM ({desc}) cannot be decoded: {why}. Install a decoder for pydicom: "
            f"`{_codec_install_hint(str(ts))}`, or {convert}")


def _codec_install_hint(uid: str) -> str:
    tail = uid.rsplit(".", 1)[-1] if uid.startswith("1.2.840.10008.1.2.4.") else ""
    if tail in {"90", "91", "92", "93", "201", "202", "203"}:  # JPEG 2000, HTJ2K
        return "pip install pylibjpeg pylibjpeg-openjpeg"
    if tail in {"50", "51", "57", "70", "80", "81"}:  # JPEG baseline/extended/lossless, JPEG-LS
        return "pip install pylibjpeg pylibjpeg-libjpeg"
    if uid == "1.2.840.10008.1.2.5":  # RLE
        return "pip install pylibjpeg pylibjpeg-rle"
    return "pip install python-gdcm"


def _plugin_errors(exc: Exception) -> str:
    """pydicom's per-plugin failures on one line, without object reprs (``<... at 0x7f...>``)."""
    msg = re.sub(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>", "", str(exc))
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    detail = "; ".join(lines[1:] if len(lines) > 1 else lines) or type(exc).__name__
    return detail[:200]


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
