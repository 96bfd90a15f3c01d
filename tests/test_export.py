"""ONNX export: round trip with parity, metadata, dynamic batch, failure on broken parity, int8, predict/evaluate."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab import export as E
from cxrlab.errors import CxrlabError

CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def random_checkpoint(name: str, size: int, in_chans: int = 3, seed: int = 0, **extra) -> dict:
    """A checkpoint of a randomly initialised model (torch seed `seed`), built the way training builds it."""
    from cxrlab.config import TrainConfig
    from cxrlab.data.preprocess import Preprocess
    from cxrlab.engine import InputSpec
    from cxrlab.models import channel_stats, create_model, model_spec
    from cxrlab.train import make_checkpoint

    spec = model_spec(name)
    kw = {"img_size": size} if name in ("custom_cnn",) else {}
    torch.manual_seed(seed)
    model = create_model(name, num_classes=len(CLASSES), in_chans=in_chans, **kw).eval()
    ispec = InputSpec(channel_stats(spec.mean, in_chans), channel_stats(spec.std, in_chans), in_chans)
    return make_checkpoint(model, TrainConfig(model=name, img_size=size), CLASSES, Preprocess(size), ispec, 1,
                           ("val_loss", 1.0), [], kw, **extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A custom_cnn trained for one epoch on 48 px phantoms: (data dir, best.pt)."""
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit

    root = tmp_path_factory.mktemp("export")
    generate(root / "data", per_class=10, size=48)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), model="custom_cnn", epochs=1, img_size=48,
                      batch_size=16, report=False, cache=False, workers=0, calibrate=False, device="cpu")
    fit(cfg, progress=False)
    return root / "data", root / "run" / "best.pt"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return E.export_onnx(trained[1], out)


def test_round_trip_trained(exported):
    assert exported.parity["ok"] and exported.parity["max_abs_dprob"] <= 1e-4
    assert exported.parity["batches"] == [1, 3] and exported.parity["n"] >= 6


def test_metadata_round_trip(trained, exported):
    from cxrlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained[1])
    meta = E.read_metadata(exported.path)
    assert meta["class_names"] == ckpt["class_names"] and meta["img_size"] == 48
    assert meta["mean"] == pytest.approx(ckpt["mean"]) and meta["std"] == pytest.approx(ckpt["std"])
    assert meta["architecture"] == "custom_cnn" and meta["in_chans"] == ckpt["model"]["in_chans"]
    assert meta["preprocess"]["img_size"] == 48 and meta["quantization"] == "none"
    import onnx

    m = onnx.load(exported.path)
    assert m.opset_import[0].version >= 17 and m.graph.input[0].name == "image"
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 48, 48]


def test_dynamic_batch_and_tta(exported):
    bundle = E.load_onnx_bundle(exported.path, threads=1)
    x = np.random.default_rng(1).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    one = bundle.logits_for_arrays(x[:1], batch_size=1)
    five = bundle.logits_for_arrays(x, batch_size=5)
    assert one.shape == (1, 3) and five.shape == (5, 3)
    np.testing.assert_allclose(one[0], five[0], atol=1e-4)
    flipped = bundle.logits_for_arrays(x[:, :, ::-1].copy(), batch_size=5)
    np.testing.assert_allclose(bundle.logits_for_arrays(x, tta=True), (five + flipped) / 2, atol=1e-5)


@pytest.mark.parametrize("name,in_chans", [("resnet18", 3), ("efficientnet_lite0", 3), ("custom_cnn", 1)])
def test_export_models_64px(name, in_chans, tmp_path):
    ckpt = random_checkpoint(name, 64, in_chans, temperature=1.5, thresholds={"PNEUMONIA": 0.3})
    r = E.export_onnx(ckpt, tmp_path / "m.onnx")
    assert r.parity["ok"], r.parity
    meta = E.read_metadata(r.path)
    assert meta["temperature"] == 1.5 and meta["thresholds"] == {"PNEUMONIA": 0.3}
    bundle = E.load_onnx_bundle(r.path, threads=1)
    assert bundle.ckpt["thresholds"] == {"PNEUMONIA": 0.3} and bundle.class_names == CLASSES


