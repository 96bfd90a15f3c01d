"""`cxrlab train` refuses what would lose work or waste a run: an earlier run in --out, options found wrong only
after training, config values of the wrong type; and a failed run says why in its train.log."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrlab.cli import main
from cxrlab.outputs import RUN_FILES

TINY = ["--model", "custom_cnn", "--img-size", "48", "--batch-size", "16", "--epochs", "1", "--no-cache",
        "--workers", "0", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def first_run(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("guard") / "run"
    assert main(["train", "--data", str(synth_dir), *TINY, "--out", str(out)]) == 0
    return out


def test_an_earlier_run_is_refused_and_left_as_it_was(synth_dir, first_run, capsys):
    before = {p.name: p.read_bytes() for p in first_run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--data", str(synth_dir), *TINY, "--seed", "7", "--out", str(first_run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (best.pt, last.pt, history.csv)" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in first_run.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_run_and_keeps_other_files(synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), *TINY, "--out", str(out)]) == 0
    (out / "report.html").write_text("stale report of the earlier run")  # what --no-report would not redraw
    (out / "cam").mkdir()
    (out / "cam" / "epoch1_x.png").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's own file")
    assert main(["train", "--data", str(synth_dir), *TINY, "--seed", "7", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "report.html").exists() and not (out / "cam").exists()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "train.log").read_text().count("model custom_cnn") == 1  # one run's log, not two appended
    assert "seed: 7" in (out / "config.yaml").read_text()
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()


def test_resume_still_continues_an_earlier_run(synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), *TINY, "--out", str(out)]) == 0
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert (out / "history.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_unknown_target_recall_class_is_refused_before_training(synth_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), *TINY, "--target-recall", "COVID=0.9", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--target-recall: unknown class 'COVID'; classes are NORMAL, PNEUMONIA, TUBERCULOSIS" in err
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()  # no epoch was trained
    assert "run failed: CxrlabError: --target-recall: unknown class 'COVID'" in (out / "train.log").read_text()


def test_target_recall_class_matches_case_insensitively(synth_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(synth_dir), *TINY, "--target-recall", "tuberculosis=0.9", "--out", str(out)]) == 0
    import torch

    assert list(torch.load(out / "best.pt", weights_only=False)["thresholds"]) == ["TUBERCULOSIS"]


@pytest.mark.parametrize("line, words", [
    ("epochs: abc", "config key 'epochs' must be an integer, got 'abc'"),
    ("img_size: '32'", "config key 'img_size' must be an integer or null, got '32'"),
    ("target_recall: B", "config key 'target_recall' must be a mapping (key: value), got 'B'"),
    ("equalize: 1", "config key 'equalize' must be true or false, got 1"),
])
def test_config_values_of_the_wrong_type_name_the_key_and_file(synth_dir, tmp_path, capsys, line, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(line + "\n")
    assert main(["train", "--data", str(synth_dir), "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and str(cfg) in err


def test_config_numbers_yaml_reads_as_strings_are_numbers():
    """PyYAML reads 1e-3 (no dot) as a string; a float field takes it as the number, an int field a float too."""
    import yaml

    from cxrlab.config import TrainConfig

    d = yaml.safe_load("lr: 1e-3\nlabel_smoothing: 0\n")
    assert d["lr"] == "1e-3"
    cfg = TrainConfig.from_dict(d)
    assert cfg.lr == 0.001 and isinstance(cfg.label_smoothing, float)


@pytest.mark.parametrize("opts, words", [
    (["--val-fraction", "0"], "--val-fraction is the share of train/ carved out"),
    (["--group-regex", "("], "--group-regex '(' is not a regular expression (missing ), unterminated subpattern"),
    (["--members", "0"], "--members 0: an ensemble needs at least 2 members"),
])
def test_bad_options_are_named(synth_dir, tmp_path, capsys, opts, words):
    assert main(["train", "--data", str(synth_dir), *TINY, *opts, "--out", str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err


def test_members_without_report_write_no_report(synth_dir, tmp_path):
    out = tmp_path / "ens"
    assert main(["train", "--data", str(synth_dir), *TINY, "--members", "2", "--out", str(out)]) == 0
    assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()
    assert not (out / "report.html").exists() and not list(out.glob("*.png"))


def test_compare_refuses_earlier_runs_before_any_model_trains(synth_dir, first_run, tmp_path, capsys, monkeypatch):
    """`cxrlab compare` trains into OUT/<model>: an earlier run there is refused before the first model trains (the
    second model's folder is checked too), and --overwrite replaces it."""
    import shutil

    import cxrlab.train

    trained = []

    def fit(cfg, **_):
        trained.append((cfg.model, sorted(p.name for p in Path(cfg.out).glob("*"))))
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(cxrlab.train, "fit", fit)
    out = tmp_path / "cmp"
    shutil.copytree(first_run, out / "resnet18")
    args = ["compare", "--data", str(synth_dir), "--models", "custom_cnn,resnet18", "--epochs", "1", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"'{out / 'resnet18'}' already holds a training run" in err and "--overwrite" in err
    assert trained == [] and (out / "resnet18" / "best.pt").is_file()
    assert main([*args, "--overwrite"]) == 1  # both models "failed" in the fake fit: exit 1, leaderboard written
    assert [m for m, _ in trained] == ["custom_cnn", "resnet18"]
    assert not any(name in RUN_FILES for name in trained[1][1])  # the earlier run was gone before resnet18 trained
    assert (out / "leaderboard.csv").is_file()


def test_demo_rerun_replaces_its_own_run(tmp_path, monkeypatch):
    """`cxrlab demo` reruns into its own folder: the earlier run's log and report go, not appended to."""
    import cxrlab.demo
    import cxrlab.train

    seen = []

    def fit(cfg, **_):
        seen.append(sorted(p.name for p in Path(cfg.out).glob("*")))
        raise RuntimeError("stop after the check")

    monkeypatch.setattr(cxrlab.train, "fit", fit)
    run = tmp_path / "demo" / "run"
    run.mkdir(parents=True)
    for name in ("best.pt", "train.log", "report.html"):
        (run / name).write_text("earlier demo")
    with pytest.raises(RuntimeError, match="stop after the check"):
        cxrlab.demo.run_demo(tmp_path / "demo", per_class=3, size=32, epochs=1, progress=False)
    assert seen == [[]]
