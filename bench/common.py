"""Helpers shared by the benchmark scripts: machine description, test images, child processes.

Benchmarks run each measured configuration in its own Python process so that process-wide
settings (glibc malloc thresholds, thread counts, warmed-up allocator state) cannot leak from
one configuration into the other.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
ALLOC_VARS = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def reexec_with_alloc_vars() -> None:
    """Re-run this script under glibc's raised malloc thresholds (`ALLOC_VARS`), as the cxrlab CLI runs."""
    if all(k in os.environ for k in ALLOC_VARS) or not sys.platform.startswith("linux"):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **ALLOC_VARS))


def machine_info() -> dict:
    """CPU model, core count, CPU flags of interest, torch version and threads, date."""
    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, val = line.partition(":")
        if key.strip() == "Model name":
            info["cpu"] = val.strip()
        elif key.strip() == "Flags":
            flags = set(val.split())
            info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"})
    info["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return info


def image_files(folder: str | Path) -> list[Path]:
    """All image files under `folder` (sorted, so every process sees the same order)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def pick_evenly(files: list[Path], n: int) -> list[Path]:
    """`n` files spread evenly over the sorted list (keeps every class folder represented)."""
    if n <= 0 or n >= len(files):
        return list(files)
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def make_phantom_folder(out: str | Path, n: int, size: int = 224, seed: int = 0) -> list[Path]:
    """Write `n` synthetic radiograph phantoms as JPEGs in ImageFolder layout (NORMAL / PNEUMONIA).

    Args:
        out: folder to write into.
        n: number of images.
        size: image side in pixels.
        seed: random seed.

    Returns:
        the written files, sorted.
    """
    import numpy as np
    from PIL import Image

    from cxrlab.data.synth import render_phantom

    rng = np.random.default_rng(seed)
    labels = ("NORMAL", "PNEUMONIA")
    for i in range(n):
        label = labels[i % 2]
        img, _ = render_phantom(rng, size, label)
        path = Path(out) / label / f"phantom_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)
    return image_files(out)


def run_child(argv: list[str], env: dict, timeout: float = 1200) -> dict:
    """Run `python argv...` with `env`; its last stdout line must be a JSON object, returned here."""
    return run_children([argv], env, timeout)[0]


def run_children(argvs: list[list[str]], env: dict, timeout: float = 1200) -> list[dict]:
    """`run_child` for several children at once (all started, then waited for): their JSON objects, in order."""
    procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in argvs]
    results = []
    try:
        for argv, proc in zip(argvs, procs):
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"child {' '.join(argv[:4])} failed (exit {proc.returncode}):\n{err[-3000:]}")
            results.append(json.loads([ln for ln in out.splitlines() if ln.strip()][-1]))
    finally:
        for proc in procs:  # a timeout, a failed sibling or Ctrl-C: no child is left running (as subprocess.run does)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def env_with(alloc: bool) -> dict:
    """This process's environment with the malloc thresholds set (`alloc`) or removed."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_VARS}
    if alloc:
        env.update(ALLOC_VARS)
    env["CXRLAB_NO_REEXEC"] = "1"
    return env


def geomean(values: list[float]) -> float:
    """Geometric mean of positive numbers."""
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")
