"""Wrong files and unwritable outputs at the command line: one clear error, before any work, nothing half-written."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from cxrlab.cli import main
from cxrlab.errors import CxrlabError


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Run `cxrlab ARGV` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def fingerprint(folder) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A small valid ONNX graph without cxrlab metadata (content detection does not need it)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """tiny_run's best.pt exported to ONNX (no parity check: other tests cover it)."""
    pytest.importorskip("onnxruntime")
    from cxrlab.export import export_onnx

    return export_onnx(tiny_run / "best.pt", tmp_path_factory.mktemp("exp") / "m.onnx", check=False).path


@pytest.fixture
def no_work(monkeypatch):
    """Make every command's real work fail loudly: an up-front check must stop the command first."""
    import cxrlab.adapt
    import cxrlab.audit
    import cxrlab.data.synth
    import cxrlab.ensemble
    import cxrlab.evaluate
    import cxrlab.explain
    import cxrlab.export
    import cxrlab.finalize
    import cxrlab.predict
    import cxrlab.stress

    watch = {"paths": [], "seen": []}  # folders a test wants to see as the work starts, and what was seen

    def started(*a, **k):
        watch["seen"].append([p.is_dir() for p in watch["paths"]])
        raise AssertionError("the work started before the output path was checked")

    for mod, name in [(cxrlab.adapt, "adapt_checkpoint"), (cxrlab.audit, "audit"), (cxrlab.data.synth, "generate"),
                      (cxrlab.ensemble, "build_ensemble"), (cxrlab.evaluate, "evaluate_checkpoint"),
                      (cxrlab.explain, "explain_paths"), (cxrlab.export, "export_onnx"),
                      (cxrlab.finalize, "calibrate_on_split"), (cxrlab.predict, "predict_paths"),
                      (cxrlab.stress, "stress_checkpoint")]:
        monkeypatch.setattr(mod, name, started)
    return watch


# 1. a file that is not a checkpoint


@pytest.mark.parametrize("command", ["export", "calibrate", "ensemble", "adapt"])
def test_text_file_is_not_a_pytorch_checkpoint(command, tmp_path, synth_dir, capsys, no_work):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, not a model\n")
    argv = {"export": ["export", "--checkpoint", bad, "--out", tmp_path / "m.onnx"],
            "calibrate": ["calibrate", "--checkpoint", bad, "--data", synth_dir, "--out", tmp_path / "c.pt"],
            "ensemble": ["ensemble", bad, bad, "--out", tmp_path / "e.pt"],
            "adapt": ["adapt", synth_dir / "test", "--checkpoint", bad, "--out", tmp_path / "a.pt"]}[command]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and f"'{bad}' is not a PyTorch checkpoint (a text file)" in err
    assert "arbitrary Python code" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pt"]  # nothing written


@pytest.mark.parametrize("command", ["export", "calibrate", "ensemble", "adapt", "explain"])
def test_onnx_model_as_checkpoint_names_the_command(command, onnx_model, tmp_path, synth_dir, capsys, no_work):
    disguised = tmp_path / "weights.pt"  # detected by content, not by the suffix
    shutil.copy(onnx_model, disguised)
    for ckpt in (onnx_model, disguised):
        argv = {"export": ["export", "--checkpoint", ckpt, "--out", tmp_path / "m.onnx"],
                "calibrate": ["calibrate", "--checkpoint", ckpt, "--data", synth_dir, "--out", tmp_path / "c.pt"],
                "ensemble": ["ensemble", ckpt, "--out", tmp_path / "e.pt"],
                "adapt": ["adapt", synth_dir / "test", "--checkpoint", ckpt, "--out", tmp_path / "a.pt"],
                "explain": ["explain", synth_dir / "test", "--checkpoint", ckpt, "--out", tmp_path / "x"]}[command]
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and f"'{ckpt}' is an ONNX model; cxrlab {command}" in err
        assert "needs the .pt checkpoint it was exported from" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_library_load_checkpoint_messages(onnx_model, tmp_path):
    from cxrlab.checkpoint import load_checkpoint

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CxrlabError, match="not a PyTorch checkpoint \\(an empty file\\)"):
        load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(CxrlabError, match="is an ONNX model; this command needs the .pt checkpoint"):
        load_checkpoint(onnx_model)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pt")  # a real pickled object keeps its own message
    with pytest.raises(CxrlabError, match="needs arbitrary Python code to load"):
        load_checkpoint(tmp_path / "evil.pt")


# 2. a PyTorch checkpoint named .onnx (and the reverse)


