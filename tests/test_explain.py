"""Grad-CAM (cxrlab.explain), faithfulness scores and the `cxrlab explain` command."""

from __future__ import annotations

import gc
import json
import resource
import tracemalloc

import numpy as np
import pytest
import torch

from cxrlab.camnames import parse_cam_name
from cxrlab.data.preprocess import Preprocess
from cxrlab.engine import InputSpec
from cxrlab.errors import CxrlabError
from cxrlab.explain import (METHODS, ExplainResult, TrainingCams, cam_heatmaps, explain_array, explain_batch,
                            overlay_png, save_explanation)
from cxrlab.faithfulness import energy_in_mask, pointing_game
from cxrlab.inference import ModelBundle
from cxrlab.models import create_model, model_spec

S = 64
CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """cxrlab.cli.main re-executes heavy commands in a new process (allocator settings); not in tests."""
    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")


def _model(name: str, size: int = S) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 3, **({"img_size": size} if name == "custom_cnn" else {}))


def _bundle(name: str = "custom_cnn", size: int = S) -> ModelBundle:
    ckpt = {"class_names": CLASSES, "model": {"name": name, "kwargs": {}, "num_classes": 3, "in_chans": 3},
            "temperature": 1.0}
    model = _model(name, size).eval()
    return ModelBundle(ckpt, model, Preprocess(img_size=size), InputSpec([0.5] * 3, [0.25] * 3, 3), torch.device("cpu"))


