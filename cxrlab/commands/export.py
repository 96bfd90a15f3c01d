"""`cxrlab export`: export a checkpoint to ONNX, check parity with PyTorch, optionally quantize to int8."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="cxrlab checkpoint (best.pt / last.pt) or ensemble checkpoint (exported as one graph; its members "
                        "must share one preprocessing preset)")
    p.add_argument("--out", required=True, help="FILE.onnx to write (input: float32 (N,1,S,S) grey 0..255; output: logits)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    p.add_argument("--quantize", choices=["int8"], help="static int8 QDQ quantization (calibrated; agreement with fp32 is printed)")
    p.add_argument("--calib-data", metavar="DIR", help="images for int8 calibration (default: synthetic phantoms)")
    p.add_argument("--calib-count", type=int, default=256, help="calibration images (default 256; a quarter more held out)")
    p.add_argument("--exporter", choices=["auto", "legacy", "dynamo"], default="auto",
                   help="torch.onnx exporter: auto (default: legacy TorchScript, torch.export-based dynamo if that fails)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")


def run(args) -> int:
    from cxrlab.checkpoint import check_checkpoint_file
    from cxrlab.export import export_onnx
    from cxrlab.outputs import check_output_file

    check_checkpoint_file(args.checkpoint, "cxrlab export")
    check_output_file(args.out, suffixes=(".onnx",))
    r = export_onnx(args.checkpoint, args.out, opset=args.opset, check=not args.no_check, quantize=args.quantize,
                    calib_data=args.calib_data, calib_count=args.calib_count, exporter=args.exporter)
    if r.parity:
        p = r.parity
        print(f"parity fp32 onnxruntime vs PyTorch ({p['n']} images, batch 1 and 3): max |dprob| {p['max_abs_dprob']:.2e}, "
              f"max |dlogit| {p['max_abs_dlogit']:.2e} <= {p['tolerance']:.0e}: OK")
    if r.int8:
        q = r.int8
        print(f"int8 vs fp32 on {q['n']} held-out images ({q['source']}; {q['calibration_images']} calibration): "
              f"argmax agreement {q['argmax_agreement']:.3f}, max |dprob| {q['max_abs_dprob']:.3g}, "
              f"mean |dprob| {q['mean_abs_dprob']:.3g}")
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    m = r.meta
    what = m["architecture"]
    if m.get("ensemble"):
        what = f"ensemble of {len(m['ensemble'])} ({', '.join(e['architecture'] for e in m['ensemble'])}) in one graph"
    print(f"wrote {r.path}: {what}, classes {', '.join(m['class_names'])}, input float32 (N, 1, "
          f"{m['img_size']}, {m['img_size']}) grey 0..255, output logits")
    return 0