def test_broken_parity_fails(trained, tmp_path, monkeypatch):
    real = E.onnx_logits
    monkeypatch.setattr(E, "onnx_logits", lambda s, x, b=64: real(s, x, b) + np.array([0.5, 0.0, 0.0], np.float32))
    out = tmp_path / "bad.onnx"
    with pytest.raises(CxrlabError, match="parity check failed"):
        E.export_onnx(trained[1], out)
    assert not out.exists() and (tmp_path / "bad.onnx.parity-failed").exists()


def test_bad_arguments(trained, tmp_path):
    with pytest.raises(CxrlabError, match="opset"):
        E.export_onnx(trained[1], tmp_path / "m.onnx", opset=13)
    with pytest.raises(CxrlabError, match=".onnx"):
        E.export_onnx(trained[1], tmp_path / "m.bin")
    with pytest.raises(CxrlabError, match="no cxrlab metadata"):
        E.read_metadata(_plain_onnx(tmp_path))


def _plain_onnx(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g), str(path))
    return path


def _predict_csv(main, capsys, *args) -> list[dict]:
    assert main(["predict", *args, "--quiet"]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_cli_predict_onnx_matches_pt(trained, exported, capsys, monkeypatch):
    from cxrlab.cli import main

    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")
    data, pt = trained
    ref = _predict_csv(main, capsys, str(data / "test"), "--checkpoint", str(pt))
    for args in (["--checkpoint", exported.path], ["--checkpoint", str(pt), "--engine", "onnx"]):
        got = _predict_csv(main, capsys, str(data / "test"), *args)
        assert [r["path"] for r in got] == [r["path"] for r in ref]
        assert [r["predicted"] for r in got] == [r["predicted"] for r in ref]
        for a, b in zip(got, ref):
            for c in CLASSES:
                assert abs(float(a[f"prob_{c}"]) - float(b[f"prob_{c}"])) <= 1e-4
    assert list(pt.parent.glob(".best.pt.*.onnx")), "the --engine onnx export is cached next to the checkpoint"


def test_evaluate_onnx(trained, exported, tmp_path):
    from cxrlab.evaluate import evaluate_checkpoint

    data, pt = trained
    a = evaluate_checkpoint(exported.path, data, tmp_path / "onnx", n_boot=10, report=False, device="cpu")
    b = evaluate_checkpoint(pt, data, tmp_path / "pt", n_boot=10, report=False, device="cpu")
    assert a["n"] == b["n"] and a["accuracy"] == pytest.approx(b["accuracy"])


def test_cli_export_int8(trained, tmp_path, capsys, monkeypatch):
    from cxrlab.cli import main

    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")
    data, pt = trained
    out = tmp_path / "m8.onnx"
    assert main(["export", "--checkpoint", str(pt), "--out", str(out), "--quantize", "int8",
                 "--calib-data", str(data / "train"), "--calib-count", "16", "--quiet"]) == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "parity fp32" in text and "int8 vs fp32" in text and "argmax agreement" in text
    assert "synthetic phantoms" not in cap.err  # calibrated on --calib-data: no phantom warning
    assert E.read_metadata(out)["quantization"].startswith("int8")
    fp32 = E.load_onnx_bundle(E.export_onnx(pt, tmp_path / "m.onnx", check=False).path, threads=1)
    int8 = E.load_onnx_bundle(out, threads=1)
    x = E.calibration_images(48, str(data / "test"), 9)
    stats = E.compare(fp32.logits_for_arrays(x), int8.logits_for_arrays(x))
    assert stats["argmax_agreement"] >= 0.6 and stats["max_abs_dprob"] < 0.2, stats


# ---------------------------------------------------------------- ensembles in one graph


def _member(name: str, seed: int, temperature: float, size: int = 48, **pre) -> dict:
    from cxrlab.data.preprocess import Preprocess

    ck = random_checkpoint(name, size, 1 if name == "custom_cnn" else 3, seed=seed, temperature=temperature)
    ck["preprocess"] = Preprocess(size, **pre).to_dict()
    return ck


@pytest.fixture(scope="module")
def ensemble_pt(tmp_path_factory):
    """Two different members (custom_cnn T 1.5, resnet18 T 0.7), weights 1:3, with the ensemble's own T and thresholds."""
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble

    root = tmp_path_factory.mktemp("ens")
    for i, (name, t) in enumerate([("custom_cnn", 1.5), ("resnet18", 0.7)]):
        save_checkpoint(_member(name, i + 1, t), root / f"m{i}.pt")
    ens = build_ensemble([root / "m0.pt", root / "m1.pt"], [1, 3])
    ens.update(temperature=0.8, thresholds={"TUBERCULOSIS": 0.2})
    save_checkpoint(ens, root / "ens.pt")
    return root / "ens.pt"


def test_ensemble_exports_as_one_graph(ensemble_pt, tmp_path):
    from cxrlab.inference import load_model_bundle

    r = E.export_onnx(ensemble_pt, tmp_path / "ens.onnx")
    assert r.parity["ok"] and r.parity["max_abs_dprob"] <= 1e-4, r.parity
    meta = E.read_metadata(r.path)
    assert meta["architecture"] == "ensemble" and meta["temperature"] == 0.8
    assert meta["thresholds"] == {"TUBERCULOSIS": 0.2}
    assert [(e["architecture"], e["weight"], e["temperature"]) for e in meta["ensemble"]] == \
        [("custom_cnn", 0.25, 1.5), ("resnet18", 0.75, 0.7)]
    assert meta["ensemble"][0]["source"].endswith("m0.pt")
    onnx_b, torch_b = load_model_bundle(r.path), load_model_bundle(ensemble_pt, "cpu")
    x = np.random.default_rng(3).integers(0, 256, (7, 48, 48), dtype=np.uint8)
    got, want = onnx_b.logits_for_arrays(x, batch_size=4), torch_b.logits_for_arrays(x)
    np.testing.assert_allclose(onnx_b.probs(got), torch_b.probs(want), atol=1e-4)
    # the output is log(weighted average of the members' calibrated probabilities), as the members give them
    members = [b.probs(b.logits_for_arrays(x)) for b in torch_b.members]
    np.testing.assert_allclose(np.exp(got), 0.25 * members[0] + 0.75 * members[1], atol=1e-4)
    single = _save_member(tmp_path, "custom_cnn", 0, 1.0)
    assert E.read_metadata(E.export_onnx(single, tmp_path / "one.onnx", check=False).path)["ensemble"] is None


def _save_member(tmp_path, name: str, seed: int, temperature: float, **pre):
    from cxrlab.checkpoint import save_checkpoint

    path = tmp_path / f"{name}_{seed}_{'_'.join(map(str, pre.values()))}.pt"
    save_checkpoint(_member(name, seed, temperature, **pre), path)
    return path


def test_ensemble_of_one_model_twice_exports_that_model(tmp_path):
    """Known answer: averaging a model with itself gives back its calibrated probabilities."""
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble

    one = _save_member(tmp_path, "resnet18", 2, 1.3)
    save_checkpoint(build_ensemble([one, one], [2, 1]), tmp_path / "twice.pt")
    x = np.random.default_rng(4).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    ens = E.load_onnx_bundle(E.export_onnx(tmp_path / "twice.pt", tmp_path / "twice.onnx").path, threads=1)
    single = E.load_onnx_bundle(E.export_onnx(one, tmp_path / "one.onnx").path, threads=1)
    np.testing.assert_allclose(ens.probs(ens.logits_for_arrays(x)), single.probs(single.logits_for_arrays(x)),
                               atol=1e-5)


def test_ensemble_with_two_presets_is_refused(tmp_path):
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble

    plain, equalised = _save_member(tmp_path, "custom_cnn", 0, 1.0), _save_member(tmp_path, "custom_cnn", 1, 1.0, equalize=True)
    save_checkpoint(build_ensemble([plain, equalised]), tmp_path / "mixed.pt")
    with pytest.raises(CxrlabError, match=r"one preprocessing preset.*custom_cnn_1_True\.pt.*export the members one by one"):
        E.export_onnx(tmp_path / "mixed.pt", tmp_path / "mixed.onnx")
    assert not list(tmp_path.glob("*.onnx*")), "nothing written"


def test_fp32_front_per_model_and_per_member(ensemble_pt, exported, tmp_path):
    """int8 keeps the first 3 convolutions from the image in fp32 (and the ops between them): for a model its first
    three, for an ensemble each member's own."""
    import onnx

    nodes = onnx.load(exported.path).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    front = E._fp32_front(exported.path)
    assert [n for n in front if n in convs] == convs[:3] and len(convs) > 3  # custom_cnn: one conv after another
    assert all(n.op_type in E.QUANT_OPS for n in nodes if n.name in front)
    assert [n for n in E._fp32_front(exported.path, convs=1) if n in convs] == convs[:1]
    path = E.export_onnx(ensemble_pt, tmp_path / "ens.onnx", check=False).path
    by_member = {}
    for n in onnx.load(path).graph.node:
        if n.op_type == "Conv" and n.name in E._fp32_front(path):
            by_member.setdefault(n.name.split("/")[1], []).append(n.name)
    assert sorted(by_member) == ["members.0", "members.1"]
    assert len(by_member["members.0"]) == 3  # custom_cnn: its first three
    assert by_member["members.1"][0].endswith("/conv1/Conv")  # resnet18: its stem first


def test_ensemble_int8(ensemble_pt, tmp_path, capsys, monkeypatch):
    from cxrlab.cli import main

    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")
    out = tmp_path / "ens8.onnx"
    assert main(["export", "--checkpoint", str(ensemble_pt), "--out", str(out), "--quantize", "int8",
                 "--calib-count", "32"]) == 0
    cap = capsys.readouterr()
    text = cap.out
    assert "ensemble of 2 (custom_cnn, resnet18) in one graph" in text and "int8 vs fp32" in text
    # no --calib-data: the user is told that the ranges and the agreement come from phantoms, and what to pass
    assert "warning: int8 was calibrated on synthetic phantoms" in cap.err and "--calib-data" in cap.err
    meta = E.read_metadata(out)
    assert meta["quantization"].startswith("int8") and len(meta["ensemble"]) == 2
    import onnx

    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "QuantizeLinear" in ops and "ReduceLogSumExp" in ops


def test_int8_warnings():
    """Known answers: phantom calibration and agreement below INT8_MIN_AGREEMENT warn, each with its fix."""
    ok = {"source": "data/train", "argmax_agreement": 1.0, "n": 64}
    assert E.int8_warnings(ok, Path("m.onnx")) == []
    edge = {**ok, "argmax_agreement": E.INT8_MIN_AGREEMENT}
    assert E.int8_warnings(edge, Path("m.onnx")) == []  # at the limit: no warning
    low = {**ok, "argmax_agreement": 0.953125}
    (w,) = E.int8_warnings(low, Path("out/m.onnx"))
    assert "changed 4.7% of the decisions" in w and "64 held-out images" in w
    assert "cxrlab evaluate --checkpoint out/m.onnx" in w and "without --quantize" in w
    both = E.int8_warnings({**low, "source": "synthetic phantoms"}, Path("m.onnx"))
    assert len(both) == 2 and "--calib-data" in both[0] and "phantoms" in both[0]


def test_calibration_images_use_the_model_preset(trained):
    """int8 calibration sees what the model sees: an equalising model is calibrated on equalised images."""
    from cxrlab.data.cache import load_arrays
    from cxrlab.data.preprocess import Preprocess, prepare_array
    from cxrlab.data.synth import render_phantom

    data, _ = trained
    pre = Preprocess(48, equalize=True)
    got = E.calibration_images(48, str(data / "test"), 4, pre=pre)
    files = sorted(f for f in (data / "test").rglob("*") if f.is_file())
    pick = sorted(np.random.default_rng(0).choice(len(files), size=4, replace=False))
    want = load_arrays([files[i] for i in pick], pre, cache_dir=False)[0]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, E.calibration_images(48, str(data / "test"), 4))
    phantom = render_phantom(np.random.default_rng(0), 48, "NORMAL")[0]
    np.testing.assert_array_equal(E.calibration_images(48, None, 1, pre=pre)[0], prepare_array(phantom, pre))


