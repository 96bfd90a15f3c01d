"""Training and inference images/s: a naive reference pipeline versus cxrlab's, in one run.

(a) naive: what reference projects do. A torchvision `ImageFolder` decodes every JPEG with PIL
    and applies per-sample torchvision transforms every epoch (Resize, RandomHorizontalFlip,
    RandomRotation(15), RandomAffine(translate 0.1), ColorJitter(0.2, 0.2),
    RandomResizedCrop(scale 0.8-1.0), ToTensor, Normalize), fp32, DataLoader with 2 workers,
    batch 32; default glibc malloc (the child process has no MALLOC_* variables).
(b) cxrlab: images decoded once into uint8 arrays (`cxrlab.data.cache.load_arrays`; the one-time
    decode is timed separately and the epochs are measured with the cache warm), then
    `cxrlab.engine.train_one_epoch` (one batched `grid_sample` augmentation per batch),
    channels_last, glibc malloc thresholds raised as the CLI does, fp32 and bf16 autocast (with
    depthwise convolutions kept in fp32, as `cxrlab train` does on CPU: `keep_depthwise_fp32`).

Both train the same architecture from the same initial weights on the same files: Adam, cross
entropy, batch 32 (forward + backward + optimiser step). Inference is an eval forward under
no_grad at batch 64: (a) DataLoader + PIL + Resize/ToTensor/Normalize per image, (b) the warm
cache read plus `predict_logits` (uint8 arrays -> `to_model_input` per batch).

With `--device cuda` both pipelines train and infer on the GPU (the naive one with pinned DataLoader
batches, cxrlab with its augmentation on the GPU; "bf16" is then CUDA bf16 autocast).

Each configuration runs in its own child process. Usage:

    python bench/throughput.py --json throughput.json
    python bench/throughput.py --data ../shared/data/pneumonia/train --images 512
    python bench/throughput.py --device cuda --images 2048 --json throughput_gpu.json
    python bench/throughput.py --models efficientnet_lite0 --precisions fp32 --side-by-side 2 --images 128

`--side-by-side P` also times P cxrlab children training at once, the CPU threads split between them (what
`bench/accuracy.py --members K --parallel P` does with ensemble members): the images/s of all of them together,
from the first child's start to the last one's end of the timed epoch (the children wait for each other first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ALLOC_VARS, env_with, geomean, image_files, machine_info, make_phantom_folder,  # noqa: E402
                    pick_evenly, run_child, run_children)

BATCH, INFER_BATCH, NAIVE_WORKERS, LR = 32, 64, 2, 1e-4
PRECISIONS = ("fp32", "bf16")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _model(name: str, in_chans: int, channels_last: bool):
    import torch

    from cxrlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=in_chans, pretrained=False)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _label(path: str) -> int:
    return 0 if Path(path).parent.name.upper().startswith("NORMAL") else 1


# ----------------------------------------------------------------------------- (a) naive pipeline
def naive_child(a: argparse.Namespace, files: list[str]) -> dict:
    """Train and infer with ImageFolder + per-sample torchvision transforms (reference style)."""
    import torch
    import torch.nn.functional as F
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from cxrlab.models import model_spec

    spec, s = model_spec(a.model), a.img_size
    norm = T.Normalize(spec.mean, spec.std)
    train_tf = T.Compose([T.Resize((s, s)), T.RandomHorizontalFlip(), T.RandomRotation(15),
                          T.RandomAffine(0, translate=(0.1, 0.1)), T.ColorJitter(0.2, 0.2),
                          T.RandomResizedCrop(s, scale=(0.8, 1.0)), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize((s, s)), T.ToTensor(), norm])
    chosen = set(files)
    ds = ImageFolder(a.root, transform=train_tf, is_valid_file=lambda p: str(Path(p)) in chosen)
    dev = torch.device(a.device)
    model = _model(a.model, 3, channels_last=False).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def epoch(limit: int | None = None) -> int:
        model.train()
        n = 0
        for i, (x, y) in enumerate(DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=NAIVE_WORKERS,
                                              pin_memory=dev.type == "cuda")):
            if limit is not None and i >= limit:
                break
            x, y = x.to(dev), y.to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        _sync(dev)
        return n

    epoch(limit=1)  # warm-up (first-call kernel selection), then one timed epoch with worker start-up
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = epoch()
    train_s, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    ds_eval = ImageFolder(a.root, transform=eval_tf, is_valid_file=lambda p: str(Path(p)) in chosen)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        m = sum(len(model(x.to(dev)).cpu()) for x, _ in DataLoader(ds_eval, batch_size=INFER_BATCH,
                                                                    num_workers=NAIVE_WORKERS))
    infer_s = time.perf_counter() - t0
    return {"train_ips": n / train_s, "train_s": train_s, "train_images": n, "train_img_per_cpu_s": n / train_cpu,
            "infer_ips": m / infer_s, "infer_s": infer_s, "infer_images": m}


# ----------------------------------------------------------------------------- (b) cxrlab pipeline
def cxrlab_child(a: argparse.Namespace, files: list[str]) -> dict:
    """Decode once through the cache, then train/infer with cxrlab's engine in fp32 and bf16."""
    import torch

    from cxrlab.data.augment import AugmentConfig
    from cxrlab.data.cache import load_arrays
    from cxrlab.data.preprocess import Preprocess
    from cxrlab.engine import ArrayData, InputSpec, StepConfig, keep_depthwise_fp32, predict_logits, train_one_epoch
    from cxrlab.models import channel_stats, model_spec

    pre = Preprocess(img_size=a.img_size)
    dev = torch.device(a.device)
    out: dict = {"channels_last": a.channels_last, "device": str(dev)}
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-cache-") as cache:
        t0 = time.perf_counter()
        arrays, ok, errors = load_arrays(files, pre, cache_dir=Path(cache), workers=min(os.cpu_count() or 1, 4))
        out["decode_cold_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        arrays, ok, errors = load_arrays(files, pre, cache_dir=Path(cache), workers=0)
        out["decode_warm_s"] = time.perf_counter() - t0
        assert not errors, errors
        spec = model_spec(a.model)
        ispec = InputSpec(channel_stats(spec.mean, spec.in_chans), channel_stats(spec.std, spec.in_chans),
                          spec.in_chans, a.channels_last)
        data = ArrayData(torch.from_numpy(arrays), torch.tensor([_label(files[i]) for i in ok]))
        warm = ArrayData(data.images[:BATCH], data.labels[:BATCH])
        for prec in a.precisions.split(","):
            amp = "bf16" if prec == "bf16" else "off"
            model = _model(a.model, spec.in_chans, a.channels_last).to(dev)
            if dev.type == "cpu":
                keep_depthwise_fp32(model)  # as cxrlab's training does on CPU (a no-op outside bf16 autocast)
            if a.freeze_stages:
                from cxrlab.training_setup import freeze_stages

                freeze_stages(model, a.freeze_stages, a.model)
            opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
            crit = torch.nn.CrossEntropyLoss()
            step = StepConfig(BATCH, 0, 0, 2, AugmentConfig(), amp=amp, progress=False)
            train_one_epoch(model, warm, opt, crit, ispec, step, dev)
            _sync(dev)
            if a.barrier:
                _wait_for_siblings(Path(a.barrier), a.barrier_n, prec)
            out[f"{prec}_train_start"] = time.time()
            t0, c0 = time.perf_counter(), cpu_seconds()
            train_one_epoch(model, data, opt, crit, ispec, StepConfig(BATCH, 0, 1, 2, AugmentConfig(), amp=amp,
                                                                      progress=False), dev)
            _sync(dev)
            train_s, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
            out[f"{prec}_train_end"] = time.time()
            predict_logits(model, data.images[:INFER_BATCH], ispec, dev, INFER_BATCH, amp=amp)
            t0 = time.perf_counter()
            arr, _, _ = load_arrays(files, pre, cache_dir=Path(cache), workers=0)  # predict from files, cache warm
            predict_logits(model, torch.from_numpy(arr), ispec, dev, INFER_BATCH, amp=amp)  # returns on the CPU
            infer_s = time.perf_counter() - t0
            out[prec] = {"train_ips": len(data) / train_s, "train_s": train_s, "train_img_per_cpu_s": len(data) / train_cpu,
                         "infer_ips": len(data) / infer_s, "infer_s": infer_s}
    out["images"] = len(files)
    return out


def _wait_for_siblings(folder: Path, n: int, tag: str, timeout: float = 600) -> None:
    """Side by side: say this child is ready for the timed `tag` epoch, then wait until all `n` are."""
    (folder / f"{tag}.{os.getpid()}").touch()
    t0 = time.perf_counter()
    while len(list(folder.glob(f"{tag}.*"))) < n:
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"side by side: the other children did not get ready within {timeout:.0f} s")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- driver
def _child_argv(kind: str, model: str, a: argparse.Namespace, list_file: str, root: str, **extra) -> list[str]:
    argv = [__file__, "--child", kind, "--model", model, "--file-list", list_file, "--root", root,
            "--img-size", str(a.img_size), "--device", a.device, "--precisions", a.precisions]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def measure_model(model: str, a: argparse.Namespace, list_file: str, root: str) -> dict:
    """Naive then cxrlab (interleaved when repeated) for one model; the best of the repeats."""
    runs: dict = {"naive": [], "cxrlab": [], "ablations": {}}
    for _ in range(a.repeats):
        runs["naive"].append(run_child(_child_argv("naive", model, a, list_file, root), env_with(alloc=False)))
        print(f"  {model} naive: train {runs['naive'][-1]['train_ips']:.1f} img/s", flush=True)
        runs["cxrlab"].append(run_child(_child_argv("cxrlab", model, a, list_file, root), env_with(alloc=True)))
        c = runs["cxrlab"][-1]
        print(f"  {model} cxrlab: train {_train_rates(c)} img/s", flush=True)
    if a.ablations:
        runs["ablations"]["cxrlab_default_malloc"] = run_child(_child_argv("cxrlab", model, a, list_file, root),
                                                               env_with(alloc=False))
        runs["ablations"]["cxrlab_no_channels_last"] = run_child(
            _child_argv("cxrlab", model, a, list_file, root, channels_last=0), env_with(alloc=True))
    for n in [int(x) for x in a.freeze_stages_list.split(",") if x.strip()]:
        runs["ablations"][f"cxrlab_freeze_stages_{n}"] = r = run_child(
            _child_argv("cxrlab", model, a, list_file, root, child_freeze_stages=n), env_with(alloc=True))
        print(f"  {model} cxrlab --freeze-stages {n}: train {_train_rates(r)} img/s", flush=True)
    for n in [int(x) for x in a.side_by_side.split(",") if x.strip()]:
        runs["ablations"][f"cxrlab_side_by_side_{n}"] = side_by_side(model, a, list_file, root, n)
    return summarise(runs)


