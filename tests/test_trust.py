"""Results you can trust, end to end on a tiny synthetic set: calibration and intervals in a real
run, operating points, flip TTA, ensembles, per-source evaluation and `cxrlab compare`.

(ECE / temperature / bootstrap on constructed numbers are unit-tested in tests/test_metrics.py.)
One tiny model is trained once per module (custom_cnn, 48 px, 2 epochs, CPU).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError

CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from cxrlab.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root / "d", per_class=12, size=48, seed=0)
    return root / "d"


def _fit(data: Path, out: Path, **kw) -> Path:
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    cfg = TrainConfig(data=str(data), out=str(out), model="custom_cnn", img_size=48, epochs=2, batch_size=16,
                      report=False, cache=False, device="cpu", workers=0, **kw)
    fit(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def run(synth, tmp_path_factory) -> Path:
    return _fit(synth, tmp_path_factory.mktemp("run") / "run", target_recall={"PNEUMONIA": 0.9})


def _load(path):
    from cxrlab.checkpoint import load_checkpoint

    return load_checkpoint(path)


# ---------------------------------------------------------------- calibration, intervals, operating points


def test_run_is_calibrated_with_intervals(run):
    ckpt = _load(run / "best.pt")
    assert ckpt["temperature"] > 0
    m = json.loads((run / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["temperature"] == pytest.approx(ckpt["temperature"])
    assert 0 <= cal["ece_before"] <= 1 and 0 <= cal["ece_after"] <= 1
    for key in ("accuracy", "macro_f1", "auc_macro", *[f"recall_{c}" for c in CLASSES]):
        lo, hi = m["ci95"][key]
        point = m[key] if not key.startswith("recall_") else m["per_class"][key[7:]]["recall"]
        assert lo <= point <= hi, (key, lo, point, hi)


def test_target_recall_reached_on_validation(run, synth):
    from cxrlab.data.dataset import build_index
    from cxrlab.evaluate import decide
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(run / "best.pt", device="cpu")
    assert set(bundle.ckpt["thresholds"]) == {"PNEUMONIA"}
    val = build_index(synth, val_fraction=0).splits["val"]
    logits, ok, _ = bundle.logits_for_files([s.path for s in val])
    y = np.array([CLASSES.index(val[i].label) for i in ok])
    pred = decide(bundle.probs(logits), bundle.ckpt)
    pos = y == CLASSES.index("PNEUMONIA")
    assert (pred[pos] == CLASSES.index("PNEUMONIA")).mean() >= 0.9
    ops = json.loads((run / "metrics.json").read_text())["operating_points"]["PNEUMONIA"]
    assert {"threshold", "sensitivity", "specificity"} <= set(ops)
    assert ops["threshold"] == pytest.approx(bundle.ckpt["thresholds"]["PNEUMONIA"])


# ---------------------------------------------------------------- TTA


def test_tta_is_flip_average(run):
    from cxrlab.engine import predict_logits
    from cxrlab.inference import load_model_bundle

    b = load_model_bundle(run / "best.pt", device="cpu")
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 256, (4, 48, 24), dtype=torch.uint8, generator=g)
    sym = torch.cat([half, half.flip(-1)], dim=-1)
    plain = predict_logits(b.model, sym, b.spec, b.device)
    np.testing.assert_allclose(predict_logits(b.model, sym, b.spec, b.device, tta=True), plain, atol=1e-5)
    x = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8, generator=g)
    want = (predict_logits(b.model, x, b.spec, b.device) + predict_logits(b.model, x.flip(-1), b.spec, b.device)) / 2
    np.testing.assert_allclose(b.logits_for_arrays(x, tta=True), want, atol=1e-5)


# ---------------------------------------------------------------- ensembles


def test_ensemble_of_identical_models_matches_single(run, synth, tmp_path):
    from cxrlab.checkpoint import validate_checkpoint
    from cxrlab.cli import main
    from cxrlab.evaluate import evaluate_checkpoint
    from cxrlab.inference import load_model_bundle

    out = tmp_path / "ens.pt"
    assert main(["ensemble", str(run / "best.pt"), str(run / "best.pt"), "--out", str(out), "--weights", "1,3"]) == 0
    raw = torch.load(out, weights_only=True)
    validate_checkpoint(raw, out)
    assert raw["model"]["name"] == "ensemble" and raw["state_dict"] == {} and len(raw["ensemble"]) == 2
    assert raw["ensemble_weights"] == pytest.approx([0.25, 0.75]) and "thresholds" not in raw
    assert all("train_state" not in m for m in raw["ensemble"])
    single, ens = load_model_bundle(run / "best.pt", "cpu"), load_model_bundle(out, "cpu")
    assert ens.class_names == single.class_names and ens.model is not None
    files = sorted((synth / "test").rglob("*.png"))[:6]
    lg1, ok1, _ = single.logits_for_files(files)
    lg2, ok2, _ = ens.logits_for_files(files, tta=False)
    assert ok1 == ok2
    np.testing.assert_allclose(ens.probs(lg2), single.probs(lg1), atol=1e-6)
    arr = np.stack([np.asarray(np.random.default_rng(1).integers(0, 256, (48, 48)), np.uint8)] * 2)
    np.testing.assert_allclose(ens.probs(ens.logits_for_arrays(arr)), single.probs(single.logits_for_arrays(arr)), atol=1e-6)
    m = evaluate_checkpoint(out, synth, tmp_path / "ev", n_boot=50, report=False, device="cpu")
    assert m["n"] > 0 and 0 <= m["accuracy"] <= 1


def test_ensemble_refuses_mismatched_classes(run, tmp_path):
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble, parse_weights

    other = {k: v for k, v in _load(run / "best.pt").items() if k not in ("format_version", "cxrlab_version")}
    other["class_names"] = list(reversed(other["class_names"]))
    save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(CxrlabError, match="other.pt"):
        build_ensemble([run / "best.pt", tmp_path / "other.pt"])
    with pytest.raises(CxrlabError, match="one weight per checkpoint"):
        parse_weights("1,2,3", 2)


def test_ensemble_members_with_different_presets(run, synth, tmp_path):
    """A member trained with another preprocessing preset decodes the files with its own preset."""
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import bundle_from_ensemble, build_ensemble
    from cxrlab.inference import bundle_from_checkpoint

    ck = {k: v for k, v in _load(run / "best.pt").items() if k not in ("format_version", "cxrlab_version")}
    big = {**ck, "preprocess": {**ck["preprocess"], "equalize": True}}
    save_checkpoint(big, tmp_path / "big.pt")
    ens = bundle_from_ensemble(build_ensemble([run / "best.pt", tmp_path / "big.pt"]), "cpu")
    files = sorted((synth / "test").rglob("*.png"))[:4]
    lg, ok, _ = ens.logits_for_files(files)
    p_small = bundle_from_checkpoint(ck, "cpu")
    p_big = bundle_from_checkpoint(big, "cpu")
    want = (p_small.probs(p_small.logits_for_files(files)[0]) + p_big.probs(p_big.logits_for_files(files)[0])) / 2
    np.testing.assert_allclose(ens.probs(lg), want, atol=1e-6)
    with pytest.raises(CxrlabError, match="predict from files"):
        ens.logits_for_arrays(np.zeros((1, 48, 48), np.uint8))


def _random_ckpt(name: str, size: int, seed: int) -> dict:
    from cxrlab.models import create_model, model_spec

    torch.manual_seed(seed)
    spec = model_spec(name)
    model = create_model(name, num_classes=3, in_chans=1).eval()
    return {"model": {"name": name, "kwargs": {}, "num_classes": 3, "in_chans": 1}, "class_names": CLASSES,
            "img_size": size, "mean": [float(np.mean(spec.mean))], "std": [float(np.mean(spec.std))],
            "preprocess": {"img_size": size}, "state_dict": model.state_dict(), "temperature": 1.5}


def test_ensemble_members_with_different_sizes(synth, tmp_path):
    """Members at 48 and 64 px: files are decoded per size; 48-px arrays are resized for the 64-px member."""
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import bundle_from_ensemble, build_ensemble
    from cxrlab.inference import bundle_from_checkpoint

    cks = [_random_ckpt("mobilenet_v3_small", 48, 0), _random_ckpt("mobilenet_v3_small", 64, 1)]
    for i, ck in enumerate(cks):
        save_checkpoint(ck, tmp_path / f"m{i}.pt")
    ens = bundle_from_ensemble(build_ensemble([tmp_path / "m0.pt", tmp_path / "m1.pt"], [1, 3]), "cpu")
    assert ens.pre.img_size == 48 and [b.pre.img_size for b in ens.members] == [48, 64]
    files = sorted((synth / "test").rglob("*.png"))[:3]
    lg, ok, _ = ens.logits_for_files(files)
    singles = [bundle_from_checkpoint(ck, "cpu") for ck in cks]
    want = sum(w * b.probs(b.logits_for_files(files)[0]) for w, b in zip([0.25, 0.75], singles))
    np.testing.assert_allclose(ens.probs(lg), want, atol=1e-6)
    arrays = np.zeros((2, 48, 48), np.uint8)
    probs = ens.probs(ens.logits_for_arrays(arrays))
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


# ---------------------------------------------------------------- per-source evaluation


def test_evaluate_per_source(run, synth, tmp_path):
    from cxrlab.evaluate import evaluate_checkpoint

    m = evaluate_checkpoint(run / "best.pt", synth, tmp_path / "ev", manifest=str(synth / "manifest.csv"),
                            group_by="source", n_boot=50, report=False, device="cpu")
    with open(synth / "manifest.csv", newline="") as fh:
        sources = {r["source"] for r in csv.DictReader(fh) if r["split"] == "test"}
    assert set(m["groups"]) == sources and len(sources) > 1
    assert sum(g["n"] for g in m["groups"].values()) == m["n"]
    for g in m["groups"].values():
        assert {"accuracy", "macro_f1", "per_class", "confusion_matrix"} <= set(g)
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(saved["groups"]) == sources


# ---------------------------------------------------------------- compare


@pytest.mark.slow
def test_compare_leaderboard(synth, tmp_path, monkeypatch):
    import cxrlab.train
    from cxrlab.compare import compare_models, leaderboard_columns

    real_fit = cxrlab.train.fit

    def fit(cfg, **kw):
        if cfg.model == "resnet18":
            raise RuntimeError("weights unavailable offline")
        return real_fit(cfg, **kw)

    monkeypatch.setattr(cxrlab.train, "fit", fit)
    out = tmp_path / "cmp"
    rows = compare_models(synth, ["custom_cnn", "resnet18", "mobilenet_v3_small"], out, epochs=1, img_size=48,
                          batch_size=16, base={"cache": False, "report": False, "device": "cpu", "workers": 0},
                          progress=False)
    assert [r["model"] for r in rows][-1] == "resnet18" and "weights unavailable" in rows[-1]["error"]
    with open(out / "leaderboard.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        table = list(reader)
    assert reader.fieldnames == leaderboard_columns(CLASSES)
    assert [r["model"] for r in table] == [r["model"] for r in rows]
    good = [r for r in table if not r["error"]]
    assert {r["model"] for r in good} == {"custom_cnn", "mobilenet_v3_small"}
    assert float(good[0]["macro_f1"]) >= float(good[1]["macro_f1"])
    for r in good:
        assert float(r["train_images_per_s"]) > 0 and float(r["inference_images_per_s"]) > 0
        assert int(r["parameters"]) > 0 and 0 <= float(r["ece"]) <= 1 and r["epochs"] == "1"
    md = (out / "leaderboard.md").read_text()
    assert "| model | accuracy | macro_f1 |" in md and "resnet18" in md
    assert (out / "roc_compare.png").stat().st_size > 1000
    with pytest.raises(CxrlabError, match="Valid models"):
        compare_models(synth, ["no_such_net"], out)
