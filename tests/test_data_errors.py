"""Errors about data at the edges: only the splits in use are checked, and each message names the file and the fix."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.dataset import build_index
from cxrlab.errors import CxrlabError

ROOT = Path(__file__).resolve().parents[1]


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def no_val_tb(synth_dir, tmp_path_factory) -> Path:
    """`synth_dir` with val/TUBERCULOSIS removed (and no manifest)."""
    d = tmp_path_factory.mktemp("novaltb") / "d"
    shutil.copytree(synth_dir, d, ignore=shutil.ignore_patterns("masks", "manifest.csv"))
    shutil.rmtree(d / "val" / "TUBERCULOSIS")
    return d


@pytest.fixture(scope="module")
def no_val_tb_manifest(synth_dir, tmp_path_factory) -> Path:
    """A manifest of `synth_dir`'s images without the rows of val/TUBERCULOSIS (in the folder above the images)."""
    path = synth_dir.parent / "manifest_no_val_tb.csv"
    with open(synth_dir / "manifest.csv", newline="") as fh:
        rows = [{**r, "path": f"{synth_dir.name}/{r['path']}"} for r in csv.DictReader(fh)
                if not (r["split"] == "val" and r["label"] == "TUBERCULOSIS")]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cats_dogs(synth_dir, tmp_path_factory) -> Path:
    """A flat folder whose classes (CATS, DOGS) are not the checkpoint's."""
    d = tmp_path_factory.mktemp("catsdogs") / "d"
    for src, cls in (("NORMAL", "CATS"), ("PNEUMONIA", "DOGS")):
        shutil.copytree(synth_dir / "test" / src, d / cls)
    return d


# ---------------------------------------------------------------- bug 1: only the split in use is checked


def test_evaluate_test_split_when_val_lacks_a_class(tiny_run, no_val_tb, tmp_path):
    from cxrlab.evaluate import evaluate_checkpoint

    n_test = len(list((no_val_tb / "test").rglob("*.png")))
    m = evaluate_checkpoint(tiny_run / "best.pt", no_val_tb, tmp_path / "ev", split="test", n_boot=20, report=False)
    assert m["split"] == "test" and m["n"] == n_test > 0
    assert sum(m["per_class"][c]["support"] for c in m["class_names"]) == n_test
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_evaluate_train_split_of_a_manifest_whose_val_lacks_a_class(tiny_run, no_val_tb_manifest, tmp_path):
    from cxrlab.evaluate import evaluate_checkpoint

    with open(no_val_tb_manifest, newline="") as fh:
        n_train = sum(r["split"] == "train" for r in csv.DictReader(fh))
    m = evaluate_checkpoint(tiny_run / "best.pt", no_val_tb_manifest, tmp_path / "ev", split="train", n_boot=20,
                            report=False)
    assert m["split"] == "train" and m["n"] == n_train > 0


def test_stress_reads_the_test_split_when_val_lacks_a_class(tiny_run, no_val_tb):
    from cxrlab.inference import load_model_bundle
    from cxrlab.stress import labelled_images

    ckpt = tiny_run / "best.pt"
    imgs = labelled_images(load_model_bundle(ckpt, device="cpu"), ckpt, no_val_tb, "test", n=0)
    assert len(imgs.arrays) == len(list((no_val_tb / "test").rglob("*.png"))) and sorted(set(imgs.y.tolist())) == [0, 1, 2]


def test_training_still_needs_every_class_in_val_and_the_fix_fits_the_source(no_val_tb, no_val_tb_manifest):
    with pytest.raises(CxrlabError, match="TUBERCULOSIS has no images in the val split") as folder:
        build_index(no_val_tb)
    assert f"{no_val_tb}/val/TUBERCULOSIS/" in str(folder.value) and "manifest" not in str(folder.value)
    with pytest.raises(CxrlabError, match="TUBERCULOSIS has no images in the val split") as rows:
        build_index(no_val_tb_manifest)
    msg = str(rows.value)
    assert f"manifest '{no_val_tb_manifest}'" in msg and "rows" in msg and "folder" not in msg


def test_evaluation_only_checks_the_split_it_scores(no_val_tb, caplog):
    build_index(no_val_tb, require=(), val_fraction=0)
    assert "TUBERCULOSIS has no images in the val split" in caplog.text  # every split checked (a warning)
    caplog.clear()
    idx = build_index(no_val_tb, require=(), val_fraction=0, check=("test",))
    assert set(idx.splits) == {"train", "val", "test"} and not caplog.text


# ---------------------------------------------------------------- bug 2: --bootstrap


