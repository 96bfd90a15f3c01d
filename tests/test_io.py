"""cxrlab.data.io: decoding of every supported format, and clean errors for every bad file."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from cxrlab.data.io import SUPPORTED_EXTENSIONS, is_image_file, read_gray, read_header, sniff_intensity_warning
from cxrlab.errors import CxrlabError, ImageReadError

pydicom = pytest.importorskip("pydicom")


def ramp(h=24, w=40, lo=1000, hi=3000, dtype=np.uint16):
    return np.linspace(lo, hi, h * w).reshape(h, w).astype(dtype)


def write_dicom(path, arr, photometric="MONOCHROME2", pixels=True, **tags):
    """A minimal uncompressed DICOM file (explicit VR little endian) built with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
    frames = arr.shape[0] if arr.ndim == 3 else 1
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for k, v in tags.items():
        setattr(ds, k, v)
    if pixels:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- formats


def test_extensions():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"} <= SUPPORTED_EXTENSIONS
    assert is_image_file("a/B.PNG") and is_image_file("x.dcm") and not is_image_file("notes.txt")


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".jpg"])
def test_8bit_roundtrip(tmp_path, ext):
    arr = ramp(16, 20, 10, 240, np.uint8)
    Image.fromarray(arr).save(tmp_path / f"a{ext}")
    out = read_gray(tmp_path / f"a{ext}")
    assert out.dtype == np.uint8 and out.shape == (16, 20)
    assert np.abs(out.astype(int) - arr).max() <= (8 if ext == ".jpg" else 0)


def test_16bit_png_uses_real_range(tmp_path):
    Image.fromarray(ramp()).save(tmp_path / "a.png")
    out = read_gray(tmp_path / "a.png")
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 200


def test_float_tiff_scaled(tmp_path):
    Image.fromarray(ramp(lo=-5, hi=7, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    out = read_gray(tmp_path / "f.tif")
    assert out.min() == 0 and out.max() == 255


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :4, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_gray(tmp_path / "a.png")
    assert (out[:, :4] == 200).all() and (out[:, 4:] == 0).all()


def test_palette_and_cmyk(tmp_path):
    rgb = np.stack([np.full((6, 9), v, np.uint8) for v in (255, 0, 0)], -1)  # pure red
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    red = round(0.299 * 255)
    assert abs(int(read_gray(tmp_path / "p.png")[0, 0]) - red) <= 1
    assert abs(int(read_gray(tmp_path / "c.jpg")[3, 3]) - red) <= 6


def test_exif_orientation_applied(tmp_path):
    arr = ramp(10, 30, 0, 255, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    assert read_gray(tmp_path / "r.jpg").shape == (30, 10)


# ----------------------------------------------------------------------------- DICOM


def test_dicom_rescale_and_monochrome1(tmp_path):
    data = ramp(lo=100, hi=900)
    m2 = read_gray(write_dicom(tmp_path / "m2.dcm", data, RescaleSlope=2, RescaleIntercept=-1024))
    m1 = read_gray(write_dicom(tmp_path / "m1.dcm", data, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024))
    assert m2.min() == 0 and m2.max() == 255 and m2[0, 0] < m2[-1, -1]
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_window(tmp_path):
    data = ramp(lo=0, hi=4000)
    out = read_gray(write_dicom(tmp_path / "w.dcm", data, WindowCenter=2000, WindowWidth=1000))
    assert (out[data < 1400] == 0).all() and (out[data > 2600] == 255).all()
    mid = (data > 1600) & (data < 2400)
    assert 0 < out[mid].min() and out[mid].max() < 255


def test_dicom_magic_without_extension_and_multiframe(tmp_path):
    frames = np.stack([ramp(lo=0, hi=500), ramp(lo=500, hi=0)])
    out = read_gray(write_dicom(tmp_path / "image.bin", frames))
    assert out.shape == (24, 40) and out[0, 0] < out[-1, -1]  # frame 0


def test_dicom_without_pixels(tmp_path):
    path = write_dicom(tmp_path / "sr.dcm", ramp(), pixels=False)
    with pytest.raises(ImageReadError, match="no pixel data") as e:
        read_gray(path)
    assert e.value.path == str(path)


# ----------------------------------------------------------------------------- bad files


def _bad_files(tmp_path):
    good = io.BytesIO()
    Image.fromarray(ramp(64, 64, 0, 255, np.uint8)).save(good, "PNG")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "anim.gif")
    cases = {
        "empty.png": (b"", "empty"),
        "trunc.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated"),
        "text.jpg": (b"hello, this is not a picture\n", "text"),
        "anim.gif": (None, "unsupported format GIF"),
        "junk.dcm": (b"\x01\x02" * 40, "DICOM"),
    }
    for name, (data, _) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return {tmp_path / k: v[1] for k, v in cases.items()}


def test_bad_files_raise_image_read_error(tmp_path):
    for path, reason in _bad_files(tmp_path).items():
        with pytest.raises(ImageReadError, match=reason) as e:
            read_gray(path)
        assert isinstance(e.value, CxrlabError) and str(path) in str(e.value)
    with pytest.raises(ImageReadError, match="not found"):
        read_gray(tmp_path / "missing.png")


def png_header_only(w, h):
    """A PNG whose header claims w x h pixels, with a tiny (broken) data stream."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_cap_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(20000, 20000))  # 400 Mpx claimed, nothing allocated
    with pytest.raises(ImageReadError, match="400 Mpx exceeds the limit of 100 Mpx"):
        read_gray(path)
    path2 = tmp_path / "mid.png"
    path2.write_bytes(png_header_only(5000, 5000))  # 25 Mpx: under Pillow's limits, over ours
    with pytest.raises(ImageReadError, match="25 Mpx exceeds the limit of 1 Mpx"):
        read_gray(path2, max_pixels=1_000_000)
    assert read_header(path2)["width"] == 5000


def test_sniff_intensity_warning():
    rng = np.random.default_rng(0)
    assert sniff_intensity_warning(rng.integers(20, 200, (64, 64), dtype=np.uint8)) is None
    assert "constant" in sniff_intensity_warning(np.full((64, 64), 7, np.uint8))
    sat = np.zeros((64, 64), np.uint8)
    sat[:, :20] = 255
    sat[0, 0:40] = np.arange(40)
    assert "saturated" in sniff_intensity_warning(sat)


# ----------------------------------------------------------------------------- properties

_fast = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@_fast
@given(arr=st.one_of(arrays(np.uint8, _shapes), arrays(np.uint16, _shapes)), fmt=st.sampled_from(["png", "tiff"]))
def test_any_array_roundtrips(tmp_path, arr, fmt):
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(arr).save(path)
    out = read_gray(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    if arr.dtype == np.uint8:
        np.testing.assert_array_equal(out, arr)


@_fast
@given(data=st.binary(min_size=0, max_size=300), ext=st.sampled_from([".png", ".jpg", ".tif", ".bmp", ".dcm"]))
def test_random_bytes_decode_or_raise_image_read_error(tmp_path, data, ext):
    path = tmp_path / f"r{ext}"
    path.write_bytes(data)
    try:
        out = read_gray(path)
    except ImageReadError:
        return
    assert out.dtype == np.uint8 and out.ndim == 2


@_fast
@given(prefix=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"\0" * 128 + b"DICM"]),
       tail=st.binary(max_size=200))
def test_magic_plus_garbage_raises_image_read_error(tmp_path, prefix, tail):
    path = tmp_path / "g.png"
    path.write_bytes(prefix + tail)
    try:
        read_gray(path)
    except ImageReadError:
        pass
