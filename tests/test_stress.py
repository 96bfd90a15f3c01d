"""Stress test (`cxrlab stress`): perturbations with known effects, flip rates a rule-based model predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrlab.errors import CxrlabError
from cxrlab.inference import BundleBase
from cxrlab.stress import PERTURBATIONS, perturb, select, stress_test

ENV = dict(os.environ, CXRLAB_NO_REEXEC="1")


class MeanRule(BundleBase):
    """A 'model' that calls an image BRIGHT when its mean intensity is above 100: its answers are known."""

    def __init__(self):
        self.ckpt = {"class_names": ["DARK", "BRIGHT"], "temperature": 1.0}

    def logits_for_arrays(self, images, tta=False, batch_size=64):
        m = np.asarray(images, dtype=np.float64).mean(axis=(1, 2))
        return np.stack([np.zeros_like(m), (m - 100.0) / 5.0], axis=1)


def _flat(values, size=32):
    return np.stack([np.full((size, size), v, np.uint8) for v in values])


def test_perturbations_have_their_known_effects():
    square = np.zeros((1, 60, 60), np.uint8)
    square[0, 20:40, 20:40] = 255  # 1/9 of the image
    white = _flat([255], 60)
    area = lambda a: float((a > 127).mean())  # noqa: E731
    assert area(perturb(square, "zoom_in_1.2")) == pytest.approx(area(square) * 1.2**2, rel=0.06)
    assert area(perturb(white, "zoom_out_0.8")) == pytest.approx(0.8**2, rel=0.06)  # shrunk onto black
    assert area(perturb(white, "zoom_out_0.9")) == pytest.approx(0.9**2, rel=0.06)
    ramp = np.tile(np.arange(60, dtype=np.uint8) * 4, (1, 60, 1))
    assert np.array_equal(perturb(ramp, "hflip"), ramp[:, :, ::-1])
    assert np.array_equal(perturb(_flat([100, 230]), "brighter_1.2")[:, 0, 0], [120, 255])  # clipped at 255
    assert np.array_equal(perturb(_flat([100]), "darker_0.8")[0, 0, 0], 80)
    g = perturb(_flat([64]), "gamma_0.7")[0, 0, 0]
    assert g == round(255 * (64 / 255) ** 0.7)
    two = np.stack([np.full((32, 32), 50, np.uint8), np.full((32, 32), 150, np.uint8)])
    low = perturb(two, "contrast_0.7")  # each image's own mean: flat images do not change
    assert np.array_equal(low, two)
    noisy = perturb(_flat([128] * 4), "noise_0.03")
    assert np.array_equal(noisy, perturb(_flat([128] * 4), "noise_0.03"))  # deterministic
    assert (noisy.astype(float) - 128).std() == pytest.approx(0.03 * 255, rel=0.1)
    assert np.abs(perturb(_flat([90]), "blur_1.5").astype(int) - 90).max() == 0  # flat stays flat
    assert np.abs(perturb(_flat([90]), "jpeg_30").astype(int) - 90).max() <= 1
    for name in PERTURBATIONS:
        out = perturb(ramp, name)
        assert out.shape == ramp.shape and out.dtype == np.uint8, name


def test_flip_rates_and_accuracy_match_what_the_rule_predicts():
    rng = np.random.default_rng(0)
    means = rng.integers(40, 200, size=400)
    images = _flat(means)
    y = (means > 120).astype(np.int64)  # truth disagrees with the rule between 100 and 120
    r = stress_test(MeanRule(), images, y, only="brighter,darker,hflip")
    rows = {row["name"]: row for row in r["perturbations"]}
    # x 1.2 turns BRIGHT exactly the images with 100/1.2 < mean <= 100; x 0.8 turns DARK those with 100 < mean <= 125
    assert rows["brighter_1.2"]["flip_rate"] == pytest.approx(np.mean((np.round(means * 1.2) > 100) & (means <= 100)))
    assert rows["darker_0.8"]["flip_rate"] == pytest.approx(np.mean((np.round(means * 0.8) <= 100) & (means > 100)))
    assert rows["hflip"]["flip_rate"] == 0 and rows["hflip"]["mean_abs_dprob"] == 0 and not rows["hflip"]["fragile"]
    assert r["clean"]["accuracy"] == pytest.approx(np.mean((means > 100) == y))
    darker_pred = np.round(means * 0.8) > 100
    assert rows["darker_0.8"]["accuracy"] == pytest.approx(np.mean(darker_pred == y))
    assert rows["darker_0.8"]["delta_accuracy"] == pytest.approx(rows["darker_0.8"]["accuracy"] - r["clean"]["accuracy"])
    assert rows["brighter_1.2"]["shift"]["to"] == "BRIGHT" and rows["darker_0.8"]["shift"]["to"] == "DARK"
    assert rows["brighter_1.2"]["shift"]["by"] == pytest.approx(rows["brighter_1.2"]["flip_rate"])
    assert rows["brighter_1.2"]["fragile"] and rows["darker_0.8"]["fragile"]
    hints = r["hints"]
    assert len(hints) == 2 and all("--aug-brightness" in h for h in hints)
    assert "more called BRIGHT" in next(h for h in hints if h.startswith("brighter_1.2"))


def test_unlabelled_images_still_get_flip_rates():
    r = stress_test(MeanRule(), _flat([90, 95, 150, 160]), None, only="brighter_1.2")
    row = r["perturbations"][0]
    assert not r["labelled"] and "accuracy" not in row and "accuracy" not in r["clean"]
    assert row["flip_rate"] == pytest.approx(0.5)  # 90 and 95 cross 100, 150 and 160 were BRIGHT already
    assert r["clean"]["predicted_share"] == {"DARK": 0.5, "BRIGHT": 0.5}
    assert row["predicted_share"] == {"DARK": 0.0, "BRIGHT": 1.0}


def test_selection_by_name_or_family_and_clear_errors():
    assert select("zoom") == ["zoom_in_1.1", "zoom_in_1.2", "zoom_out_0.9", "zoom_out_0.8"]
    assert select("blur_1.5,gamma") == ["blur_1.5", "gamma_0.7", "gamma_1.4"]
    assert select(None) == list(PERTURBATIONS)
    with pytest.raises(CxrlabError, match="unknown perturbation 'sharpen'.*zoom_in_1.1"):
        select("sharpen")
    with pytest.raises(CxrlabError, match="no readable images"):
        stress_test(MeanRule(), np.zeros((0, 8, 8), np.uint8))


def test_cli_on_a_labelled_split_and_on_unlabelled_files(tiny_run, synth_dir, tmp_path):
    ckpt = str(tiny_run / "best.pt")
    r = subprocess.run([sys.executable, "-m", "cxrlab", "stress", "--checkpoint", ckpt, "--data", str(synth_dir),
                        "--split", "train", "--out", str(tmp_path / "s"), "--only", "zoom,blur", "--n", "25"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "s" / "stress.json").read_text())
    assert res["labelled"] and res["n"] == 25 and res["subset"].startswith("25 of ")
    assert [p["name"] for p in res["perturbations"]] == select("zoom,blur")
    assert 0 <= res["clean"]["accuracy"] <= 1 and "zoom_in_1.2" in r.stdout
    lines = (tmp_path / "s" / "stress.csv").read_text().splitlines()
    assert len(lines) == 1 + 5 and lines[0].startswith("name,flip_rate,mean_abs_dprob,accuracy")
    u = subprocess.run([sys.executable, "-m", "cxrlab", "stress", str(synth_dir / "test"), "--checkpoint", ckpt,
                        "--out", str(tmp_path / "u"), "--only", "hflip"], capture_output=True, text=True, env=ENV)
    assert u.returncode == 0, u.stderr
    assert not json.loads((tmp_path / "u" / "stress.json").read_text())["labelled"]
    both = subprocess.run([sys.executable, "-m", "cxrlab", "stress", str(synth_dir / "test"), "--data", str(synth_dir),
                           "--checkpoint", ckpt, "--out", str(tmp_path / "b")], capture_output=True, text=True, env=ENV)
    assert both.returncode != 0 and "got both; give either --data" in both.stderr and "Traceback" not in both.stderr
    neither = subprocess.run([sys.executable, "-m", "cxrlab", "stress", "--checkpoint", ckpt, "--out", str(tmp_path / "n")],
                             capture_output=True, text=True, env=ENV)
    assert neither.returncode != 0 and "got neither" in neither.stderr
