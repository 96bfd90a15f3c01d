"""Distributed data-parallel training: sharding, and 2 CPU processes (gloo) through torchrun.

The end-to-end tests start real processes (`torchrun --standalone --nproc_per_node=2 -m cxrlab
train`) on a tiny synthetic set; three launches in all, about 60 s on two busy CPU cores.

Exactness: with augmentation and dropout off, one process with batch 2 and `--grad-accum 2`
and two processes with batch 2 see the same samples per optimiser step and BatchNorm sees one
image per forward pass in both, so the weights, and hence the training losses, agree to float
precision. The validation loss agrees only approximately: BatchNorm's running statistics are
updated image by image in one process but averaged over the ranks in two. With the same global
batch and larger micro-batches (e.g. 16 = 2 x 8) the training losses differ too, because
BatchNorm normalises each micro-batch by its own statistics (SyncBatchNorm would remove that,
but PyTorch has it on CUDA only); docs/DISTRIBUTED.md reports the size of that difference.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrlab.engine import DistInfo, epoch_order, shard

# --- sharding ---------------------------------------------------------------------------------


def test_more_processes_than_gpus_fails_before_launch(monkeypatch, capsys):
    """Seen on a 1-GPU machine: --nproc 2 died inside NCCL with 'invalid device ordinal'."""
    from cxrlab.cli import main
    from cxrlab.errors import CxrlabError
    from cxrlab.training_setup import check_gpus_for_processes, uses_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("auto", "cuda"):
        with pytest.raises(CxrlabError, match=r"--nproc 2 runs one process per GPU, but 1 CUDA GPU\(s\) are visible; "
                                              r"use --nproc 1 \(or --device cpu"):
            check_gpus_for_processes(2, device)
    check_gpus_for_processes(2, "cpu")  # CPU processes: gloo, the GPU is left alone
    check_gpus_for_processes(1, "cuda")
    assert uses_cuda("auto") and uses_cuda("cuda:0") and not uses_cuda("cpu")
    monkeypatch.setenv("CXRLAB_NO_REEXEC", "1")
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun must not be launched"))
    assert main(["train", "--data", "missing-but-not-read", "--nproc", "2", "--device", "cuda"]) != 0
    assert "1 CUDA GPU(s) are visible" in capsys.readouterr().err


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (5, 8), (1, 2)])
def test_shards_are_disjoint_cover_all_and_equal_length(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    parts = [shard(order, DistInfo(r, world)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1, "every rank must run the same number of batches"
    assert len(parts[0]) == -(-n // world)
    # without the padding, the shards partition the order exactly
    exact = [shard(order, DistInfo(r, world), pad=False) for r in range(world)]
    assert sorted(torch.cat(exact).tolist()) == sorted(order.tolist())
    # with it, every index appears and only the (total - n) padding positions repeat
    padded = torch.cat(parts).tolist()
    assert set(padded) == set(order.tolist())
    assert len(padded) - n == len(padded) - len(set(padded)) < world


def test_single_process_shard_is_the_identity():
    order = torch.arange(9)
    assert torch.equal(shard(order, DistInfo()), order)


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_epoch_order_is_the_same_on_every_rank_and_changes_per_epoch(sampler):
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    a, b = epoch_order(labels, 42, 3, sampler), epoch_order(labels, 42, 3, sampler)
    assert torch.equal(a, b)  # ranks draw independently and must agree before sharding
    assert not torch.equal(a, epoch_order(labels, 42, 4, sampler))
    assert len(a) == len(labels)
    if sampler == "shuffle":
        assert sorted(a.tolist()) == list(range(len(labels)))
    else:  # class-balanced: minority classes are drawn far above their 10-15 % share
        share = torch.bincount(labels[torch.cat([epoch_order(labels, 42, e, sampler) for e in range(20)])], minlength=3)
        assert (share.float() / share.sum() > 0.25).all()


# --- two processes through torchrun ------------------------------------------------------------

NO_RANDOMNESS = """\
model_kwargs: {dropout: 0.0}
aug_flip: 0.0
aug_rotation: 0.0
aug_translate: 0.0
aug_crop_scale_min: 1.0
aug_brightness: 0.0
aug_contrast: 0.0
"""
COMMON = ["--model", "custom_cnn", "--img-size", "48", "--batch-size", "2", "--no-cache", "--no-report"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run(cmd: list[str], cwd: Path, log: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc.stdout + proc.stderr


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (batch 2, grad-accum 2) and two processes (batch 2): the second launched as
    `cxrlab train --nproc 2 --epochs 1`, then continued with `torchrun ... --epochs 2 --resume`."""
    from cxrlab.data.synth import generate

    if not torch.distributed.is_available():
        pytest.skip("this PyTorch build has no torch.distributed")
    tmp = tmp_path_factory.mktemp("ddp")
    generate(tmp / "d", per_class=20, size=48, seed=0)
    (tmp / "cfg.yaml").write_text(NO_RANDOMNESS)
    base = ["--config", "cfg.yaml", "--data", "d", *COMMON]
    cli = [sys.executable, "-m", "cxrlab", "train"]
    out = {"tmp": tmp}
    out["single_log"] = _run([*cli, *base, "--epochs", "2", "--grad-accum", "2", "--out", "single"], tmp, tmp / "single.log")
    out["nproc_log"] = _run([*cli, *base, "--epochs", "1", "--nproc", "2", "--out", "ddp"], tmp, tmp / "nproc.log")
    out["epoch1"] = _history(tmp / "ddp")
    out["resume_log"] = _run([*_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "cxrlab", "train", *base,
                              "--epochs", "2", "--resume", "--out", "ddp"], tmp, tmp / "resume.log")
    return out


