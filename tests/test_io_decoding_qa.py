"""cxrlab.data.io, QA findings: undecodable compressed DICOM, the pixel limit, DICOM by content,
extensionless DICOM in folder scans, multi-frame warning."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.io import is_dicom, is_image_file, read_gray
from cxrlab.errors import CxrlabError, ImageReadError

pydicom = pytest.importorskip("pydicom")

from test_io import png_header_only, ramp, write_dicom  # noqa: E402

JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def write_compressed_dicom(path, frame: bytes, transfer_syntax: str, rows=24, cols=40):
    """An 8-bit DICOM whose encapsulated pixel data is ``frame``, under ``transfer_syntax``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds.save_as(str(path), enforce_file_format=True)
    return path


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- 1. codecs


def test_undecodable_jpeg2000_names_transfer_syntax_and_fix(tmp_path):
    path = write_compressed_dicom(tmp_path / "j2k.dcm", b"\0" * 100, JPEG2000_LOSSLESS)
    with pytest.raises(ImageReadError) as e:
        read_gray(path)
    msg = str(e.value)
    assert str(path) in msg and "JPEG 2000" in msg and JPEG2000_LOSSLESS in msg
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in msg and "gdcmconv --raw" in msg
    assert " at 0x" not in msg and "<_io" not in msg and "RuntimeError" not in msg


def test_missing_codec_names_transfer_syntax_and_package(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    if get_decoder(JPEG_LS_LOSSLESS).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_compressed_dicom(tmp_path / "jls.dcm", b"\0" * 100, JPEG_LS_LOSSLESS)
    with pytest.raises(ImageReadError, match="no pixel data decoder for it is installed") as e:
        read_gray(path)
    msg = str(e.value)
    assert "JPEG-LS Lossless" in msg and JPEG_LS_LOSSLESS in msg and "pylibjpeg-libjpeg" in msg
    assert "gdcm - requires" not in msg  # pydicom's own listing is replaced, not pasted


def test_transfer_syntax_without_any_decoder(tmp_path):
    path = write_compressed_dicom(tmp_path / "xl.dcm", b"\0" * 100, "1.2.840.10008.1.2.4.100")  # MPEG2
    jpeg_xl = b"1.2.840.10008.1.2.4.110"  # same length: unknown to pydicom 3.0, which refuses to write it
    path.write_bytes(path.read_bytes().replace(b"1.2.840.10008.1.2.4.100", jpeg_xl))
    with pytest.raises(ImageReadError, match="pydicom has no decoder for this transfer syntax") as e:
        read_gray(path)
    assert jpeg_xl.decode() in str(e.value) and "gdcmconv --raw" in str(e.value)
    assert "pip install" not in str(e.value) and "NotImplementedError" not in str(e.value)


def test_decodable_jpeg2000_still_reads(tmp_path):
    from PIL import features

    if not features.check("jpg_2000"):
        pytest.skip("Pillow without OpenJPEG")
    buf = io.BytesIO()
    Image.fromarray(ramp(24, 40, 0, 255, np.uint8)).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
    out = read_gray(write_compressed_dicom(tmp_path / "ok.dcm", buf.getvalue(), JPEG2000_LOSSLESS))
    assert out.shape == (24, 40) and out[0, 0] < out[-1, -1]


# ----------------------------------------------------------------------------- 2. pixel limit


def test_too_large_message_names_a_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("CXRLAB_MAX_PIXELS", raising=False)
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(12000, 12000))  # 144 Mpx claimed
    with pytest.raises(ImageReadError, match="144 Mpx exceeds the limit of 100 Mpx") as e:
        read_gray(path)
    msg = str(e.value)
    assert "max_pixels" not in msg and "downscale" in msg and "CXRLAB_MAX_PIXELS=144000000" in msg