def _images(n: int, size: int = S, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ["custom_cnn", "resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_heatmap_shape_and_range(name, method):
    model = _model(name)
    spec = InputSpec([0.5] * 3, [0.25] * 3, 3)
    heat = cam_heatmaps(model, model_spec(name).cam_layer(model), _images(2), [1, 2], spec, "cpu", method)
    assert heat.shape == (2, S, S) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert model.training and _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_heatmap_of_frozen_weights_equals_trainable():
    """A weight EMA (cxrlab train --ema) or a frozen backbone has requires_grad False everywhere."""
    from cxrlab.engine import weight_ema

    model = _model("resnet18").eval()
    spec = InputSpec([0.5] * 3, [0.25] * 3, 3)
    ref = cam_heatmaps(model, model.layer4, _images(2), [0, 1], spec, "cpu")
    ema = weight_ema(model, 0.99).module.eval()
    assert not any(p.requires_grad for p in ema.parameters())
    heat = cam_heatmaps(ema, ema.layer4, _images(2), [0, 1], spec, "cpu")
    np.testing.assert_allclose(heat, ref, atol=1e-5)
    assert heat.max() > 0.5 and not any(p.requires_grad or p.grad is not None for p in ema.parameters())


def test_explain_array_result_any_input_size():
    bundle = _bundle()
    res = explain_array(bundle, _images(1, size=100)[0], target="PNEUMONIA", method="xgradcam")
    assert isinstance(res, ExplainResult)
    assert res.heatmap.shape == (S, S) and res.heatmap.dtype == np.float32
    assert res.image.shape == (S, S) and res.image.dtype == np.uint8
    assert res.overlay.shape == (S, S, 3) and res.overlay.dtype == np.uint8
    assert set(res.probs) == set(CLASSES) and abs(sum(res.probs.values()) - 1) < 1e-5
    assert res.target == "PNEUMONIA" and res.predicted in CLASSES
    assert overlay_png(res).startswith(b"\x89PNG")


def test_explain_arrays_with_the_callers_probabilities_skips_the_prediction_and_uses_them():
    from cxrlab.explain import explain_arrays

    bundle, images = _bundle(), _images(3, seed=4)
    plain = explain_arrays(bundle, images)
    probs = np.array([[r.probs[c] for c in CLASSES] for r in plain])
    given = explain_arrays(bundle, images, probs=probs)
    for a, b in zip(plain, given):
        assert a.predicted == b.predicted == a.target and a.probs == b.probs
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
    forced = explain_arrays(bundle, images, probs=np.tile([0.1, 0.1, 0.8], (3, 1)))
    assert [r.predicted for r in forced] == [r.target for r in forced] == ["TUBERCULOSIS"] * 3
    assert forced[0].probs["TUBERCULOSIS"] == pytest.approx(0.8)


def test_explain_batch_and_errors():
    bundle = _bundle()
    assert explain_batch(bundle, _images(3), [0, 1, 2]).shape == (3, S, S)
    assert explain_batch(bundle, _images(2), None, method="layercam").shape == (2, S, S)
    with pytest.raises(CxrlabError, match="gradcam\\+\\+"):
        explain_batch(bundle, _images(1), [0], method="nosuchcam")
    with pytest.raises(CxrlabError, match="PNEUMONIA"):
        explain_array(bundle, _images(1)[0], target="COVID")
    with pytest.raises(CxrlabError, match="2-D uint8"):
        explain_array(bundle, np.zeros((S, S, 3), np.uint8))
    onnx_like = ModelBundle(bundle.ckpt, object(), bundle.pre, bundle.spec, bundle.device)
    with pytest.raises(CxrlabError, match="ONNX"):
        explain_array(onnx_like, _images(1)[0])


def test_all_methods_registered_in_library():
    bundle = _bundle()
    for method in METHODS:  # gradient-free ones only on one tiny image
        assert explain_batch(bundle, _images(1, seed=3), [1], method=method).shape == (1, S, S)
    assert _hook_count(bundle.model) == 0


def test_hooks_released_and_memory_bounded():
    bundle = _bundle(size=32)  # tiny: 200 explanations in a few seconds
    gray = _images(1, size=48)[0]
    before = _hook_count(bundle.model)
    for _ in range(20):  # warm up allocator and caches
        explain_array(bundle, gray)
    gc.collect()
    tracemalloc.start()
    snap0, rss0 = tracemalloc.take_snapshot(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(200):
        explain_array(bundle, gray)
        assert _hook_count(bundle.model) == before
    gc.collect()
    growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    tracemalloc.stop()
    rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert growth < 2_000_000, f"python heap grew by {growth} bytes over 200 explanations"
    assert rss_growth_kb < 200_000, f"peak RSS grew by {rss_growth_kb} kB over 200 explanations"
    assert all(p.grad is None for p in bundle.model.parameters())


def test_pointing_game_and_energy_constructed():
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True
    inside = np.zeros((40, 40), np.float32)
    inside[15, 15] = 1.0
    outside = np.zeros((40, 40), np.float32)
    outside[32, 32] = 1.0
    assert pointing_game(inside, mask) is True
    assert pointing_game(outside, mask) is False
    near = np.zeros((40, 40), np.float32)
    near[21, 15] = 1.0  # 2 px below the mask
    assert pointing_game(near, mask, tolerance_px=2) and not pointing_game(near, mask, tolerance_px=1)
    assert pointing_game(inside, mask.astype(np.uint8)[::2, ::2].repeat(4, 0).repeat(4, 1)[:80, :80])  # resized
    half = np.zeros((40, 40), np.float32)
    half[10:20, 10:20] = 1.0  # 100 px inside
    half[30:35, 0:20] = 1.0  # 100 px outside
    assert energy_in_mask(half, mask) == pytest.approx(0.5)
    assert energy_in_mask(np.zeros((40, 40)), mask) == 0.0
    assert pointing_game(np.zeros((40, 40)), mask) is False


def test_training_cams_files_rng_and_mode(tmp_path):
    model = _model("custom_cnn").train()
    k = 4
    cams = TrainingCams(tmp_path / "cam", torch.from_numpy(_images(k)), torch.tensor([0, 1, 2, 1]),
                        [f"img{i}" for i in range(k)], CLASSES, InputSpec([0.5] * 3, [0.25] * 3, 3),
                        "custom_cnn", "gradcam", torch.device("cpu"))
    state = torch.get_rng_state()
    paths = cams.on_epoch_end(3, model)
    assert torch.equal(state, torch.get_rng_state()) and model.training and _hook_count(model) == 0
    assert len(paths) == k and len(list((tmp_path / "cam").glob("*.png"))) == k
    for i, p in enumerate(sorted(paths, key=lambda q: parse_cam_name(q.name)["stem"])):
        info = parse_cam_name(p.name)
        assert info["epoch"] == 3 and info["stem"] == f"img{i}"
        assert info["true"] == CLASSES[[0, 1, 2, 1][i]] and info["pred"] in CLASSES
    model.eval()
    cams.on_epoch_end(4, model)
    assert not model.training and len(list((tmp_path / "cam").glob("epoch004_*.png"))) == k
    with pytest.raises(CxrlabError):
        TrainingCams(tmp_path, _images(1), [0], ["a"], CLASSES, None, "custom_cnn", "bogus", "cpu")


def test_save_explanation_writes_png(tmp_path):
    res = explain_array(_bundle(), _images(1)[0])
    path = save_explanation(res, tmp_path / "x" / "a_cam.png", title="hello", mask=np.ones((S, S), bool))
    assert path.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- end to end on a tiny trained model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit

    root = tmp_path_factory.mktemp("explain_e2e")
    generate(root / "data", per_class=12, size=48)
    cfg = TrainConfig(data=str(root / "data"), model="custom_cnn", epochs=1, img_size=48, batch_size=16,
                      report=False, cache=False, out=str(root / "run"))
    fit(cfg, progress=False)
    return root


def test_cli_explain_files_with_bad_file(tiny_run, tmp_path, caplog):
    from cxrlab.cli import main

    data = tiny_run / "data"
    good = sorted((data / "test").rglob("*.png"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    out = tmp_path / "out"
    rc = main(["explain", "--checkpoint", str(tiny_run / "run" / "best.pt"), *map(str, good), str(bad),
               "--out", str(out), "--save-raw", "--quiet"])
    assert rc == 0
    for f in good:
        assert (out / f"{f.stem}_cam.png").read_bytes().startswith(b"\x89PNG")
        heat = np.load(out / f"{f.stem}_cam.npy")
        assert heat.shape == (48, 48) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert not (out / "broken_cam.png").exists()
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_cli_explain_score(tiny_run, tmp_path, capsys):
    from cxrlab.cli import main

    data, out = tiny_run / "data", tmp_path / "faith"
    rc = main(["explain", "--checkpoint", str(tiny_run / "run" / "best.pt"), "--data", str(data),
               "--masks", str(data / "masks"), "--score", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "faithfulness.json").read_text())
    for key in ("method", "n", "pointing_game", "energy_in_mask", "per_class", "per_image"):
        assert key in res
    assert res["n"] == len(res["per_image"]) > 0 and 0 <= res["pointing_game"] <= 1
    assert set(res["per_class"]) <= {"PNEUMONIA", "TUBERCULOSIS"}
    assert list(out.glob("*_cam.png")) and "pointing game" in capsys.readouterr().out


def test_cli_explain_argument_errors(tiny_run):
    from cxrlab.cli import main

    ckpt = str(tiny_run / "run" / "best.pt")
    assert main(["explain", "--checkpoint", ckpt, "--quiet"]) == 2
    assert main(["explain", "--checkpoint", ckpt, "--score", "--quiet"]) == 2
