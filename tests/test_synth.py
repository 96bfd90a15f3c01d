"""Tests of the phantom generator `cxrlab.data.synth` and the `cxrlab synth` command (tiny sizes)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.cli import main
from cxrlab.data import synth
from cxrlab.errors import CxrlabError

SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.generate(out, per_class=10, size=SIZE, seed=3)
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_layout_counts_and_images(dataset):
    rows = _rows(dataset)
    assert len(rows) == 30
    for label in synth.CLASSES:
        counts = [sum(r["label"] == label and r["split"] == s for r in rows) for s in synth.SPLITS]
        assert counts == [6, 2, 2]
    img = np.asarray(Image.open(dataset / rows[0]["path"]))
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
    assert len({Path(r["path"]).stem for r in rows}) == len(rows)


def test_manifest_matches_files_and_groups_stay_in_one_split(dataset):
    rows = _rows(dataset)
    images = {str(p.relative_to(dataset)) for s in synth.SPLITS for p in (dataset / s).rglob("*.png")}
    assert images == {r["path"] for r in rows}
    for r in rows:
        assert r["path"].split("/")[:2] == [r["split"], r["label"]] and r["source"] in synth.SITES
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())


def test_sites_spread_evenly_over_classes():
    for label in synth.CLASSES:
        plan = synth._plan(label, 200, 0)
        per_site = [sum(p["n"] for p in plan if p["site"] == s) for s in synth.SITES]
        assert max(per_site) - min(per_site) <= 200 * 0.12


def test_masks_exist_exactly_for_abnormal_images(dataset):
    for r in _rows(dataset):
        mask_path = dataset / "masks" / r["path"]
        if r["label"] == "NORMAL":
            assert not mask_path.exists()
            continue
        mask = np.asarray(Image.open(mask_path))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}


def test_deterministic_bytes(dataset, tmp_path):
    synth.generate(tmp_path / "same", per_class=10, size=SIZE, seed=3)
    assert _files(tmp_path / "same") == _files(dataset)
    synth.generate(tmp_path / "other", per_class=10, size=SIZE, seed=4)
    a, b = _files(tmp_path / "other"), _files(dataset)
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in a if k.endswith(".png"))


def _vertical_fraction(mask: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(lungs.any(1))
    ys = np.nonzero(mask)[0]
    return (ys - rows[0]) / (rows[-1] - rows[0])


@pytest.mark.parametrize("label", ["PNEUMONIA", "TUBERCULOSIS"])
def test_lesions_inside_lungs_in_their_zone(label):
    for i in range(6):
        rngs = [np.random.default_rng([i, j]) for j in range(3)]
        p = synth.render_layers(64, label, *rngs)
        assert p.mask.sum() >= 8 and not (p.mask & ~p.lungs).any()
        frac = _vertical_fraction(p.mask, p.lungs)
        if label == "PNEUMONIA":
            assert np.mean(frac > 1 / 3) >= 0.8
        else:
            assert np.mean(frac < 0.5) >= 0.8


def test_render_phantom_normal_has_no_mask():
    img, mask = synth.render_phantom(np.random.default_rng(0), 40, "NORMAL")
    assert img.shape == mask.shape == (40, 40) and img.dtype == np.uint8 and not mask.any()
    assert img.std() > 20  # not a flat image
    with pytest.raises(CxrlabError, match="allowed"):
        synth.render_phantom(np.random.default_rng(0), 40, "COVID")


def test_cli_writes_refuses_foreign_folder_and_overwrites(tmp_path, caplog):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--per-class", "3", "--size", "32", "--seed", "1"]) == 0
    assert len(_rows(out)) == 9
    assert main(["synth", "--out", str(out), "--per-class", "4", "--size", "32"]) == 0  # previous output
    assert len(_rows(out)) == 12 and len(list(out.rglob("*_p*.png"))) == 12 + 8  # no stale files
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["synth", "--out", str(foreign), "--per-class", "3", "--size", "32"]) == 2
    with pytest.raises(CxrlabError, match="--overwrite"):
        synth.generate(foreign, per_class=3, size=32)
    assert main(["synth", "--out", str(foreign), "--per-class", "3", "--size", "32", "--overwrite"]) == 0
    assert (foreign / "notes.txt").read_text() == "keep"


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(CxrlabError, match="at least 3"):
        synth.generate(tmp_path / "x", per_class=2)
    with pytest.raises(CxrlabError, match="allowed"):
        synth.generate(tmp_path / "x", per_class=3, classes=("NORMAL", "FLU"))


@pytest.mark.parametrize("args, message", [(["--size", "16"], "at least 32 pixels"),
                                           (["--per-class", "2"], "at least 3")])
def test_cli_bad_settings_create_no_folder(tmp_path, capsys, args, message):
    out = tmp_path / "new" / "data"
    assert main(["synth", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists(), "a refused run leaves no folder behind"