def test_env_var_sets_the_limit(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    small.write_bytes(png_bytes(ramp(100, 100, 0, 255, np.uint8)))  # 10 000 px
    monkeypatch.setenv("CXRLAB_MAX_PIXELS", "5000")
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_gray(small)
    dcm = write_dicom(tmp_path / "a.dcm", ramp(100, 100))
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_gray(dcm)
    monkeypatch.setenv("CXRLAB_MAX_PIXELS", "1e4")
    assert read_gray(small).shape == (100, 100) and read_gray(dcm).shape == (100, 100)
    monkeypatch.setenv("CXRLAB_MAX_PIXELS", "lots")
    with pytest.raises(CxrlabError, match="CXRLAB_MAX_PIXELS='lots' is not a number of pixels"):
        read_gray(small)


def test_env_var_above_pillows_own_limit(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(20000, 10000))  # 200 Mpx: over Pillow's hard limit of 179 Mpx
    pillow_limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv("CXRLAB_MAX_PIXELS", "300000000")
    with pytest.raises(ImageReadError, match="truncated"):  # past the header checks, to the (broken) data
        read_gray(path)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # restored


# ----------------------------------------------------------------------------- 3. DICOM by content


def test_png_named_dcm_decodes_as_png(tmp_path):
    arr = ramp(16, 20, 10, 240, np.uint8)
    path = tmp_path / "a.dcm"
    path.write_bytes(png_bytes(arr))
    assert not is_dicom(path)
    np.testing.assert_array_equal(read_gray(path), arr)


def test_dicom_named_png_and_preambleless_dcm(tmp_path):
    dcm = write_dicom(tmp_path / "a.png", ramp())
    assert is_dicom(dcm) and read_gray(dcm).shape == (24, 40)
    raw = tmp_path / "raw.dcm"
    raw.write_bytes(write_dicom(tmp_path / "full.dcm", ramp()).read_bytes()[132:])  # no preamble, no DICM
    assert is_dicom(raw) and read_gray(raw).shape == (24, 40)
    (tmp_path / "junk.dcm").write_bytes(b"\x01\x02" * 40)
    with pytest.raises(ImageReadError, match="not a valid DICOM file"):  # junk .dcm keeps the DICOM reason
        read_gray(tmp_path / "junk.dcm")


# ----------------------------------------------------------------------------- 4. folder scans


def test_extensionless_dicom_counts_as_image(tmp_path):
    write_dicom(tmp_path / "IM0001", ramp())
    write_dicom(tmp_path / "1.2.840.113619.2.55.3.320", ramp())
    write_dicom(tmp_path / ".hidden", ramp())
    write_dicom(tmp_path / "DICOMDIR", ramp())
    write_dicom(tmp_path / "notes.txt", ramp())
    (tmp_path / "README").write_text("not an image\n")
    (tmp_path / "tiny").write_bytes(b"x")
    assert is_image_file(tmp_path / "IM0001") and is_image_file(tmp_path / "1.2.840.113619.2.55.3.320")
    for name in (".hidden", "DICOMDIR", "notes.txt", "README", "tiny", "missing"):
        assert not is_image_file(tmp_path / name), name


def test_folder_index_finds_extensionless_dicom(tmp_path):
    from cxrlab.data.dataset import _list_images
    from cxrlab.inference import expand_inputs

    write_dicom(tmp_path / "IM0001", ramp())
    (tmp_path / "b.png").write_bytes(png_bytes(ramp(8, 8, 0, 255, np.uint8)))
    (tmp_path / "LICENSE").write_text("MIT\n")
    assert [p.name for p in _list_images(tmp_path)] == ["IM0001", "b.png"]
    assert [p.name for p in expand_inputs([str(tmp_path)])] == ["IM0001", "b.png"]


# ----------------------------------------------------------------------------- 5. multi-frame


def test_multiframe_warns_once_per_file(tmp_path, caplog):
    path = write_dicom(tmp_path / "cine.dcm", np.stack([ramp(lo=0, hi=500)] * 3))
    with caplog.at_level(logging.WARNING, logger="cxrlab.data.io"):
        read_gray(path)
        read_gray(path)
        read_gray(write_dicom(tmp_path / "single.dcm", ramp()))
    notes = [r.getMessage() for r in caplog.records if "multi-frame" in r.getMessage()]
    assert len(notes) == 1 and str(path) in notes[0] and "frame 0 of 3" in notes[0]
