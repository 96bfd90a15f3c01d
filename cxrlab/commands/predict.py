"""`cxrlab predict`: predict classes for images and folders."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint (.pt) or exported model (.onnx)")
    p.add_argument("--output", help="FILE.csv or FILE.json (default: CSV on standard output)")
    p.add_argument("--engine", choices=["torch", "onnx"], default=None, help="inference engine (default: by file type)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args) -> int:
    from cxrlab.predict import predict_paths, write_rows

    if args.engine == "onnx" and not args.checkpoint.lower().endswith(".onnx"):
        from cxrlab.export import bundle_via_onnx

        bundle = bundle_via_onnx(args.checkpoint)
    else:
        from cxrlab.inference import load_model_bundle

        bundle = load_model_bundle(args.checkpoint, device=args.device)
    rows = predict_paths(bundle, args.inputs, tta=args.tta, batch_size=args.batch_size, progress=not args.quiet)
    write_rows(rows, args.output, bundle.class_names)
    bad = sum(r["error"] is not None for r in rows)
    if args.output:
        print(f"{len(rows) - bad} image(s) predicted, {bad} unreadable -> {args.output}")
    return 0 if bad < len(rows) else 1