@pytest.mark.slow
def test_nproc_shortcut_runs_two_ranks_and_logs_the_world_size(runs):
    assert "torch.distributed.run" in runs["nproc_log"] and "--nproc_per_node=2" in runs["nproc_log"]
    assert len(runs["epoch1"]) == 1
    train_log = (runs["tmp"] / "ddp" / "train.log").read_text()
    assert re.search(r"world size 2\b", train_log)
    assert re.search(r"world size 1\b", (runs["tmp"] / "single" / "train.log").read_text())


@pytest.mark.slow
def test_only_rank_zero_writes_one_run_folder(runs):
    tmp = runs["tmp"]
    assert sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("best.pt")) == ["ddp/best.pt", "single/best.pt"]
    assert sorted(p.name for p in tmp.rglob("train.log")) == ["train.log", "train.log"]
    assert not list((tmp / "ddp").glob(".*tmp*")), "no temporary files left behind"
    assert len(_history(tmp / "ddp")) == 2
    # one epoch line per epoch: rank 1 logs warnings only
    assert len(re.findall(r"^epoch 2/2", runs["resume_log"], flags=re.M)) == 1


@pytest.mark.slow
def test_resume_continues_the_distributed_run(runs):
    hist = _history(runs["tmp"] / "ddp")
    assert [r["epoch"] for r in hist] == ["1", "2"]
    assert hist[0] == runs["epoch1"][0], "resume must keep the first epoch's row as it was"
    assert "resuming from" in runs["resume_log"]
    ckpt = torch.load(runs["tmp"] / "ddp" / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["state_dict"])


@pytest.mark.slow
def test_validation_and_test_metrics_cover_every_sample_once(runs):
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.inference import bundle_from_checkpoint

    tmp = runs["tmp"]
    n_val = len(list((tmp / "d" / "val").glob("*/*.png")))
    n_test = len(list((tmp / "d" / "test").glob("*/*.png")))
    assert n_val % 2 == 1 and n_test % 2 == 1, "odd sizes: the ranks' shards differ in length"
    for row in _history(tmp / "ddp"):
        count = float(row["val_acc"]) * n_val
        assert abs(count - round(count)) < 1e-3, f"val_acc {row['val_acc']} is not k/{n_val}"
    metrics = json.loads((tmp / "ddp" / "metrics.json").read_text())
    assert metrics["n"] == n_test
    assert sum(map(sum, metrics["confusion_matrix"])) == n_test
    with open(tmp / "ddp" / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == n_test
    # the gathered validation loss is that of last.pt evaluated by one process on the whole split
    ckpt = load_checkpoint(tmp / "ddp" / "last.pt")
    paths = sorted((tmp / "d" / "val").glob("*/*.png"))
    logits, ok, _ = bundle_from_checkpoint(ckpt, "cpu").logits_for_files(paths)
    y = torch.tensor([ckpt["class_names"].index(paths[i].parent.name) for i in ok])
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), y).item()
    assert len(ok) == n_val
    assert loss == pytest.approx(float(_history(tmp / "ddp")[-1]["val_loss"]), abs=1e-4)


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = _history(runs["tmp"] / "single"), _history(runs["tmp"] / "ddp")
    for a, b in zip(one, two):
        # same weights after every step: training losses agree to float precision
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-4, abs=1e-5)
        assert float(b["train_acc"]) == pytest.approx(float(a["train_acc"]), abs=1e-6)
        # BatchNorm running statistics are accumulated differently (see the module docstring)
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=0.05)
