"""Commands that write a checkpoint derived from others (calibrate, adapt, ensemble) refuse to write over what
they read or over a training run's own checkpoints; resume says why when last.pt was replaced; a fitted
temperature that cannot be trusted is named; --n, --models and AUC on the console."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cxrlab.cli import main
from cxrlab.errors import CxrlabError


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of the tiny training run that a test may damage."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def _commands(run, synth_dir, out) -> dict:
    ckpt = str(run / "best.pt")
    return {"calibrate": ["calibrate", "--checkpoint", ckpt, "--data", str(synth_dir), "--split", "val", "--out", str(out)],
            "adapt": ["adapt", str(synth_dir / "train"), "--checkpoint", ckpt, "--out", str(out)],
            "ensemble": ["ensemble", ckpt, ckpt, "--out", str(out)]}


@pytest.mark.parametrize("command", ["calibrate", "adapt", "ensemble"])
def test_a_run_checkpoint_is_never_replaced(command, run_copy, synth_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_copy.glob("*.pt")}
    for target, expected in ((run_copy / "last.pt", f"'{run_copy / 'last.pt'}' is the last.pt of the training run"),
                             (run_copy / "best.pt", "is a checkpoint this command reads")):
        assert main(_commands(run_copy, synth_dir, target)[command]) == 2
        err = capsys.readouterr().err
        assert expected in err and "new file" in err, err
    assert {p.name: p.read_bytes() for p in run_copy.glob("*.pt")} == before


@pytest.mark.parametrize("command", ["calibrate", "adapt", "ensemble"])
def test_the_output_must_be_a_pt_file(command, tiny_run, synth_dir, tmp_path, capsys):
    assert main(_commands(tiny_run, synth_dir, tmp_path / "copy.onnx")[command]) == 2
    assert f"--out must end in .pt, got '{tmp_path / 'copy.onnx'}'" in capsys.readouterr().err
    assert main(_commands(tiny_run, synth_dir, tmp_path)[command]) == 2
    assert f"--out '{tmp_path}' is a folder" in capsys.readouterr().err
    assert not (tmp_path / "copy.onnx").exists()


def test_an_ensemble_may_not_replace_one_of_its_members(tiny_run, tmp_path, capsys):
    other = shutil.copy(tiny_run / "best.pt", tmp_path / "other.pt")
    assert main(["ensemble", str(tiny_run / "best.pt"), str(other), "--out", str(other)]) == 2
    assert "is a checkpoint this command reads; write the ensemble to a new file" in capsys.readouterr().err
    assert main(["ensemble", str(tiny_run / "best.pt"), str(other), "--out", str(tmp_path / "ens.pt")]) == 0


def test_resume_names_a_last_pt_without_training_state(run_copy, capsys):
    from cxrlab.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run_copy / "last.pt")
    del ckpt["train_state"]  # what an older calibrate/adapt --out RUN/last.pt left behind
    save_checkpoint(ckpt, run_copy / "last.pt")
    assert main(["train", "--resume", "--out", str(run_copy), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds no training state" in err and "--overwrite" in err and "KeyError" not in err


def test_temperature_warnings():
    from cxrlab.finalize import MIN_CALIBRATION_IMAGES, temperature_warnings
    from cxrlab.metrics import T_MAX, T_MIN

    names = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    balanced = np.repeat([0, 1, 2], MIN_CALIBRATION_IMAGES)
    assert temperature_warnings(1.3, balanced, names) == []
    (upper,) = temperature_warnings(T_MAX, balanced, names)
    assert "upper bound 20" in upper and "towards 1/3" in upper
    assert "lower bound 0.05" in temperature_warnings(T_MIN, balanced, names)[0]
    few, missing = temperature_warnings(1.0, np.array([0, 0, 1, 1]), names)
    assert "only 4 images" in few and "no TUBERCULOSIS" in missing and "that class" in missing


def test_calibrate_on_a_tiny_split_warns(tiny_run, synth_dir, tmp_path, caplog):
    """The QA case: a handful of images without one class fitted T to the search's bound, silently."""
    d = tmp_path / "d2" / "val"
    for cls in ("NORMAL", "PNEUMONIA"):
        (d / cls).mkdir(parents=True)
        for src in sorted((synth_dir / "val" / cls).iterdir())[:4]:
            shutil.copy(src, d / cls / src.name)
    with caplog.at_level("WARNING"):
        assert main(["calibrate", "--checkpoint", str(tiny_run / "best.pt"), "--data", str(tmp_path / "d2"),
                     "--split", "val", "--out", str(tmp_path / "cal.pt")]) == 0
    assert "fitted on only 8 images" in caplog.text and "no TUBERCULOSIS" in caplog.text


@pytest.mark.parametrize("n", ["0", "5"])
def test_adapt_n_below_the_minimum_is_refused(n, tiny_run, synth_dir, tmp_path, capsys):
    assert main(["adapt", str(synth_dir / "train"), "--checkpoint", str(tiny_run / "best.pt"), "--n", n,
                 "--out", str(tmp_path / "a.pt")]) == 2
    assert f"--n {n}: BatchNorm adaptation needs at least 32 images" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()


def test_adapt_a_model_without_batchnorm_statistics_says_so(tiny_run):
    from cxrlab.adapt import adapt_batchnorm
    from cxrlab.engine import batchnorms_with_statistics
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(tiny_run / "best.pt", device="cpu")
    assert batchnorms_with_statistics(bundle.model)  # custom_cnn has BatchNorm ...
    for m in batchnorms_with_statistics(bundle.model):
        m.track_running_stats = False  # ... now without statistics to adapt
    with pytest.raises(CxrlabError, match="has no BatchNorm layers"):
        adapt_batchnorm(bundle, np.zeros((40, 48, 48), np.uint8))


def test_compare_refuses_a_model_named_twice(synth_dir, tmp_path, capsys):
    assert main(["compare", "--data", str(synth_dir), "--models", "small_cnn,custom_cnn,small_cnn", "--epochs", "1",
                 "--out", str(tmp_path / "cmp")]) == 2
    assert "--models names small_cnn more than once" in capsys.readouterr().err


def test_format_metric():
    from cxrlab.metrics import format_metric

    assert format_metric(0.6979166666666666) == "0.6979" and format_metric(0.5, 3) == "0.500"
    assert format_metric(None) == "n/a" and format_metric(float("nan")) == "n/a"