def _train_rates(r: dict) -> str:
    """"fp32 10.6, bf16 3.6": the training images/s of each precision a child measured."""
    return ", ".join(f"{p} {r[p]['train_ips']:.1f}" for p in PRECISIONS if p in r)


def side_by_side(model: str, a: argparse.Namespace, list_file: str, root: str, procs: int) -> dict:
    """`procs` cxrlab children at once with the CPU threads split between them: images/s of all together."""
    threads = max(1, (os.cpu_count() or 1) // procs)
    env = {**env_with(alloc=True), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-barrier-") as barrier:
        argv = _child_argv("cxrlab", model, a, list_file, root, barrier=barrier, barrier_n=procs)
        results = run_children([argv] * procs, env, timeout=1800)
    res: dict = {"procs": procs, "threads_each": threads}
    for prec in a.precisions.split(","):
        span = max(r[f"{prec}_train_end"] for r in results) - min(r[f"{prec}_train_start"] for r in results)
        res[prec] = {"train_ips": sum(r["images"] for r in results) / span,
                     "train_ips_each": [r[prec]["train_ips"] for r in results],
                     "infer_ips": sum(r[prec]["infer_ips"] for r in results)}
    print(f"  {model} cxrlab, {procs} side by side ({threads} thread(s) each): train {_train_rates(res)} img/s together",
          flush=True)
    return res


def summarise(runs: dict) -> dict:
    """Best-of-repeats images/s per configuration and the cxrlab/naive ratios."""
    keys = ("train_ips", "infer_ips", "train_img_per_cpu_s")
    naive = {k: max(r[k] for r in runs["naive"]) for k in keys}
    cx = {p: {k: max(r[p][k] for r in runs["cxrlab"]) for k in keys} for p in PRECISIONS if p in runs["cxrlab"][0]}
    best_train = max(cx, key=lambda p: cx[p]["train_ips"])
    best_infer = max(cx, key=lambda p: cx[p]["infer_ips"])
    res = {"naive": naive, **{f"cxrlab_{p}": v for p, v in cx.items()},
           "train_precision": best_train, "infer_precision": best_infer,
           "train_speedup": cx[best_train]["train_ips"] / naive["train_ips"],
           "infer_speedup": cx[best_infer]["infer_ips"] / naive["infer_ips"],
           "train_speedup_fp32": cx["fp32"]["train_ips"] / naive["train_ips"],
           "train_speedup_per_cpu_second": cx[best_train]["train_img_per_cpu_s"] / naive["train_img_per_cpu_s"],
           "decode_cold_s": min(r["decode_cold_s"] for r in runs["cxrlab"]),
           "decode_warm_s": min(r["decode_warm_s"] for r in runs["cxrlab"]), "raw": runs}
    for name, r in runs["ablations"].items():
        res[name] = {p: {k: r[p][k] for k in ("train_ips", "infer_ips")} for p in PRECISIONS if p in r}
        if "procs" in r:
            res[name].update(procs=r["procs"], threads_each=r["threads_each"])
    return res


def prepare_files(a: argparse.Namespace, tmp: str) -> tuple[list[str], str]:
    """The benchmark's files (real folder or generated phantoms) and their ImageFolder root."""
    if a.data:
        files = pick_evenly(image_files(a.data), a.images)
        if not files:
            raise SystemExit(f"no images under {a.data}")
        return [str(p) for p in files], str(Path(a.data))
    print(f"generating {a.images} phantom JPEGs ({a.img_size} px) in {tmp}", flush=True)
    return [str(p) for p in make_phantom_folder(tmp, a.images, a.img_size)], tmp


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.child:
        files = json.loads(Path(a.file_list).read_text())
        a.channels_last = bool(a.channels_last)
        res = naive_child(a, files) if a.child == "naive" else cxrlab_child(a, files)
        res.update(malloc_env={k: os.environ.get(k) for k in ALLOC_VARS}, torch_threads=__import__("torch").get_num_threads())
        print(json.dumps(res))
        return 0
    if a.quick:
        a.images = min(a.images, 32)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as tmp:
        files, root = prepare_files(a, os.path.join(tmp, "images"))
        list_file = os.path.join(tmp, "files.json")
        Path(list_file).write_text(json.dumps(files))
        per_model = {}
        for m in a.models.split(","):
            print(f"{m}: {len(files)} images at {a.img_size} px", flush=True)
            per_model[m] = measure_model(m, a, list_file, root)
    out = report(a, per_model, len(files), time.perf_counter() - t_start)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


def report(a: argparse.Namespace, per_model: dict, n: int, seconds: float) -> dict:
    """The JSON document and a printed table."""
    out = {"train_speedup": geomean([r["train_speedup"] for r in per_model.values()]),
           "infer_speedup": geomean([r["infer_speedup"] for r in per_model.values()]),
           "train_speedup_fp32": geomean([r["train_speedup_fp32"] for r in per_model.values()]),
           "train_speedup_per_cpu_second": geomean([r["train_speedup_per_cpu_second"] for r in per_model.values()]),
           "train_speedup_per_model": {m: r["train_speedup"] for m, r in per_model.items()},
           "infer_speedup_per_model": {m: r["infer_speedup"] for m, r in per_model.items()},
           "models": per_model, "images": n, "img_size": a.img_size,
           "data": a.data or "synthetic phantoms (JPEG)", "batch": BATCH, "infer_batch": INFER_BATCH,
           "naive_workers": NAIVE_WORKERS, "repeats": a.repeats, "device": a.device,
           "allocator": {"naive": "glibc default (no MALLOC_* variables)", "cxrlab": dict(ALLOC_VARS)},
           "machine": machine_info(), "bench_seconds": seconds}
    out["date"] = out["machine"]["date"]
    print(f"\n{'model':20s} {'config':14s} {'train img/s':>12s} {'infer img/s':>12s}")
    for m, r in per_model.items():
        for cfg in ("naive", "cxrlab_fp32", "cxrlab_bf16", "cxrlab_default_malloc", "cxrlab_no_channels_last",
                    *[k for k in r if k.startswith(("cxrlab_freeze_stages_", "cxrlab_side_by_side_"))]):
            if cfg in r:
                v = r[cfg] if "train_ips" in r[cfg] else r[cfg][next(p for p in PRECISIONS if p in r[cfg])]
                print(f"{m:20s} {cfg:14s} {v['train_ips']:12.1f} {v['infer_ips']:12.1f}")
        print(f"{m:20s} speedup train {r['train_speedup']:.2f}x ({r['train_precision']}), infer "
              f"{r['infer_speedup']:.2f}x ({r['infer_precision']}); one-time decode {r['decode_cold_s']:.1f} s")
    print(f"train_speedup {out['train_speedup']:.2f}x  infer_speedup {out['infer_speedup']:.2f}x  per CPU second "
          f"{out['train_speedup_per_cpu_second']:.2f}x  ({seconds:.0f} s)")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--data", help="folder of real images in class subfolders (default: generated phantoms)")
    p.add_argument("--images", type=int, default=64, help="images per timed epoch (default 64: 2 batches)")
    p.add_argument("--models", default="resnet18,efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=1, help="interleaved naive/cxrlab repeats (best kept)")
    p.add_argument("--ablations", action="store_true", help="also cxrlab without the allocator / channels_last")
    p.add_argument("--quick", action="store_true", help="32 images: a smoke run")
    p.add_argument("--freeze-stages", dest="freeze_stages_list", default="", metavar="N1,N2",
                   help="also cxrlab with the stem and the first N stages fixed (training's --freeze-stages), per N")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="cxrlab precisions to time, comma-separated (default fp32,bf16; fp32 alone on a CPU without "
                        "native bf16, where bf16 is emulated and slow)")
    p.add_argument("--side-by-side", default="", metavar="P1,P2",
                   help="also P cxrlab children training at once, the threads split between them, per P "
                        "(bench/accuracy.py --parallel); their images/s together")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: both pipelines train and infer there "
                                                    "(cxrlab augments on the device; bf16 is CUDA autocast there)")
    p.add_argument("--child", choices=["naive", "cxrlab"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--file-list", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child-freeze-stages", dest="freeze_stages", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--barrier-n", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
