"""The CLI end to end on a tiny synthetic set: synth -> train -> evaluate -> predict, plus resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, CXRLAB_NO_REEXEC="1")


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "cxrlab", *map(str, args)], capture_output=True, text=True, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"cxrlab {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cli("synth", "--out", root / "d", "--per-class", 20, "--size", 48, "--seed", 0)
    cli("train", "--data", root / "d", "--model", "custom_cnn", "--epochs", 2, "--img-size", 48, "--batch-size", 16,
        "--out", root / "run", "--no-report", "--no-cache", "--quiet")
    return root


def test_train_writes_the_run_folder(cli_run):
    run = cli_run / "run"
    for f in ("config.yaml", "history.csv", "train.log", "best.pt", "last.pt", "metrics.json",
              "classification_report.txt", "predictions.csv", "data_summary.json"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds", "img_size"}
    import yaml

    cfg = yaml.safe_load(open(run / "config.yaml"))
    assert cfg["model"] == "custom_cnn" and cfg["epochs"] == 2 and cfg["lr"] == 1e-3


def test_evaluate_metrics_are_consistent(cli_run):
    out = cli_run / "ev"
    r = cli("evaluate", "--checkpoint", cli_run / "run" / "best.pt", "--data", cli_run / "d", "--split", "test",
            "--out", out, "--no-report", "--bootstrap", 200)
    assert "accuracy" in r.stdout
    m = json.load(open(out / "metrics.json"))
    n_test = len(list((cli_run / "d" / "test").rglob("*.png")))
    cm = m["confusion_matrix"]
    assert m["n"] == n_test == sum(map(sum, cm))
    assert m["class_names"] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert m["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / n_test)
    for i, c in enumerate(m["class_names"]):
        pc = m["per_class"][c]
        assert pc["support"] == sum(cm[i])
        assert pc["recall"] == pytest.approx(cm[i][i] / sum(cm[i]))
        assert {"precision", "recall", "f1", "support", "auc", "accuracy"} <= set(pc)
    for k in ("accuracy", "macro_f1", "weighted_f1", "auc_macro"):
        assert 0 <= m[k] <= 1
    report = (out / "classification_report.txt").read_text()
    assert "precision" in report and "TUBERCULOSIS" in report


def test_predict_csv_and_json(cli_run):
    imgs = sorted((cli_run / "d" / "test").rglob("*.png"))[:5]
    cli("predict", "--checkpoint", cli_run / "run" / "best.pt", *imgs, "--output", cli_run / "p.csv")
    rows = list(csv.DictReader(open(cli_run / "p.csv")))
    assert len(rows) == 5
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in ("NORMAL", "PNEUMONIA", "TUBERCULOSIS")]
        assert sum(probs) == pytest.approx(1, abs=1e-4)
        assert r["predicted"] in ("NORMAL", "PNEUMONIA", "TUBERCULOSIS")
    cli("predict", "--checkpoint", cli_run / "run" / "best.pt", cli_run / "d" / "test", "--output", cli_run / "p.json")
    data = json.load(open(cli_run / "p.json"))
    assert len(data) == len(list((cli_run / "d" / "test").rglob("*.png")))  # folders are searched recursively


def test_user_errors_are_clean(cli_run, tmp_path):
    r = cli("train", "--data", tmp_path / "missing", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--data", cli_run / "d", "--model", "nonet", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "Valid models" in r.stderr and "Traceback" not in r.stderr
    r = cli("evaluate", "--checkpoint", cli_run / "run" / "history.csv", "--data", cli_run / "d", "--out", tmp_path / "e", check=False)
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr
    r = cli("train", "--data", cli_run / "d", "--out", tmp_path / "o", "--epochs", 0, check=False)
    assert r.returncode == 2 and "--epochs must be >= 1" in r.stderr
    r = cli("train", "--data", cli_run / "d", "--out", tmp_path / "o2", "--resume", check=False)
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_config_file_unknown_key(cli_run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    r = cli("train", "--data", cli_run / "d", "--out", tmp_path / "o", "--config", cfg, check=False)
    assert r.returncode == 2 and "unknown config keys: learning_rate" in r.stderr


def test_help_lists_commands():
    out = cli("--help").stdout
    for c in ("train", "evaluate", "predict", "synth", "demo", "explain", "report", "audit", "export", "serve"):
        assert c in out


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_equals_uninterrupted(synth_dir, tmp_path, ema):
    """Train 3 epochs in one go vs 1 epoch then --resume to 3: identical history losses and weights
    (with --ema: the averaged weights, the raw ones and the update count all carry over)."""
    import torch

    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    base = dict(data=str(synth_dir), model="custom_cnn", img_size=48, batch_size=16, report=False, cache=False,
                workers=0, seed=5, ema=ema)
    fit(TrainConfig(out=str(tmp_path / "full"), epochs=3, **base), progress=False)
    fit(TrainConfig(out=str(tmp_path / "part"), epochs=1, **base), progress=False)
    fit(TrainConfig(out=str(tmp_path / "part"), epochs=3, **base), resume=True, progress=False)
    a = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    b = list(csv.DictReader(open(tmp_path / "part" / "history.csv")))
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-5, abs=1e-6), (ra["epoch"], k)
    ca, cb = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "part" / "last.pt")
    pairs = [(ca["state_dict"], cb["state_dict"])]
    if ema:
        assert ca["train_state"]["ema_n"] == cb["train_state"]["ema_n"] > 0
        pairs.append((ca["train_state"]["model"], cb["train_state"]["model"]))
        assert any(not torch.equal(ca["state_dict"][k], ca["train_state"]["model"][k]) for k in ca["state_dict"])
    for wa, wb in pairs:
        for k in wa:
            assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k


def test_resume_needs_only_the_run_folder(synth_dir, tmp_path, capsys):
    """`cxrlab train --resume --out RUN` takes every setting from RUN/config.yaml; options given with it override them,
    and the checks against last.pt still refuse a changed architecture."""
    import yaml

    from cxrlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), "--model", "custom_cnn", "--img-size", "48", "--batch-size", "16",
                 "--lr", "0.003", "--epochs", "1", "--seed", "5", "--out", str(run), "--no-report", "--no-cache",
                 "--workers", "0", "--quiet"]) == 0
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--quiet"]) == 0
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    saved = yaml.safe_load(open(run / "config.yaml"))
    assert (saved["model"], saved["lr"], saved["epochs"], saved["img_size"], saved["seed"], saved["report"]) == \
        ("custom_cnn", 0.003, 2, 48, 5, False)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--epochs", "3", "--model", "small_cnn", "--quiet"]) == 2
    assert "--resume: model was 'custom_cnn'" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "has no config.yaml (nothing to resume there)" in capsys.readouterr().err


def test_time_budget_cuts_an_epoch_that_would_overrun(synth_dir, tmp_path):
    """A budget shorter than one epoch ends that epoch early, then validates, saves and evaluates."""
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    out = tmp_path / "budget"
    res = fit(TrainConfig(data=str(synth_dir), out=str(out), model="custom_cnn", img_size=48, batch_size=8, epochs=5,
                          report=False, cache=False, workers=0, time_budget_min=1e-6), progress=False)
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert len(rows) == 1 and res["best_epoch"] == 1
    log = (out / "train.log").read_text()
    assert "epoch 1 ended after 1 of" in log and "time budget" in log
    assert load_checkpoint(out / "best.pt")["epoch"] == 1
    assert (out / "metrics.json").is_file()


def test_select_last_keeps_the_final_epoch_and_best_the_monitored_one(synth_dir, tmp_path):
    """--select changes which epoch becomes best.pt, not training: same history either way; `best` keeps the
    epoch with the highest val_auc, `last` the final weights (identical to last.pt's)."""
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.train import fit
    import torch

    base = dict(data=str(synth_dir), model="custom_cnn", img_size=48, batch_size=8, epochs=4, lr=0.003, monitor="val_auc",
                report=False, cache=False, workers=0, early_stop=0)
    res = {sel: fit(TrainConfig(out=str(tmp_path / sel), select=sel, **base), progress=False) for sel in ("best", "last")}
    hist = {sel: list(csv.DictReader(open(tmp_path / sel / "history.csv"))) for sel in res}
    assert [r["val_loss"] for r in hist["best"]] == [r["val_loss"] for r in hist["last"]]
    aucs = [float(r["val_auc"]) for r in hist["best"]]
    best_epoch = 1 + aucs.index(max(aucs))
    assert best_epoch < 4, "this seed's val_auc should peak before the end (else the test proves nothing)"
    assert load_checkpoint(tmp_path / "best" / "best.pt")["epoch"] == res["best"]["best_epoch"] == best_epoch
    kept, last = load_checkpoint(tmp_path / "last" / "best.pt"), load_checkpoint(tmp_path / "last" / "last.pt")
    assert kept["epoch"] == res["last"]["best_epoch"] == 4
    assert all(torch.equal(kept["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    with pytest.raises(CxrlabError, match="--select must be best or last"):
        TrainConfig(data=str(synth_dir), select="final").validate()


def test_val_every_validates_every_nth_and_the_final_epoch_without_changing_training(synth_dir, tmp_path,
                                                                                    monkeypatch):
    """--val-every 3 over 4 epochs validates epochs 3 and 4 only: the other rows' val columns are empty, training is
    the same as with every epoch validated (same losses, same final weights, same validation numbers where both
    validated). With 0 (only the final epoch), a run that the budget ends early validates the epoch it ends on."""
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.train import Run, fit
    import torch

    base = dict(data=str(synth_dir), model="custom_cnn", img_size=48, batch_size=8, epochs=4, lr=0.003,
                report=False, cache=False, workers=0, early_stop=0, select="last", precise_bn=64)
    for n in (1, 3):
        fit(TrainConfig(out=str(tmp_path / f"every{n}"), val_every=n, **base), progress=False)
    every, third = (list(csv.DictReader(open(tmp_path / d / "history.csv"))) for d in ("every1", "every3"))
    assert [r["val_loss"] == "" for r in third] == [True, True, False, False]
    assert all(r["val_loss"] != "" for r in every)
    assert [r["train_loss"] for r in third] == [r["train_loss"] for r in every]
    assert [(r["val_loss"], r["val_auc"]) for r in third[2:]] == [(r["val_loss"], r["val_auc"]) for r in every[2:]]
    a, b = (load_checkpoint(tmp_path / d / "best.pt") for d in ("every1", "every3"))
    assert a["epoch"] == b["epoch"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert "not validated (--val-every 3)" in (tmp_path / "every3" / "train.log").read_text()

    monkeypatch.setattr(Run, "_budget_after_epoch", lambda self, epoch, *args, **kw: epoch == 2)
    res = fit(TrainConfig(out=str(tmp_path / "final"), val_every=0, time_budget_min=1000, **base), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "final" / "history.csv")))
    assert [r["val_loss"] == "" for r in rows] == [True, False] and res["best_epoch"] == 2
    assert load_checkpoint(tmp_path / "final" / "best.pt")["epoch"] == 2
    with pytest.raises(CxrlabError, match="--val-every must be >= 0"):
        TrainConfig(data=str(synth_dir), val_every=-1).validate()


def test_bf16_on_a_cpu_without_it_trains_in_fp32_and_says_so(synth_dir, tmp_path, monkeypatch):
    from cxrlab import engine
    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "bf16"
    fit(TrainConfig(data=str(synth_dir), out=str(out), model="custom_cnn", img_size=32, batch_size=8, epochs=1,
                    amp="bf16", report=False, cache=False, workers=0), progress=False)
    log = (out / "train.log").read_text()
    assert "--amp bf16: this CPU has no native bf16" in log and "device cpu, fp32," in log