def test_checkpoint_renamed_onnx_in_predict(tiny_run, synth_dir, tmp_path, capsys):
    fake = tmp_path / "best.onnx"
    shutil.copy(tiny_run / "best.pt", fake)
    rc, err = run_cli(capsys, "predict", "--checkpoint", fake, synth_dir / "test", "--output", tmp_path / "p.csv")
    assert rc == 2 and f"'{fake}' is not an ONNX model (it looks like a PyTorch checkpoint: rename it to .pt" in err
    assert "DecodeError" not in err and not (tmp_path / "p.csv").exists()


def test_onnx_named_pt_and_garbage_onnx(onnx_model, tmp_path):
    from cxrlab.inference import load_model_bundle

    shutil.copy(onnx_model, tmp_path / "m.pt")
    with pytest.raises(CxrlabError, match="is an ONNX model named like a PyTorch checkpoint: rename it to .onnx"):
        load_model_bundle(tmp_path / "m.pt")
    (tmp_path / "junk.onnx").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CxrlabError, match="junk.onnx' is not an ONNX model"):
        load_model_bundle(tmp_path / "junk.onnx")


# 3. unwritable output paths: refused up front, with the path and the fix


def _commands(ckpt, data, out_dir, out_file):
    return {"calibrate": ["calibrate", "--checkpoint", ckpt, "--data", data, "--out", out_file("c.pt")],
            "ensemble": ["ensemble", ckpt, ckpt, "--out", out_file("e.pt")],
            "adapt": ["adapt", data / "test", "--checkpoint", ckpt, "--out", out_file("a.pt")],
            "export": ["export", "--checkpoint", ckpt, "--out", out_file("m.onnx")],
            "audit": ["audit", "--data", data, "--out", out_file("a.json")],
            "evaluate": ["evaluate", "--checkpoint", ckpt, "--data", data, "--out", out_dir("e")],
            "explain": ["explain", data / "test", "--checkpoint", ckpt, "--out", out_dir("x")],
            "stress": ["stress", "--checkpoint", ckpt, "--data", data, "--out", out_dir("s")],
            "predict": ["predict", data / "test", "--checkpoint", ckpt, "--output", out_file("p.csv")],
            "synth": ["synth", "--out", out_dir("d")]}


@pytest.mark.parametrize("command", ["calibrate", "ensemble", "adapt", "export", "audit", "evaluate", "explain",
                                     "stress", "predict", "synth"])
def test_output_under_a_file_is_refused_before_work(command, tiny_run, synth_dir, tmp_path, capsys, no_work):
    blocker = tmp_path / "notafile.txt"
    blocker.write_text("keep me")
    argv = _commands(tiny_run / "best.pt", synth_dir, lambda n: blocker / n, lambda n: blocker / n)[command]
    rc, err = run_cli(capsys, *argv)
    option = "--output" if command == "predict" else "--out"
    assert rc == 2 and f"cannot write {option} '{blocker}" in err and "is a file, not a folder" in err
    assert f"Choose another {option}" in err and "Traceback" not in err
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notafile.txt"]


@pytest.mark.parametrize("command", ["calibrate", "ensemble", "adapt", "export", "audit", "evaluate", "explain",
                                     "stress", "predict", "synth"])
def test_missing_parent_folders_are_created(command, tiny_run, synth_dir, tmp_path, capsys, no_work):
    argv = _commands(tiny_run / "best.pt", synth_dir, lambda n: tmp_path / "new" / "deep" / n,
                     lambda n: tmp_path / "new" / "deep" / n)[command]
    folder = tmp_path / "new" / "deep"
    no_work["paths"] = [folder]
    rc, err = run_cli(capsys, *argv)
    assert rc == 1 and "the work started" in err  # the check passed and the (stubbed) work began
    assert no_work["seen"] == [[True]]  # the folder was there when the work started
    assert not (tmp_path / "new").exists()  # the failed command removed what it created: no probe, no empty folder


def test_unwritable_folder_names_the_path(tmp_path):
    from cxrlab.outputs import check_output_dir, check_output_file

    with pytest.raises(CxrlabError, match=r"cannot write --output '/proc/x.csv': the folder '/proc' is not writable"):
        check_output_file("/proc/x.csv", "--output")
    with pytest.raises(CxrlabError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--output")
    with pytest.raises(CxrlabError, match="--output must end in .csv or .json"):
        check_output_file(tmp_path / "p.txt", "--output", suffixes=(".csv", ".json"))
    assert check_output_dir(tmp_path / "a" / "b").is_dir()


def test_save_checkpoint_cleanup_does_not_hide_the_error(tmp_path, monkeypatch):
    from cxrlab.checkpoint import save_checkpoint

    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CxrlabError, match=r"cannot write checkpoint .*f.txt/c.pt: Not a directory"):
        save_checkpoint({"model": {}, "class_names": ["a"], "state_dict": {}}, tmp_path / "f.txt" / "c.pt")

    import pathlib

    def unlink_fails(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    def replace_fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "unlink", unlink_fails)
    monkeypatch.setattr("cxrlab.checkpoint.os.replace", replace_fails)
    with pytest.raises(CxrlabError, match="No space left on device"):
        save_checkpoint({"model": {}, "class_names": ["a"], "state_dict": {}}, tmp_path / "c.pt")