def test_bootstrap_zero_names_the_option_and_its_range(tiny_run, synth_dir, tmp_path):
    from cxrlab.evaluate import evaluate_checkpoint

    for bad in (0, -5):
        with pytest.raises(CxrlabError, match=r"--bootstrap must be at least 1") as err:
            evaluate_checkpoint(tiny_run / "best.pt", synth_dir, tmp_path / "ev", n_boot=bad, report=False)
        assert f"got {bad}" in str(err.value) and "alpha" not in str(err.value)
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- bug 3: messages that say what is wrong


def test_regions_on_other_classes_names_the_checkpoint(tiny_run, cats_dogs):
    from cxrlab.inference import load_model_bundle
    from cxrlab.regions import look_regions

    ckpt = str(tiny_run / "best.pt")
    with pytest.raises(CxrlabError, match="CATS, DOGS") as by_path:
        look_regions(ckpt, cats_dogs, split="all", device="cpu")
    assert f"checkpoint '{ckpt}' does not know" in str(by_path.value)
    bundle = load_model_bundle(ckpt, device="cpu")
    with pytest.raises(CxrlabError) as by_name:
        look_regions(bundle, cats_dogs, split="all", checkpoint_name=ckpt)
    assert f"checkpoint '{ckpt}' does not know" in str(by_name.value)
    with pytest.raises(CxrlabError) as unnamed:
        look_regions(bundle, cats_dogs, split="all")
    assert "the checkpoint does not know" in str(unnamed.value) and "'the checkpoint'" not in str(unnamed.value)


def test_calibrate_on_other_classes_says_the_classes_differ(tiny_run, cats_dogs):
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.finalize import calibrate_on_split

    with pytest.raises(CxrlabError, match="are not the checkpoint's classes") as err:
        calibrate_on_split(load_checkpoint(tiny_run / "best.pt"), cats_dogs, split="all", device="cpu")
    msg = str(err.value)
    assert "CATS, DOGS" in msg and "NORMAL, PNEUMONIA, TUBERCULOSIS" in msg and "readable" not in msg


def test_target_recall_for_a_class_absent_from_the_calibration_data_is_named():
    from cxrlab.finalize import calibrate_checkpoint

    ckpt = {"class_names": ["NORMAL", "TB"]}
    with pytest.raises(CxrlabError, match="--target-recall TB: the calibration data have no TB images"):
        calibrate_checkpoint(ckpt, np.zeros((4, 2)), np.zeros(4, dtype=np.int64), {"TB": 0.9}, calibrate=False)


def test_missing_mask_folder_is_named(tiny_run, synth_dir, tmp_path):
    from cxrlab.faithfulness import find_masked_images, score_faithfulness

    with pytest.raises(CxrlabError, match="mask folder '.*nonexist' does not exist") as err:
        score_faithfulness(str(tiny_run / "best.pt"), synth_dir, tmp_path / "nonexist")
    assert "test/<CLASS>/<stem>.png" in str(err.value)
    with pytest.raises(CxrlabError, match="data folder '.*nope' does not exist"):
        find_masked_images(tmp_path / "nope", synth_dir / "masks", "test", ["PNEUMONIA"])


def test_one_class_names_the_empty_class_folders(tmp_path):
    for i in range(3):
        _img(tmp_path / "flat" / "A" / f"a{i}.png", 10 * i)
    (tmp_path / "flat" / "B").mkdir()
    with pytest.raises(CxrlabError, match=r"only one class \(A\)") as flat:
        build_index(tmp_path / "flat")
    assert "Class folder(s) B of" in str(flat.value) and "hold no images" in str(flat.value)
    for i in range(3):
        _img(tmp_path / "split" / "train" / "A" / f"a{i}.png", 10 * i)
    (tmp_path / "split" / "train" / "B").mkdir()
    with pytest.raises(CxrlabError, match="only one class") as split:
        build_index(tmp_path / "split")
    assert "train/B" in str(split.value) and "train/A" not in str(split.value)


# ---------------------------------------------------------------- bug 4: docs/TRUST.md's --score recipe


def test_trust_doc_score_recipe_matches_the_mask_layout(tmp_path):
    from cxrlab.faithfulness import find_masked_images

    doc = (ROOT / "docs" / "TRUST.md").read_text()
    assert "--score --masks" not in doc  # --score also needs --data
    assert "--score --data DIR" in doc and "LUNG_MASKS/<split>/<CLASS>/<stem>.png" in doc
    image = _img(tmp_path / "DIR" / "test" / "TB" / "case1.jpg")
    mask = _img(tmp_path / "LUNG_MASKS" / "test" / "TB" / "case1.png", 255)
    _img(tmp_path / "DIR" / "test" / "TB" / "case2.png")  # no mask: skipped
    assert find_masked_images(tmp_path / "DIR", tmp_path / "LUNG_MASKS", "test", ["TB"]) == [(image, mask, "TB")]
