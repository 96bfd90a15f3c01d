"""QA findings on explain, predict and stress: ensembles in Grad-CAM, missing inputs, degenerate images,
tiny stress samples, explain's own outputs, case-insensitive targets."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from cxrlab.cli import main


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return str(tiny_run / "best.pt")


@pytest.fixture(scope="module")
def ensemble(tiny_run, tmp_path_factory):
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble

    path = tmp_path_factory.mktemp("ens") / "ens.pt"
    save_checkpoint(build_ensemble([tiny_run / "best.pt", tiny_run / "best.pt"]), path)
    return str(path)


@pytest.fixture(scope="module")
def odd(tmp_path_factory, synth_dir):
    """Degenerate images beside one real phantom: constant 16-bit, all black, 1x1, NaN/inf float TIFF."""
    d = tmp_path_factory.mktemp("odd")
    Image.fromarray(np.full((64, 64), 1000, np.uint16)).save(d / "const16.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(d / "black.png")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(d / "one.png")
    nan = np.full((64, 64), np.nan, np.float32)
    nan[0, 0] = np.inf
    Image.fromarray(nan).save(d / "nan.tif")
    real = sorted((synth_dir / "test").rglob("*.png"))[0]
    (d / "real.png").write_bytes(real.read_bytes())
    return d


def _gray(synth_dir) -> np.ndarray:
    return np.asarray(Image.open(sorted((synth_dir / "test").rglob("*.png"))[0]).convert("L"))


# ---------------------------------------------------------------- 1. Grad-CAM of an ensemble


def test_explain_an_ensemble_shows_member_0_cam_with_the_ensemble_probabilities(ensemble, synth_dir, tmp_path, caplog):
    from cxrlab.data.preprocess import prepare_array
    from cxrlab.explain import explain_array
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(ensemble, device="cpu")
    gray = _gray(synth_dir)
    res = explain_array(bundle, gray)
    assert res.note == "Grad-CAM of member 0 of 2; probabilities of the ensemble"
    want = bundle.probs(bundle.logits_for_arrays(prepare_array(gray, bundle.pre)[None]))[0]
    assert [res.probs[c] for c in bundle.class_names] == pytest.approx(list(want), abs=1e-6)
    assert res.heatmap.shape == res.image.shape and 0 <= res.heatmap.min() and res.heatmap.max() <= 1
    files = sorted((synth_dir / "test").rglob("*.png"))[:2]
    with caplog.at_level(logging.INFO):
        rc = main(["explain", "--checkpoint", ensemble, *map(str, files), "--out", str(tmp_path / "x")])
    assert rc == 0 and len(list((tmp_path / "x").glob("*_cam.png"))) == 2
    assert sum("Grad-CAM of member 0 of 2" in r.getMessage() for r in caplog.records) == 1


def test_the_server_explains_an_ensemble(ensemble, synth_dir):
    from cxrlab.inference import load_model_bundle
    from cxrlab.serve.app import ModelService

    res = ModelService(load_model_bundle(ensemble, device="cpu"), "ens", None).explain(_gray(synth_dir), None)
    assert res.note.startswith("Grad-CAM of member 0 of 2") and res.predicted in res.probs


# ---------------------------------------------------------------- 2. inputs that do not exist


def test_predict_refuses_a_missing_input_before_any_work(ckpt, odd, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["predict", "--checkpoint", ckpt, str(tmp_path / "nofolder"), str(odd / "real.png"), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "nofolder" in err and "not found" in err and not out.exists()
    assert "shell did not expand" not in err
    rc = main(["predict", "--checkpoint", ckpt, str(odd / "*.jpg"), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "*.jpg" in err and "shell did not expand" in err
    rc = main(["explain", "--checkpoint", ckpt, str(tmp_path / "typo.png"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "typo.png" in capsys.readouterr().err


def test_predict_and_explain_word_a_missing_file_the_same(ckpt, odd, tmp_path):
    from cxrlab.explain import explain_paths
    from cxrlab.inference import load_model_bundle
    from cxrlab.predict import predict_paths

    bundle = load_model_bundle(ckpt, device="cpu")
    gone = str(tmp_path / "gone.png")
    rows = {r["path"]: r for r in predict_paths(bundle, [gone, str(odd / "real.png")])}
    _, errors = explain_paths(bundle, [gone, str(odd / "real.png")], tmp_path / "x")
    assert rows[gone]["error"] == errors[gone] == "file not found"


# ---------------------------------------------------------------- 3. degenerate images


def test_predict_warns_about_degenerate_images(ckpt, odd, tmp_path, caplog):
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING):
        rc = main(["predict", "--checkpoint", ckpt, str(odd), "--output", str(out), "--quiet"])
    assert rc == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[-2:] == ["error", "warning"] and header[:2] == ["path", "predicted"]
    rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out))}
    for name in ("const16.png", "black.png", "one.png", "nan.tif"):
        assert "constant" in rows[name]["warning"], name
    assert "tiny image (1x1 px" in rows["one.png"]["warning"] and rows["real.png"]["warning"] == ""
    summary = [r.getMessage() for r in caplog.records if "do not look like radiographs" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith("4 of 5")
    js = tmp_path / "p.json"
    assert main(["predict", "--checkpoint", ckpt, str(odd / "black.png"), "--output", str(js), "--quiet"]) == 0
    row = json.loads(js.read_text())[0]
    assert list(row)[-1] == "warning" and "constant" in row["warning"]


def test_explain_warns_about_degenerate_images(ckpt, odd, tmp_path, caplog):
    from cxrlab.explain import explain_array
    from cxrlab.inference import load_model_bundle

    res = explain_array(load_model_bundle(ckpt, device="cpu"), np.zeros((1, 1), np.uint8))
    assert "tiny image" in res.warning and "constant" in res.warning
    with caplog.at_level(logging.WARNING):
        assert main(["explain", "--checkpoint", ckpt, str(odd / "black.png"), "--out", str(tmp_path / "x")]) == 0
    assert any("black.png" in r.getMessage() and "constant" in r.getMessage() for r in caplog.records)
    index = list(csv.DictReader(open(tmp_path / "x" / "explain_index.csv")))
    assert "constant" in index[0]["warning"]


# ---------------------------------------------------------------- 4. stress on too few images


def test_stress_calls_nothing_fragile_on_too_few_images(caplog):
    from cxrlab.inference import BundleBase
    from cxrlab.stress import MIN_IMAGES_TO_JUDGE, PERTURBATIONS, stress_test

    class MeanRule(BundleBase):  # BRIGHT when the mean intensity is above 100 (as in test_stress)
        ckpt = {"class_names": ["DARK", "BRIGHT"], "temperature": 1.0}

        def logits_for_arrays(self, images, tta=False, batch_size=64):
            m = np.asarray(images, dtype=np.float64).mean(axis=(1, 2))
            return np.stack([np.zeros_like(m), (m - 100.0) / 5.0], axis=1)

    def _flat(values):
        return np.stack([np.full((32, 32), v, np.uint8) for v in values])

    with caplog.at_level(logging.WARNING):
        r = stress_test(MeanRule(), _flat([90]), None, only="brighter_1.2")
    row = r["perturbations"][0]
    assert row["flip_rate"] == 1.0 and not row["fragile"] and r["hints"] == [] and r["too_few_to_judge"]
    assert sum("too few to judge" in m.getMessage() for m in caplog.records) == 1
    many = stress_test(MeanRule(), _flat([90] * MIN_IMAGES_TO_JUDGE), None, only="brighter_1.2")
    assert many["perturbations"][0]["fragile"] and not many["too_few_to_judge"]
    assert "no option" not in PERTURBATIONS["jpeg_30"].fix
    assert f"train with {PERTURBATIONS['jpeg_30'].fix}".startswith("train with JPEG-compressed copies")


def test_stress_cli_says_the_sample_is_too_small(ckpt, odd, tmp_path, capsys):
    rc = main(["stress", "--checkpoint", ckpt, str(odd / "real.png"), "--out", str(tmp_path / "s"), "--only", "zoom"])
    out = capsys.readouterr().out
    assert rc == 0 and "too few to call any perturbation fragile" in out and "fragile:" not in out
    assert "zoom_in_1.1" in out  # the numbers are still printed


# ---------------------------------------------------------------- 5. explain's outputs and same-stem files


def test_explain_twice_into_its_output_skips_its_own_overlays_and_indexes_sources(ckpt, odd, tmp_path):
    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        (src / sub / "img1.png").write_bytes((odd / "real.png").read_bytes())
    out = src / "cams"
    for _ in range(2):
        assert main(["explain", "--checkpoint", ckpt, str(src), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["img1-2_cam.png", "img1_cam.png"]
    index = list(csv.DictReader(open(out / "explain_index.csv")))
    assert {(r["source"], r["output"]) for r in index} == {(str(src / "a" / "img1.png"), "img1_cam.png"),
                                                          (str(src / "b" / "img1.png"), "img1-2_cam.png")}
    assert all(r["predicted"] and r["prob_" + r["predicted"]] for r in index)


# ---------------------------------------------------------------- 6. case-insensitive --target


def test_explain_target_matches_class_names_case_insensitively(ckpt, synth_dir, tmp_path):
    from cxrlab.errors import CxrlabError
    from cxrlab.explain import explain_array, target_class
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(ckpt, device="cpu")
    assert explain_array(bundle, _gray(synth_dir), target="pneumonia").target == "PNEUMONIA"
    assert target_class(["A", "a"], "a") == "a"
    with pytest.raises(CxrlabError, match="unknown target class 'B'"):
        target_class(["A", "a"], "B")
    f = sorted((synth_dir / "test").rglob("*.png"))[0]
    assert main(["explain", "--checkpoint", ckpt, str(f), "--target", "pneumonia", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 0
    assert next(csv.DictReader(open(tmp_path / "x" / "explain_index.csv")))["target"] == "PNEUMONIA"
