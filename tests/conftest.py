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


@pytest.fixture
def budget_run():
    """Factory of Runs with just what the time-budget fit needs: 1 warm-up epoch, cosine from lr 0.1, a 60 s
    budget, 224 px; `budget_run(epochs, **config)` (other TrainConfig keys as keywords)."""
    from types import SimpleNamespace

    import torch

    from cxrlab.config import TrainConfig
    from cxrlab.engine import DistInfo
    from cxrlab.train import Run
    from cxrlab.training_setup import build_scheduler

    def make(epochs: int = 10, **config) -> Run:
        run = Run.__new__(Run)
        run.cfg = TrainConfig(data="x", epochs=epochs, warmup_epochs=1, scheduler="cosine", time_budget_min=1.0,
                              lr=0.1, **config)
        run.dist, run.pre = DistInfo(), SimpleNamespace(img_size=224)
        run.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        run.scheduler = build_scheduler(run.optimizer, run.cfg)
        run.full_epochs, run.cut_short, run.eval_s, run.planned_end, run.full_size_seen = [], False, None, None, False
        return run
    return make
