"""`cxrlab calibrate`: temperature and operating points re-fitted on a labelled split of a trained model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cxrlab.errors import CxrlabError

ENV = dict(os.environ, CXRLAB_NO_REEXEC="1")


def _val_logits(ckpt_path, synth_dir, split="val"):
    from cxrlab.data.dataset import build_index
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(ckpt_path, device="cpu")
    samples = build_index(synth_dir, None, require=(), val_fraction=0).splits[split]
    logits, ok, _ = bundle.logits_for_files([s.path for s in samples])
    names = [n.lower() for n in bundle.class_names]
    return logits, np.array([names.index(samples[i].label.lower()) for i in ok]), bundle.class_names


def test_calibrate_fits_temperature_and_reaches_the_target_recall(tiny_run, synth_dir, tmp_path):
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.metrics import apply_temperature, fit_temperature

    out = tmp_path / "cal.pt"
    r = subprocess.run([sys.executable, "-m", "cxrlab", "calibrate", "--checkpoint", str(tiny_run / "best.pt"),
                        "--data", str(synth_dir), "--split", "train", "--target-recall", "TUBERCULOSIS=0.95",
                        "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out)
    logits, y, names = _val_logits(tiny_run / "best.pt", synth_dir, "train")
    assert ckpt["temperature"] == pytest.approx(fit_temperature(logits, y), rel=1e-6)
    assert ckpt["calibration_fitted_on"].startswith(f"train split of {synth_dir} ({len(y)} images)")
    tb = names.index("TUBERCULOSIS")
    probs = apply_temperature(logits, ckpt["temperature"])
    t = ckpt["thresholds"]["TUBERCULOSIS"]
    assert ((probs[y == tb, tb] >= t).mean()) >= 0.95  # the target recall holds on the split it was chosen on
    assert "TUBERCULOSIS: threshold" in r.stdout
    # re-fitting without a target drops thresholds that belonged to the old temperature
    r2 = subprocess.run([sys.executable, "-m", "cxrlab", "calibrate", "--checkpoint", str(out), "--data",
                         str(synth_dir), "--out", str(tmp_path / "cal2.pt")], capture_output=True, text=True, env=ENV)
    assert r2.returncode == 0, r2.stderr
    again = load_checkpoint(tmp_path / "cal2.pt")
    assert "thresholds" not in again and again["calibration_fitted_on"].startswith("val split")
    assert again["state_dict"].keys() == ckpt["state_dict"].keys()


def test_calibrate_refuses_bad_requests(tiny_run, synth_dir, tmp_path):
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.finalize import calibrate_on_split

    ckpt = load_checkpoint(tiny_run / "best.pt")
    with pytest.raises(CxrlabError, match="has no 'holdout' split"):
        calibrate_on_split(ckpt, synth_dir, "holdout", device="cpu")
    with pytest.raises(CxrlabError, match="unknown class 'EDEMA'"):
        calibrate_on_split(ckpt, synth_dir, "val", target_recall={"EDEMA": 0.9}, device="cpu")
    r = subprocess.run([sys.executable, "-m", "cxrlab", "calibrate", "--checkpoint", str(tiny_run / "best.pt"),
                        "--data", str(synth_dir), "--out", str(tiny_run / "best.pt")], capture_output=True, text=True,
                       env=ENV)
    assert r.returncode != 0 and "write the calibrated copy to a new file" in r.stderr and "Traceback" not in r.stderr
