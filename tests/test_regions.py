"""`cxrlab explain --regions`: Grad-CAM mass by region of the film and decisions from the film's edges alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.errors import CxrlabError
from cxrlab.regions import chance_accuracy, look_regions, paint_black, region_energy, region_masks


def test_region_masks_have_the_known_areas():
    m = region_masks(100, frame=0.1, corner=0.15)
    assert m["frame"].mean() == pytest.approx(1 - 0.8 ** 2)  # 0.36
    assert m["corners"].mean() == pytest.approx(4 * 15 * 15 / 100 ** 2)  # 0.09
    assert not (m["frame"] & m["inside"]).any() and (m["frame"] | m["inside"]).all()
    c = m["corners"]
    assert c[0, 0] and c[14, 14] and c[99, 85] and not c[15, 15] and not c[0, 50] and not c[50, 0]
    assert m["frame"][0, 50] and m["frame"][9, 50] and not m["frame"][10, 50]
    for bad in (0, 0.5, -0.1):
        with pytest.raises(CxrlabError, match="--frame"):
            region_masks(100, frame=bad)


def test_region_energy_known_answers():
    m = region_masks(50, frame=0.1)
    band = m["frame"].astype(float)
    assert region_energy(band, m) == {"frame_energy": 1.0, "corner_energy": pytest.approx((m["corners"] & m["frame"]).sum() / band.sum()),
                                      "peak_in_frame": True}
    centre = np.zeros((50, 50))
    centre[25, 25] = 1.0
    assert region_energy(centre, m) == {"frame_energy": 0.0, "corner_energy": 0.0, "peak_in_frame": False}
    assert region_energy(np.ones((50, 50)), m)["frame_energy"] == pytest.approx(m["frame"].mean())  # lift 1
    empty = region_energy(np.zeros((50, 50)), m)
    assert np.isnan(empty["frame_energy"]) and not empty["peak_in_frame"]


def test_chance_accuracy_and_paint_black():
    y = np.array([0, 0, 1, 1])
    assert chance_accuracy(y, np.array([0, 0, 0, 0]), 2) == 0.5  # a constant decision
    assert chance_accuracy(np.array([0, 0, 0, 1]), np.array([0, 1, 0, 0]), 2) == pytest.approx(0.75 * 0.75 + 0.25 * 0.25)
    images = np.full((2, 20, 20), 200, np.uint8)
    frame = region_masks(20, 0.1)["frame"]
    out = paint_black(images, frame)
    assert (out[:, frame] == 0).all() and (out[:, ~frame] == 200).all() and (images == 200).all()


def _shortcut_data(root: Path, where: str, n: int = 48, size: int = 48, seed: int = 0) -> Path:
    """Two classes with the same smooth-noise films; class MARKED has a bright square in the top-left corner
    (`where="corner"`, a marker shortcut) or in the middle (`where="centre"`, a finding inside the thorax)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    for split, k in (("train", n), ("val", n // 3), ("test", n // 2)):
        for label in ("PLAIN", "MARKED"):
            d = root / split / label
            d.mkdir(parents=True)
            for i in range(k):
                img = 110 + 40 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 2) / 0.14
                if label == "MARKED":
                    r0 = 1 if where == "corner" else size // 2 - 4
                    c0 = 1 + int(rng.integers(0, 2)) if where == "corner" else size // 2 - 4 + int(rng.integers(-3, 4))
                    img[r0:r0 + 4, c0:c0 + 4] = 255
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{label}_{i}.png")
    return root


def _train(data: Path, out: Path) -> Path:
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    cfg = TrainConfig(data=str(data), out=str(out), model="small_cnn", img_size=48, epochs=6, batch_size=16,
                      report=False, cache=False, workers=0, aug_flip=False, aug_rotation=0, aug_translate=0,
                      aug_crop_scale_min=1.0, lr=3e-3, seed=0)
    fit(cfg, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="module")
def shortcut_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    return {where: (_shortcut_data(root / f"data_{where}", where),
                    _train(root / f"data_{where}", root / f"run_{where}")) for where in ("corner", "centre")}


def test_a_marker_shortcut_is_found_and_a_central_finding_is_not(shortcut_models, tmp_path):
    data, ckpt = shortcut_models["corner"]
    s = look_regions(str(ckpt), data, tmp_path / "corner", n=0, examples=4)
    o = s["overall"]
    assert o["accuracy"] >= 0.95  # the marker is learnt
    assert o["frame_only_auc"] >= 0.95 and o["frame_only_accuracy"] >= o["frame_only_chance"] + 0.3  # edges give it away
    assert o["frame_hidden_accuracy"] <= 0.7  # and without them the model is lost
    assert s["per_class"]["MARKED"]["frame_lift"] > 1.0  # its heatmaps point at the band

    data, ckpt = shortcut_models["centre"]
    s = look_regions(str(ckpt), data, tmp_path / "centre", n=0, examples=4)
    o = s["overall"]
    assert o["accuracy"] >= 0.95
    assert o["frame_hidden_accuracy"] >= 0.9 and o["frame_hidden_flip_rate"] <= 0.1  # the band does not matter
    assert abs(o["frame_only_accuracy"] - o["frame_only_chance"]) <= 0.1 or o["frame_only_auc"] <= 0.7
    assert s["per_class"]["MARKED"]["frame_lift"] < 0.8 and s["per_class"]["MARKED"]["peak_in_frame"] <= 0.2

    written = json.loads((tmp_path / "centre" / "regions.json").read_text())
    assert written["overall"] == o and written["n"] == len(list((data / "test").rglob("*.png")))
    rows = (tmp_path / "centre" / "regions.csv").read_text().splitlines()
    assert len(rows) == written["n"] + 1 and rows[0].startswith("path,group,class,predicted")
    assert sorted(written["montages"]) == ["montage_MARKED.png", "montage_PLAIN.png"]
    assert Image.open(tmp_path / "centre" / "montage_MARKED.png").size == (4 * 224, 224 + 14)


def test_cli_groups_and_clear_errors(tiny_run, synth_dir, tmp_path, capsys):
    from cxrlab.cli import main
    ckpt = str(tiny_run / "best.pt")
    base = [sys.executable, "-m", "cxrlab", "explain", "--checkpoint", ckpt]
    r = subprocess.run(base + ["--regions", "--data", str(synth_dir), "--manifest", str(synth_dir / "manifest.csv"),
                               "--group-by", "source", "--split", "train", "--n", "20", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "regions.json").read_text())
    assert s["n"] == 20 and s["subset"] == "20 of 66 (seed 0)" and s["split"] == "train" and s["per_group"]
    assert sum(g["n"] for g in s["per_group"].values()) == 20
    assert all("/" in k for k in s["per_group_class"]) and "frame only" in r.stdout
    for extra, msg in ((["--regions"], "--regions needs --data"),
                       (["--regions", "--score", "--data", str(synth_dir)], "one at a time"),
                       (["--regions", "--data", str(synth_dir), "x.png"], "drop the PATH"),
                       (["x.png", "--group-by", "source"], "go with --regions"),
                       (["--regions", "--data", str(synth_dir), "--frame", "0.6"], "--frame")):
        assert main(["explain", "--checkpoint", ckpt, *extra]) != 0
        assert msg in capsys.readouterr().err, extra
