"""Site adaptation (`cxrlab adapt`, `evaluate --adapt-bn`): exact statistics, untouched weights, round trips."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.errors import CxrlabError

ENV = dict(os.environ, CXRLAB_NO_REEXEC="1")


def _new_site(src, dst, gain=0.55, offset=60, count=48):
    """Another 'hospital': `count` of the phantoms, darker and flatter (images only, no labels)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*.png"))[:count]:
        a = np.asarray(Image.open(p).convert("L"), dtype=np.float32)
        Image.fromarray(np.clip(a * gain + offset, 0, 255).astype(np.uint8)).save(dst / f"{p.parent.name}_{p.name}")
    return dst


def test_adapted_statistics_are_those_of_the_new_site(tiny_run, synth_dir, tmp_path):
    from cxrlab.adapt import adapt_checkpoint
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.inference import expand_inputs, load_model_bundle

    site = _new_site(synth_dir / "train", tmp_path / "site")
    src = tiny_run / "best.pt"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    record = adapt_checkpoint(src, [str(site)], tmp_path / "site.pt", device="cpu")
    n_files = len(list(site.iterdir()))
    assert n_files == 48  # one batch: the statistics are the plain mean/variance over the images
    assert record["images"] == n_files and record["unreadable"] == 0
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # the original is never touched

    old, new = load_checkpoint(src), load_checkpoint(tmp_path / "site.pt")
    assert new["adapted"]["base_checkpoint"] == str(src)
    for key in ("class_names", "img_size", "mean", "std", "preprocess", "temperature", "model"):
        assert new[key] == old[key], key
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for k, v in old["state_dict"].items():
        if not k.endswith(stats):
            assert torch.equal(new["state_dict"][k], v), k  # no learned weight changes
    assert not torch.allclose(new["state_dict"]["features.1.running_mean"], old["state_dict"]["features.1.running_mean"])

    # known answer for the first BatchNorm: the mean/unbiased variance of the first convolution's output
    bundle = load_model_bundle(src, device="cpu")
    arrays, ok, _ = bundle.arrays_for_files(expand_inputs([str(site)]))
    x = (torch.as_tensor(arrays).float().unsqueeze(1) / 255 - torch.tensor(bundle.spec.mean).view(1, -1, 1, 1)) \
        / torch.tensor(bundle.spec.std).view(1, -1, 1, 1)
    x = x.expand(-1, bundle.spec.in_chans, -1, -1)
    with torch.no_grad():
        feats = bundle.model.features[0](x)
    sd = new["state_dict"]
    assert torch.allclose(sd["features.1.running_mean"], feats.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(sd["features.1.running_var"], feats.var(dim=(0, 2, 3)), rtol=1e-3)


def test_evaluate_adapt_bn_equals_adapt_then_evaluate(tiny_run, synth_dir, tmp_path):
    from cxrlab.adapt import adapt_checkpoint
    from cxrlab.evaluate import evaluate_checkpoint

    a = evaluate_checkpoint(tiny_run / "best.pt", synth_dir, tmp_path / "a", split="train", adapt_bn=True,
                            device="cpu", n_boot=10, report=False)
    assert a["adapt_bn"]["images"] == a["n"]
    adapt_checkpoint(tiny_run / "best.pt", [str(synth_dir / "train")], tmp_path / "t.pt", device="cpu")
    b = evaluate_checkpoint(tmp_path / "t.pt", synth_dir, tmp_path / "b", split="train", device="cpu", n_boot=10,
                            report=False)
    assert "adapt_bn" not in b
    pa = list(csv.DictReader(open(tmp_path / "a" / "predictions.csv")))
    pb = list(csv.DictReader(open(tmp_path / "b" / "predictions.csv")))
    assert [r["path"] for r in pa] == [r["path"] for r in pb]
    cols = [c for c in pa[0] if c.startswith("prob_")]
    diff = max(abs(float(r[c]) - float(s[c])) for r, s in zip(pa, pb) for c in cols)
    assert diff < 1e-4


def test_adapt_refuses_what_it_cannot_do(tiny_run, synth_dir, tmp_path):
    from cxrlab.adapt import adapt_checkpoint

    with pytest.raises(CxrlabError, match="at least 32 readable images"):
        adapt_checkpoint(tiny_run / "best.pt", [str(synth_dir / "test")], tmp_path / "x.pt", device="cpu")
    with pytest.raises(CxrlabError, match="is the checkpoint being adapted"):
        adapt_checkpoint(tiny_run / "best.pt", [str(synth_dir / "train")], tiny_run / "best.pt", device="cpu")
    from cxrlab.checkpoint import save_checkpoint
    from cxrlab.ensemble import build_ensemble
    from cxrlab.evaluate import evaluate_checkpoint

    save_checkpoint(build_ensemble([tiny_run / "best.pt", tiny_run / "best.pt"]), tmp_path / "ens.pt")
    with pytest.raises(CxrlabError, match="adapt each ensemble member"):  # never only the first member
        evaluate_checkpoint(tmp_path / "ens.pt", synth_dir, tmp_path / "ev", split="train", adapt_bn=True,
                            device="cpu", n_boot=10, report=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlabError, match="no image files found"):
        adapt_checkpoint(tiny_run / "best.pt", [str(tmp_path / "empty")], tmp_path / "x.pt", device="cpu")
    assert not (tmp_path / "x.pt").exists()


def test_adapt_cli_reports_and_fails_cleanly(tiny_run, synth_dir, tmp_path):
    out = tmp_path / "site.pt"
    r = subprocess.run([sys.executable, "-m", "cxrlab", "adapt", str(synth_dir / "train"), "--checkpoint",
                        str(tiny_run / "best.pt"), "--out", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and "BatchNorm statistics from" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "cxrlab", "adapt", str(synth_dir / "val"), "--checkpoint",
                          str(tiny_run / "best.pt"), "--out", str(tmp_path / "v.pt")], capture_output=True, text=True,
                         env=ENV)
    assert bad.returncode != 0 and "at least 32" in bad.stderr and "Traceback" not in bad.stderr


def test_a_batchnorm_left_unnormalised_by_training_stays_so(tiny_run, synth_dir, tmp_path):
    """A BatchNorm whose statistics are exactly (0, 1) while others' are measured (the stem of a --freeze-stages
    model after precise BN) keeps them through adaptation; the others are re-estimated. A model whose every
    BatchNorm is (0, 1) never measured any, and all of them are re-estimated."""
    from cxrlab.adapt import adapt_checkpoint
    from cxrlab.checkpoint import load_checkpoint, save_checkpoint
    from cxrlab.engine import unnormalised_batchnorms
    from cxrlab.models import create_model

    ck = load_checkpoint(tiny_run / "best.pt")
    sd = ck["state_dict"]
    bn_keys = sorted(k[: -len(".running_mean")] for k in sd if k.endswith(".running_mean"))
    first, rest = bn_keys[0], bn_keys[1:]
    assert rest
    sd[f"{first}.running_mean"].zero_()
    sd[f"{first}.running_var"].fill_(1.0)
    save_checkpoint(ck, tmp_path / "stem01.pt")
    site = _new_site(synth_dir / "train", tmp_path / "site")
    adapt_checkpoint(tmp_path / "stem01.pt", [str(site)], tmp_path / "site.pt", device="cpu")
    new = load_checkpoint(tmp_path / "site.pt")["state_dict"]
    assert not new[f"{first}.running_mean"].any() and bool((new[f"{first}.running_var"] == 1).all())
    assert all(not torch.equal(new[f"{k}.running_mean"], sd[f"{k}.running_mean"]) for k in rest)

    fresh = create_model("resnet18", num_classes=2)  # every BatchNorm at its initial (0, 1)
    assert unnormalised_batchnorms(fresh) == []
    fresh.bn1.running_mean.fill_(0.1)
    assert len(unnormalised_batchnorms(fresh)) == len([m for m in fresh.modules()
                                                       if isinstance(m, torch.nn.BatchNorm2d)]) - 1
