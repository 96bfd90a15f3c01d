"""Data-parallel scaling on this machine: `cxrlab train` with 1 process vs N processes (torchrun).

Every configuration trains the same model on the same synthetic set with the same GLOBAL batch
(`--batch-size` is global: each of N processes runs batch/N), each in fresh processes started the
way a user starts them: `python -m cxrlab train ...` and `torchrun --standalone --nproc_per_node=N
-m cxrlab train ...`. Throughput is training images per second from `history.csv` (the `seconds`
column covers training plus validation of one epoch), over the epochs after the first (warm-up).
Threads: OMP_NUM_THREADS = cores // N (every configuration uses the whole CPU), or --threads.

    python bench/ddp_scaling.py --model custom_cnn --img-size 64 --epochs 4 --procs 1 2
    python bench/ddp_scaling.py --device cuda --procs 1 2 4 8   # on a GPU machine (NCCL)

Prints a markdown table and writes --json when given.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="custom_cnn")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=120, help="synthetic images per class (70%% go to train)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="OMP threads per process (0: cores // processes)")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best is reported)")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", type=Path, help="keep data and run folders here instead of a temporary folder")
    return p.parse_args(argv)


def command(args, nproc: int, data: Path, out: Path) -> list[str]:
    """The training command line for `nproc` processes."""
    train = ["train", "--data", str(data), "--out", str(out), "--model", args.model, "--img-size", str(args.img_size),
             "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--device", args.device,
             "--no-report", "--cache-dir", str(data.parent / "cache"), "--quiet"]
    if nproc == 1:
        return [sys.executable, "-m", "cxrlab", *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "cxrlab", *train]


def run_one(args, nproc: int, data: Path, out: Path) -> dict:
    """Train once; returns wall-clock seconds, per-epoch seconds and images/s after warm-up."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(command(args, nproc, data, out), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} process(es) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(out / "history.csv") as fh:
        secs = [float(r["seconds"]) for r in csv.DictReader(fh)]
    n_train = json.loads((out / "data_summary.json").read_text())["train"]
    n_train = sum(n_train.values())
    steady = secs[1:] or secs
    return {"nproc": nproc, "threads": threads, "wall_s": round(wall, 1), "epoch_s": [round(s, 2) for s in secs],
            "images_per_s": round(n_train * len(steady) / sum(steady), 1), "n_train": n_train}


def machine() -> dict:
    """CPU model, cores, load average at the start, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = _load()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "loadavg_at_start": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _load() -> list | None:
    return [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def table(results: list[dict]) -> str:
    """Markdown table; speed-up relative to 1 process."""
    base = next((r["images_per_s"] for r in results if r["nproc"] == 1), None)
    lines = ["| processes x threads | train images/s | speed-up | seconds per epoch | wall s (incl. start-up) |",
             "|---:|---:|---:|---|---:|"]
    for r in results:
        speed = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['nproc']} x {r['threads']} | {r['images_per_s']} | {speed} | {', '.join(map(str, r['epoch_s']))} | {r['wall_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxrlab.data.synth import generate

    with tempfile.TemporaryDirectory(prefix="cxrlab-ddp-bench-") as tmp:
        root = args.keep or Path(tmp)
        data = root / "data"
        if not data.exists():
            generate(data, per_class=args.per_class, size=max(args.img_size, 64), seed=0)
        info = machine()
        results = []
        for nproc in args.procs:
            runs = [run_one(args, nproc, data, root / f"run-{nproc}-{i}") for i in range(args.repeats)]
            results.append(max(runs, key=lambda r: r["images_per_s"]))
            print(f"{nproc} process(es): {results[-1]['images_per_s']} images/s", file=sys.stderr)
        info["loadavg_at_end"] = _load()
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "keep")}
    print(f"{args.model} at {args.img_size} px, global batch {args.batch_size}, {args.epochs} epochs, "
          f"device {args.device}; {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"load average {info['loadavg_at_start']} -> {info['loadavg_at_end']}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
