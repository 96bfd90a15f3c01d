"""Data discovery: layouts, case-insensitive classes, missing classes, grouped splits, manifests, DICOM."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.dataset import build_index, carve_validation, scan
from cxrlab.data.preprocess import Preprocess, load_array
from cxrlab.errors import CxrlabError


def _img(path, value=128, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _layout(root, spec):
    for split, classes in spec.items():
        for cls, n in classes.items():
            for i in range(n):
                _img(root / split / cls / f"{cls.lower()}_{split}_{i}.png", value=10 * i)


def test_split_layout_and_case_insensitive_classes(tmp_path):
    _layout(tmp_path, {"train": {"NORMAL": 3, "PNEUMONIA": 3}, "val": {"normal": 2, "Pneumonia": 2},
                       "test": {"normal": 1, "PNEUMONIA": 1}})
    idx = build_index(tmp_path)
    assert idx.class_names == ["NORMAL", "PNEUMONIA"]
    assert {s.label for s in idx.splits["val"]} == {"NORMAL", "PNEUMONIA"}
    assert idx.summary() == {"train": {"NORMAL": 3, "PNEUMONIA": 3}, "val": {"NORMAL": 2, "PNEUMONIA": 2},
                             "test": {"NORMAL": 1, "PNEUMONIA": 1}}
    assert sorted(idx.labels("test").tolist()) == [0, 1]


def test_missing_class_in_split_is_named(tmp_path):
    _layout(tmp_path, {"train": {"NORMAL": 2, "PNEUMONIA": 2, "TB": 2}, "val": {"NORMAL": 1, "PNEUMONIA": 1}})
    with pytest.raises(CxrlabError, match="TB has no images in the val split"):
        build_index(tmp_path)


def test_one_class_only_is_an_error(tmp_path):
    _layout(tmp_path, {"train": {"NORMAL": 3}})
    with pytest.raises(CxrlabError, match="only one class"):
        build_index(tmp_path)


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(CxrlabError, match="does not exist"):
        build_index(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlabError, match="no images found"):
        build_index(tmp_path / "empty")


def test_flat_class_folders_for_external_evaluation(tmp_path):
    _layout(tmp_path, {".": {"NORMAL": 2, "PNEUMONIA": 3}})
    idx = build_index(tmp_path, require=(), val_fraction=0)
    assert list(idx.splits) == ["all"] and len(idx.splits["all"]) == 5


def test_carved_validation_is_stratified_seeded_and_grouped(tmp_path):
    for cls in ("NORMAL", "PNEUMONIA"):
        for patient in range(10):
            for view in range(2):
                _img(tmp_path / "train" / cls / f"person{cls[0]}{patient}_view{view}.png", value=patient)
    idx = build_index(tmp_path, group_regex=r"(person\w+?)_view", val_fraction=0.2, seed=3)
    val_groups = {s.group for s in idx.splits["val"]}
    train_groups = {s.group for s in idx.splits["train"]}
    assert val_groups and not val_groups & train_groups
    assert {s.label for s in idx.splits["val"]} == {"NORMAL", "PNEUMONIA"}
    assert len(idx.splits["val"]) == 8  # 20% of 20 images per class, whole patients of 2 images
    again = build_index(tmp_path, group_regex=r"(person\w+?)_view", val_fraction=0.2, seed=3)
    assert [s.path for s in again.splits["val"]] == [s.path for s in idx.splits["val"]]
    other = build_index(tmp_path, group_regex=r"(person\w+?)_view", val_fraction=0.2, seed=4)
    assert [s.path for s in other.splits["val"]] != [s.path for s in idx.splits["val"]]


def test_carve_rejects_bad_fraction():
    with pytest.raises(CxrlabError, match="between 0 and 1"):
        carve_validation([], 1.5, 0)


def test_manifest_with_sources_and_path_escape(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    m = tmp_path / "m.csv"
    m.write_text("path,label,split,group,source\nimgs/a.png,NORMAL,train,p1,siteA\nimgs/b.png,TB,test,p2,siteB\n")
    samples = scan(m)
    assert [(s.label, s.split, s.group, s.source) for s in samples] == [("NORMAL", "train", "p1", "siteA"),
                                                                      ("TB", "test", "p2", "siteB")]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n../../etc/passwd,NORMAL\n")
    with pytest.raises(CxrlabError, match="outside the manifest"):
        scan(bad)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("file,class\nx.png,A\n")
    with pytest.raises(CxrlabError, match="needs columns path,label"):
        scan(nolabel)


def test_dicom_monochrome1_is_inverted_through_the_preset(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def write(path, photometric):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CR", "X"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 32, 32, 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ramp = np.tile(np.linspace(0, 4000, 32, dtype=np.uint16), (32, 1))
        ds.PixelData = ramp.tobytes()
        ds.save_as(str(path), enforce_file_format=True)

    write(tmp_path / "m2.dcm", "MONOCHROME2")
    write(tmp_path / "m1.dcm", "MONOCHROME1")
    a2 = load_array(tmp_path / "m2.dcm", Preprocess(img_size=32))
    a1 = load_array(tmp_path / "m1.dcm", Preprocess(img_size=32))
    assert a2[:, 0].mean() < 20 and a2[:, -1].mean() > 235  # full range used, dark to bright
    assert np.abs(a1.astype(int) + a2.astype(int) - 255).max() <= 1  # MONOCHROME1 is the inverse


def test_dicom_in_a_folder_dataset(tmp_path):
    pytest.importorskip("pydicom")
    _layout(tmp_path, {"train": {"A": 2, "B": 2}})
    (tmp_path / "train" / "A" / "x.dcm").write_bytes(b"")
    assert any(s.path.suffix == ".dcm" for s in scan(tmp_path))


def test_split_seed_fixes_the_carve_across_training_seeds(tmp_path):
    """Ensemble members: other --seed, same --split-seed -> the same validation images (and the default follows --seed)."""
    from cxrlab.config import TrainConfig
    from cxrlab.train import data_index

    for cls in ("NORMAL", "PNEUMONIA"):
        for patient in range(12):
            _img(tmp_path / "d" / "train" / cls / f"person{cls[0]}{patient}_view0.png", value=patient)

    def val_paths(**kw):
        cfg = TrainConfig(data=str(tmp_path / "d"), group_regex=r"(person\w+?)_view", val_fraction=0.25, **kw)
        return [s.path for s in data_index(cfg).splits["val"]]

    fixed = val_paths(seed=1, split_seed=7)
    assert fixed == val_paths(seed=2, split_seed=7)
    assert fixed == [s.path for s in build_index(tmp_path / "d", group_regex=r"(person\w+?)_view", val_fraction=0.25,
                                                 seed=7).splits["val"]]
    assert val_paths(seed=1) != val_paths(seed=2)
    assert TrainConfig(seed=5).carve_seed == 5 and TrainConfig(seed=5, split_seed=0).carve_seed == 0


def test_a_folder_read_by_layout_names_its_unused_manifest_once(tmp_path, caplog):
    from cxrlab.data.dataset import scan
    from cxrlab.data.synth import generate

    generate(tmp_path / "d", per_class=3, size=32)  # writes d/manifest.csv with group and source columns
    with caplog.at_level("INFO", logger="cxrlab.data.dataset"):
        scan(tmp_path / "d")
        scan(tmp_path / "d")
    hints = [r.getMessage() for r in caplog.records if "a folder read ignores" in r.getMessage()]
    assert len(hints) == 1 and "group and source column(s)" in hints[0]
    assert f"--manifest {tmp_path / 'd' / 'manifest.csv'}" in hints[0]
