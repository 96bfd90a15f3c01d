"""Shared fixtures: a tiny synthetic data set and a tiny trained run, made once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CXRLAB_NO_REEXEC", "1")  # the CLI's allocator re-exec is for real runs, not tests

try:  # property tests explore the same examples on every run, so CI cannot turn red by chance
    from hypothesis import settings

    settings.register_profile("cxrlab", derandomize=True, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cxrlab"))
except ImportError:  # hypothesis is a test extra
    pass


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """30 phantoms per class at 48 px (train/val/test + masks + manifest)."""
    from cxrlab.data.synth import generate

    d = tmp_path_factory.mktemp("synth") / "d"
    generate(d, per_class=30, size=48, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_run(synth_dir, tmp_path_factory):
    """A custom_cnn trained for 2 epochs on `synth_dir` (no plots, no cache)."""
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data=str(synth_dir), out=str(out), model="custom_cnn", img_size=48, epochs=2, batch_size=16,
                      report=False, cache=False, workers=0)
    fit(cfg, progress=False)
    return out
