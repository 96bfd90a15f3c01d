"""`bench/accuracy.py --members K --parallel P`: members trained side by side in their own processes must be
the same models as members trained one after another, averaged into one ensemble evaluated on test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "accuracy.py"


def bench(data: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH), "--data", str(data), "--out", str(out), "--recipe", "custom_cnn",
           "--epochs", "1", "--img-size", "32", "--budget-min", "20", "--set", "batch_size=16", "--set", "amp=off",
           *extra]
    # one thread everywhere: side by side and in sequence then do the same float arithmetic, bit for bit
    env = {**os.environ, "CXRLAB_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def member_runs(synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("members")
    cache = tmp / "cache"
    side = bench(synth_dir, tmp / "side", cache, "--members", "2", "--parallel", "2")
    assert side.returncode == 0, side.stderr[-3000:]
    seq = bench(synth_dir, tmp / "seq", cache, "--members", "2")
    assert seq.returncode == 0, seq.stderr[-3000:]
    return tmp / "side", tmp / "seq", cache


def test_parallel_members_equal_sequential_members(member_runs):
    side, seq, _ = member_runs
    for i in range(2):
        a = torch.load(side / f"member{i}" / "best.pt", weights_only=True)
        b = torch.load(seq / f"member{i}" / "best.pt", weights_only=True)
        assert a["config"]["seed"] == b["config"]["seed"] == 1000 * i
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for name, t in a["state_dict"].items():
            assert torch.equal(t, b["state_dict"][name]), f"member {i}: {name} differs"
    m0 = torch.load(side / "member0" / "best.pt", weights_only=True)["state_dict"]
    m1 = torch.load(side / "member1" / "best.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(m0[n], m1[n]) for n in m0 if m0[n].is_floating_point()), "members must differ (own seeds)"


def test_parallel_members_make_one_tested_ensemble(member_runs, synth_dir):
    side, seq, cache = member_runs
    ens = torch.load(side / "best.pt", weights_only=True)
    assert ens["model"]["name"] == "ensemble" and len(ens["ensemble"]) == 2
    summary = json.loads((side / "bench_summary.json").read_text())
    metrics = json.loads((side / "metrics.json").read_text())
    assert summary["accuracy"] == metrics["accuracy"] and [m["seed"] for m in summary["members"]] == [0, 1000]
    assert metrics["n"] == len(list((synth_dir / "test").rglob("*.png"))) > 0  # the whole test split, once
    seq_summary = json.loads((seq / "bench_summary.json").read_text())
    assert summary["members"] == seq_summary["members"]  # the same models give the same test numbers
    assert list(cache.rglob("*.u8")), "images were decoded into the cache before the members started"


def test_parallel_without_members_is_refused(synth_dir, tmp_path):
    r = bench(synth_dir, tmp_path / "x", tmp_path / "cache", "--parallel", "2")
    assert r.returncode == 2 and "--parallel trains ensemble members side by side; give --members K" in r.stderr
    assert not (tmp_path / "x").exists()


def test_worker_gpu_gives_each_side_by_side_process_one_gpu():
    sys.path.insert(0, str(BENCH.parent))
    try:
        from accuracy import worker_gpu
    finally:
        sys.path.remove(str(BENCH.parent))
    assert [worker_gpu(w, 1, None) for w in range(3)] == [None, None, None]  # one GPU: every process shares it
    assert [worker_gpu(w, 2, None) for w in range(5)] == ["0", "1", "0", "1", "0"]
    # the parent's own CUDA_VISIBLE_DEVICES is kept: its GPUs, by their names
    assert [worker_gpu(w, 3, "2, 5,7") for w in range(4)] == ["2", "5", "7", "2"]