def test_ensemble_log_average_is_exact_for_tiny_probabilities():
    """The ensemble's logits are log(sum w p) computed in log space: no floor at log(1e-12) = -27.6."""
    from cxrlab.ensemble import EnsembleBundle

    class Fixed:
        def __init__(self, t):
            self.ckpt = {"temperature": t}

    b = EnsembleBundle.__new__(EnsembleBundle)
    b.members, b.weights = [Fixed(1.0), Fixed(2.0)], [0.25, 0.75]
    a = np.array([[100.0, 0.0, 0.0], [0.0, 1.0, 2.0]], np.float32)
    c = np.array([[80.0, 0.0, 0.0], [2.0, 1.0, 0.0]], np.float32)
    got = b._combine([a, c])
    p = 0.25 * np.exp(a - np.log(np.exp(a.astype(np.float64)).sum(1, keepdims=True))) + \
        0.75 * np.exp(c / 2 - np.log(np.exp(c / 2.0).sum(1, keepdims=True)))
    np.testing.assert_allclose(got[1], np.log(p[1]), rtol=1e-6)
    np.testing.assert_allclose(got[0, 1:], [np.log(0.75) - 40.0] * 2, rtol=1e-5)  # -40.3, where the floor gave -27.6


def test_cli_predict_ensemble_via_onnx(trained, ensemble_pt, capsys, monkeypatch):
    """`predict --engine onnx` on an ensemble .pt exports it once (cached) and decides as the .pt does."""
    from cxrlab.cli import main

    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")
    data, _ = trained
    ref = _predict_csv(main, capsys, str(data / "test"), "--checkpoint", str(ensemble_pt))
    got = _predict_csv(main, capsys, str(data / "test"), "--checkpoint", str(ensemble_pt), "--engine", "onnx")
    assert [r["path"] for r in got] == [r["path"] for r in ref] and len(ref) >= 6
    assert [r["predicted"] for r in got] == [r["predicted"] for r in ref]
    assert max(abs(float(a[f"prob_{c}"]) - float(b[f"prob_{c}"])) for a, b in zip(got, ref) for c in CLASSES) <= 1e-4
    assert list(ensemble_pt.parent.glob(".ens.pt.*.onnx")), "the export is cached next to the ensemble"


def test_cli_evaluate_onnx_with_a_device_warns_and_runs_on_the_cpu(trained, exported, tmp_path, caplog, capsys):
    """An ONNX model runs with onnxruntime on the CPU whatever --device says: evaluate warns and runs, as predict,
    stress and serve do, instead of refusing --device cuda on a machine without a GPU."""
    from cxrlab.cli import main

    data, _ = trained
    with caplog.at_level("WARNING"):
        rc = main(["evaluate", "--checkpoint", exported.path, "--data", str(data), "--out", str(tmp_path / "ev"),
                   "--device", "cuda", "--bootstrap", "10", "--no-report"])
    assert rc == 0 and (tmp_path / "ev" / "metrics.json").is_file()
    assert "--device cuda is ignored for the ONNX model" in caplog.text
