"""`cxrlab train --members K [--parallel P]`: K models on one validation carve averaged into a calibrated, tested
ensemble; members side by side are the same models as members one after another; an interrupted ensemble resumes
without retraining its finished members."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrlab.config import TrainConfig
from cxrlab.errors import CxrlabError
from cxrlab.members import check_members, member_configs, worker_gpu

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "accuracy.py"
SMALL = ["--model", "custom_cnn", "--epochs", "1", "--img-size", "32", "--batch-size", "16", "--amp", "off",
         "--no-report"]


def cli(cache: Path, *args) -> subprocess.CompletedProcess:
    # one thread everywhere: side by side and in sequence then do the same float arithmetic, bit for bit
    env = {**os.environ, "CXRLAB_CACHE": str(cache), "CXRLAB_NO_REEXEC": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cxrlab", "train", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def state_dict(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def ensembles(synth_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("members")
    cache = tmp / "cache"
    side = cli(cache, "--data", synth_dir, *SMALL, "--members", 2, "--parallel", 2, "--out", tmp / "side")
    assert side.returncode == 0, side.stderr[-3000:]
    seq = cli(cache, "--data", synth_dir, *SMALL, "--members", 2, "--out", tmp / "seq")
    assert seq.returncode == 0, seq.stderr[-3000:]
    return tmp, cache, seq.stdout


def test_member_configs_seed_carve_folder_and_budget_share():
    cfg = TrainConfig(data="d", out="runs/ens", seed=7, time_budget_min=60.0)
    cfgs = member_configs(cfg, 3)
    assert [c.seed for c in cfgs] == [7, 1007, 2007]
    assert {c.carve_seed for c in cfgs} == {7}  # one validation carve for all: the ensemble is calibrated on it
    assert [c.out for c in cfgs] == [str(Path("runs/ens") / f"member{i}") for i in range(3)]
    assert [c.time_budget_min for c in cfgs] == [20.0] * 3  # one after another: a third each
    assert member_configs(cfg, 4, parallel=2)[0].time_budget_min == 30.0  # two rounds of two
    assert member_configs(cfg, 3, parallel=2)[0].time_budget_min == 30.0  # 2 then 1: still two rounds
    assert member_configs(cfg, 3, parallel=5)[0].time_budget_min == 60.0  # all at once
    assert member_configs(TrainConfig(data="d", split_seed=3), 2)[1].carve_seed == 3
    assert member_configs(TrainConfig(data="d"), 2)[0].time_budget_min is None  # no budget stays no budget
    for k, p, msg in [(1, 1, "at least 2 members"), (2, 0, "--parallel 0")]:
        with pytest.raises(CxrlabError, match=msg):
            check_members(k, p)


def test_side_by_side_members_equal_members_one_after_another(ensembles):
    tmp, _, _ = ensembles
    for i in range(2):
        a, b = state_dict(tmp / "side" / f"member{i}" / "best.pt"), state_dict(tmp / "seq" / f"member{i}" / "best.pt")
        assert a.keys() == b.keys()
        for name, t in a.items():
            assert torch.equal(t, b[name]), f"member {i}: {name} differs"
    m0, m1 = state_dict(tmp / "seq" / "member0" / "best.pt"), state_dict(tmp / "seq" / "member1" / "best.pt")
    assert any(not torch.equal(m0[n], m1[n]) for n in m0 if m0[n].is_floating_point()), "members must differ"


def test_members_make_one_calibrated_tested_ensemble(ensembles, synth_dir):
    tmp, _, stdout = ensembles
    out = tmp / "seq"
    ens = torch.load(out / "best.pt", weights_only=True)
    assert ens["model"]["name"] == "ensemble" and len(ens["ensemble"]) == 2
    assert "validation carve" in ens["calibration_fitted_on"]
    assert ens["config"]["members"] == 2 and ens["config"]["out"] == str(out) and ens["config"]["seed"] == 42
    assert ens["epoch"] is None and ens["metric"]["value"] is None  # no placeholder numbers in /api/model or ONNX
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(list((synth_dir / "test").rglob("*.png"))) > 0  # the whole test split, once
    state = json.loads((out / "members.json").read_text())
    assert state["members"] == 2 and [m["seed"] for m in state["finished"]] == [42, 1042]
    assert state["ensemble"]["accuracy"] == metrics["accuracy"]
    member = json.loads((out / "member1" / "metrics.json").read_text())
    assert state["finished"][1]["accuracy"] == member["accuracy"]  # each member is tested as an ordinary run
    assert f"test: accuracy {metrics['accuracy']:.4f}" in stdout and "member 1 (seed 1042)" in stdout
    assert json.loads((tmp / "side" / "members.json").read_text())["finished"] == state["finished"]
    log = (out / "train.log").read_text()  # the ensemble's own log: the whole command, members included
    assert "ensemble of 2 members" in log and "seeds 42, 1042" in log and "member 1 finished" in log
    assert f"ensemble: test accuracy {metrics['accuracy']:.4f}" in log
    assert log.index("member 0 finished") < log.index("member 1 finished") < log.index("ensemble: test")


def test_resume_keeps_finished_members_and_trains_the_rest(ensembles):
    tmp, cache, _ = ensembles
    run = tmp / "resumed"
    shutil.copytree(tmp / "seq", run)
    state = json.loads((run / "members.json").read_text())
    state["finished"] = state["finished"][:1]  # interrupted while member 1 trained, before its first epoch ended
    (run / "members.json").write_text(json.dumps(state))
    shutil.rmtree(run / "member1")
    (run / "best.pt").unlink()
    before = (run / "member0" / "best.pt").stat().st_mtime_ns
    r = cli(cache, "--resume", "--out", run)  # settings and member count from the folder itself
    assert r.returncode == 0, r.stderr[-3000:]
    assert "member(s) 0 already finished" in r.stderr
    log = (run / "train.log").read_text()  # appended to: the first run's lines, then the resume's
    assert log.count("ensemble of 2 members in") == 2 and "member(s) 0 already finished" in log
    assert (run / "member0" / "best.pt").stat().st_mtime_ns == before  # not retrained
    a, b = state_dict(run / "member1" / "best.pt"), state_dict(tmp / "seq" / "member1" / "best.pt")
    assert all(torch.equal(t, b[n]) for n, t in a.items())
    assert json.loads((run / "metrics.json").read_text())["accuracy"] == \
        json.loads((tmp / "seq" / "metrics.json").read_text())["accuracy"]
    saved = (run / "config.yaml").read_text()
    r = cli(cache, "--resume", "--out", run, "--members", 3, "--epochs", 5)
    assert r.returncode == 2 and "holds an ensemble of 2 members, not 3" in r.stderr
    assert (run / "config.yaml").read_text() == saved  # a refused resume changes nothing


@pytest.mark.parametrize("args, message", [
    (["--parallel", "2"], "--parallel trains ensemble members side by side; give --members K"),
    (["--members", "1"], "--members 1: an ensemble needs at least 2 members"),
    (["--members", "2", "--nproc", "2"], "train the members with --parallel P instead"),
])
def test_bad_member_options_are_refused_before_training(synth_dir, tmp_path, args, message):
    r = cli(tmp_path / "cache", "--data", synth_dir, *SMALL, "--out", tmp_path / "x", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


def test_bench_members_use_the_same_ensemble(synth_dir, tmp_path):
    cmd = [sys.executable, str(BENCH), "--data", str(synth_dir), "--out", str(tmp_path / "b"), "--recipe", "custom_cnn",
           "--epochs", "1", "--img-size", "32", "--budget-min", "20", "--set", "batch_size=16", "--set", "amp=off",
           "--members", "2"]
    env = {**os.environ, "CXRLAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "bench_summary.json").read_text())
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert summary["accuracy"] == metrics["accuracy"] and [m["seed"] for m in summary["members"]] == [0, 1000]
    assert torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"]["name"] == "ensemble"
    r = subprocess.run(cmd[:-2] + ["--parallel", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--parallel trains ensemble members side by side; give --members K" in r.stderr


def test_worker_gpu_gives_each_side_by_side_process_one_gpu():
    assert [worker_gpu(w, 1, None) for w in range(3)] == [None, None, None]  # one GPU: every process shares it
    assert [worker_gpu(w, 2, None) for w in range(5)] == ["0", "1", "0", "1", "0"]
    # the parent's own CUDA_VISIBLE_DEVICES is kept: its GPUs, by their names
    assert [worker_gpu(w, 3, "2, 5,7") for w in range(4)] == ["2", "5", "7", "2"]


def test_members_without_a_test_split_still_make_a_calibrated_ensemble(synth_dir, tmp_path):
    data = tmp_path / "d"
    for split in ("train", "val"):
        shutil.copytree(synth_dir / split, data / split)
    r = cli(tmp_path / "cache", "--data", data, *SMALL, "--members", 2, "--out", tmp_path / "ens")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "ens" / "best.pt", weights_only=True)["model"]["name"] == "ensemble"
    state = json.loads((tmp_path / "ens" / "members.json").read_text())
    assert len(state["finished"]) == 2 and "ensemble" not in state and not (tmp_path / "ens" / "metrics.json").exists()
    assert "no test split" in r.stdout and "test: accuracy" not in r.stdout


@pytest.mark.parametrize("text", ["{\"members\": 2, \"fini", "[1, 2]", "\xff\xfe"])
def test_a_damaged_members_record_is_named_on_resume(tmp_path, capsys, text):
    from cxrlab.cli import main

    run = tmp_path / "ens"
    run.mkdir()
    (run / "members.json").write_bytes(text.encode("latin-1"))
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"'{run / 'members.json'}' is not the ensemble record cxrlab writes" in err and "new --out" in err