# 4. evaluate into the training run folder


def test_evaluate_refuses_the_run_folder(tiny_run, synth_dir, capsys, no_work):
    before = fingerprint(tiny_run)
    rc, err = run_cli(capsys, "evaluate", "--checkpoint", tiny_run / "best.pt", "--data", synth_dir, "--out", tiny_run)
    assert rc == 2 and f"--out '{tiny_run}' is a training run folder (it holds best.pt, last.pt, history.csv)" in err
    assert "Choose another --out" in err and f"{tiny_run / 'eval_d'}" in err
    assert fingerprint(tiny_run) == before


def test_evaluate_may_overwrite_an_evaluation_folder(tiny_run, synth_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    for _ in range(2):
        rc, _ = run_cli(capsys, "evaluate", "--checkpoint", tiny_run / "best.pt", "--data", synth_dir, "--out", out,
                        "--no-report", "--bootstrap", 5, "--device", "cpu", "--quiet")
        assert rc == 0 and (out / "metrics.json").is_file()


# 5. --batch-size and --device, and options an ONNX model cannot honour


@pytest.mark.parametrize("command", ["predict", "stress", "adapt"])
@pytest.mark.parametrize("batch", [0, -1])
def test_batch_size_below_one(command, batch, tiny_run, synth_dir, tmp_path, capsys, no_work):
    argv = _commands(tiny_run / "best.pt", synth_dir, lambda n: tmp_path / n, lambda n: tmp_path / n)[command]
    rc, err = run_cli(capsys, *argv, "--batch-size", batch)
    assert rc == 2 and f"--batch-size must be >= 1, got {batch}" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["predict", "evaluate", "explain", "stress", "calibrate", "adapt"])
def test_bad_device_is_named(command, tiny_run, synth_dir, tmp_path, capsys, monkeypatch, no_work):
    argv = _commands(tiny_run / "best.pt", synth_dir, lambda n: tmp_path / n, lambda n: tmp_path / n)[command]
    rc, err = run_cli(capsys, *argv, "--device", "gpu0")
    assert rc == 2 and "--device 'gpu0' is not a device; use auto, cpu, cuda, cuda:N or mps" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = run_cli(capsys, *argv, "--device", "cuda")
    assert rc == 2 and "--device cuda: no CUDA GPU is available here" in err and "use --device cpu or auto" in err
    assert not any(tmp_path.iterdir())


def test_engine_torch_with_onnx_file(exported, synth_dir, tmp_path, capsys):
    rc, err = run_cli(capsys, "predict", synth_dir / "test", "--checkpoint", exported, "--engine", "torch",
                      "--output", tmp_path / "p.csv")
    assert rc == 2 and "--engine torch needs the .pt checkpoint" in err and f"'{exported}'" in err
    assert not (tmp_path / "p.csv").exists()


def test_device_cuda_with_onnx_file_says_what_runs(exported, synth_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc, err = run_cli(capsys, "predict", synth_dir / "test" / "NORMAL", "--checkpoint", exported, "--device", "cuda",
                      "--output", out)
    assert rc == 0 and out.is_file()
    assert "--device cuda is ignored for the ONNX model" in err and "runs with onnxruntime on the CPU" in err


def test_a_failed_command_leaves_no_empty_output_folders(tiny_run, synth_dir, tmp_path, capsys):
    """Output folders are created up front (to check they can be written); a command that then fails removes
    those it created and left empty, and never a folder that was there before or holds a file."""
    out = tmp_path / "a" / "b" / "stress"
    rc, err = run_cli(capsys, "stress", "--checkpoint", tiny_run / "best.pt", "--data", synth_dir, "--only", "foo",
                      "--out", out)
    assert rc == 2 and "foo" in err
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    rc, _ = run_cli(capsys, "stress", "--checkpoint", tiny_run / "best.pt", "--data", synth_dir, "--only", "foo",
                    "--out", kept)
    assert rc == 2 and kept.is_dir()
