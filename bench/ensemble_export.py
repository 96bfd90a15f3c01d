"""An ensemble checkpoint exported as one ONNX graph: agreement with PyTorch on real radiographs, speed, int8.

For an ensemble checkpoint (`cxrlab train --members K` or `cxrlab ensemble`) and a labelled data folder:

- exports it (fp32, parity-checked; int8 calibrated on `--calib-count` images of the train split) and
  its first member alone (fp32), and times the exports;
- decodes the test split once with the ensemble's preset and runs every engine on the same arrays:
  PyTorch ensemble (the `.pt`), onnxruntime fp32 ensemble, onnxruntime int8 ensemble, and the first
  member alone in PyTorch and onnxruntime fp32 and int8 (what one member costs), the member's int8 calibrated
  on synthetic phantoms (`cxrlab export`'s default without --calib-data), and the member's int8 as
  cxrlab made it before: only the stem convolution fp32 (commit 3ec6382), and besides with calibration images
  only resized, not through the model's preset (before 3ec6382);
- per engine: images/s at batch 64 (best of `--repeats` passes; every engine in the same run, so compare
  ratios), accuracy and AUC with the checkpoint's temperature and thresholds, and against the PyTorch
  ensemble: max |dprob| and the share of identical decisions.

    python bench/ensemble_export.py --checkpoint runs/cli_m2_s0/best.pt --data ../shared/data/pneumonia \\
        --json ensemble_export.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, reexec_with_alloc_vars  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_engine(bundle, arrays: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """Logits of every array (batch 64) and images/s of the best pass."""
    best, logits = float("inf"), None
    for _ in range(repeats):
        logits, s = timed(lambda: bundle.logits_for_arrays(arrays, batch_size=64))
        best = min(best, s)
    return logits, len(arrays) / best


def scores(bundle, logits: np.ndarray, y: np.ndarray, ref_probs: np.ndarray | None) -> dict:
    from sklearn.metrics import roc_auc_score

    from cxrlab.evaluate import decide

    probs = bundle.probs(logits)
    pred = decide(probs, bundle.ckpt)
    auc = roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(y, probs, multi_class="ovr")
    out = {"accuracy": float((pred == y).mean()), "auc": float(auc)}
    if ref_probs is not None:
        out.update(max_abs_dprob=float(np.abs(probs - ref_probs).max()),
                   same_decisions=float((pred == decide(ref_probs, bundle.ckpt)).mean()))
    return out


def main() -> None:
    reexec_with_alloc_vars()  # torch inference is slower under glibc's default malloc
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an ensemble checkpoint (.pt)")
    p.add_argument("--data", required=True, help="data folder with test/ (and train/ for int8 calibration)")
    p.add_argument("--calib-count", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per engine (the best counts)")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()

    import torch

    from cxrlab.checkpoint import load_checkpoint, save_checkpoint
    from cxrlab.data.cache import load_arrays
    from cxrlab.data.dataset import build_index
    from cxrlab.export import export_onnx, load_onnx_bundle, quantize_int8
    from cxrlab.inference import bundle_for

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    ckpt = load_checkpoint(args.checkpoint)
    if not ckpt.get("ensemble"):
        raise SystemExit(f"{args.checkpoint} is not an ensemble checkpoint")
    index = build_index(args.data, require=("test",))
    if index.class_names != list(ckpt["class_names"]):
        raise SystemExit(f"classes differ: data {index.class_names}, checkpoint {ckpt['class_names']}")
    test = index.splits["test"]
    y_all = index.labels("test")
    ens_pt = bundle_for(ckpt, "cpu")
    arrays, ok, errors = load_arrays([s.path for s in test], ens_pt.pre, cache_dir=None, workers=2)
    y = y_all[ok]
    results: dict = {"checkpoint": args.checkpoint, "members": [m["model"]["name"] for m in ckpt["ensemble"]],
                     "test_images": len(ok), "unreadable": len(errors), "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="bench-ens-") as tmp:
        tmp = Path(tmp)
        fp32, t_fp32 = timed(lambda: export_onnx(ckpt, tmp / "ens.onnx"))
        calib = str(Path(args.data) / "train")
        int8, t_int8 = timed(lambda: export_onnx(ckpt, tmp / "ens8.onnx", quantize="int8", calib_data=calib,
                                                 calib_count=args.calib_count))
        save_checkpoint(dict(ckpt["ensemble"][0]), tmp / "member0.pt")
        one, t_one = timed(lambda: export_onnx(tmp / "member0.pt", tmp / "member0.onnx"))
        one8 = export_onnx(tmp / "member0.pt", tmp / "member0.int8.onnx", quantize="int8", calib_data=calib,
                           calib_count=args.calib_count)
        # cxrlab export's default without --calib-data: calibrated on synthetic phantoms
        phantom8 = export_onnx(tmp / "member0.pt", tmp / "member0.int8-phantoms.onnx", quantize="int8",
                               calib_count=args.calib_count)
        # the int8 of commit 3ec6382: only the stem convolution fp32
        stem8 = quantize_int8(Path(one.path), tmp / "member0.int8-stem.onnx", dict(ckpt["ensemble"][0]), calib,
                              args.calib_count, fp32_front=1)
        # and before it: besides, calibration images resized only, not through the model's preset
        resize_only = {**ckpt["ensemble"][0], "preprocess": {"img_size": ckpt["img_size"]}}
        old8 = quantize_int8(Path(one.path), tmp / "member0.int8-resize-only.onnx", resize_only, calib,
                             args.calib_count, fp32_front=1)
        results["export_s"] = {"ensemble_fp32": round(t_fp32, 1), "ensemble_int8": round(t_int8, 1),
                               "member0_fp32": round(t_one, 1)}
        results["int8_held_out_member0"] = {"now": one8.int8, "phantoms": phantom8.int8,
                                             "stem_only_fp32": stem8, "stem_only_resize_only": old8}
        results["parity_sample_images"] = fp32.parity
        results["int8_held_out"] = int8.int8
        engines = {"torch ensemble": ens_pt, "onnxruntime fp32 ensemble": load_onnx_bundle(fp32.path),
                   "onnxruntime int8 ensemble": load_onnx_bundle(int8.path),
                   "torch member 0": bundle_for(load_checkpoint(tmp / "member0.pt"), "cpu"),
                   "onnxruntime fp32 member 0": load_onnx_bundle(one.path),
                   "onnxruntime int8 member 0": load_onnx_bundle(one8.path),
                   "int8 member 0, calibrated on phantoms": load_onnx_bundle(phantom8.path),
                   "int8 member 0, only the stem fp32": load_onnx_bundle(tmp / "member0.int8-stem.onnx"),
                   "int8 member 0, stem fp32, resized calibration": load_onnx_bundle(tmp / "member0.int8-resize-only.onnx")}
        probs, rows = {}, {}
        for name, bundle in engines.items():
            logits, ips = run_engine(bundle, arrays, args.repeats)
            ref = "torch ensemble" if "ensemble" in name else "torch member 0"
            row = scores(bundle, logits, y, probs.get(ref))
            probs[name] = bundle.probs(logits)
            rows[name] = {"images_per_s": round(ips, 1), **row}
            print(f"{name:40s} {ips:6.1f} img/s  accuracy {row['accuracy']:.4f}  AUC {row['auc']:.4f}"
                  + (f"  vs {ref}: max|dprob| {row['max_abs_dprob']:.2e}, same decisions {row['same_decisions']:.4f}"
                     if "max_abs_dprob" in row else ""), flush=True)
        results["engines"] = rows
    print(f"export: ensemble fp32 {t_fp32:.1f} s (parity max |dprob| {fp32.parity['max_abs_dprob']:.1e}), "
          f"int8 {t_int8:.1f} s (agreement {int8.int8['argmax_agreement']:.3f} on {int8.int8['n']} held-out), "
          f"member 0 fp32 {t_one:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
