"""ONNX export: round trip with parity, metadata, dynamic batch, failure on broken parity, int8, predict/evaluate."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch

from cxrlab import export as E
from cxrlab.errors import CxrlabError

CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def random_checkpoint(name: str, size: int, in_chans: int = 3, **extra) -> dict:
    """A checkpoint of a randomly initialised model, built the way training builds it."""
    from cxrlab.config import TrainConfig
    from cxrlab.data.preprocess import Preprocess
    from cxrlab.engine import InputSpec
    from cxrlab.models import channel_stats, create_model, model_spec
    from cxrlab.train import make_checkpoint

    spec = model_spec(name)
    kw = {"img_size": size} if name in ("custom_cnn",) else {}
    torch.manual_seed(0)
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
    text = capsys.readouterr().out
    assert "parity fp32" in text and "int8 vs fp32" in text and "argmax agreement" in text
    assert E.read_metadata(out)["quantization"].startswith("int8")
    fp32 = E.load_onnx_bundle(E.export_onnx(pt, tmp_path / "m.onnx", check=False).path, threads=1)
    int8 = E.load_onnx_bundle(out, threads=1)
    x = E.calibration_images(48, str(data / "test"), 9)
    stats = E.compare(fp32.logits_for_arrays(x), int8.logits_for_arrays(x))
    assert stats["argmax_agreement"] >= 0.6 and stats["max_abs_dprob"] < 0.2, stats
