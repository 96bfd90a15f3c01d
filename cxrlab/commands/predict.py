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
    from cxrlab.inference import check_batch_size, check_inputs
    from cxrlab.outputs import check_output_file
    from cxrlab.predict import predict_paths, write_rows

    check_inputs(args.inputs)
    check_batch_size(args.batch_size)
    if args.output:
        check_output_file(args.output, "--output", suffixes=(".csv", ".json"))
    bundle = _load(args)
    rows = predict_paths(bundle, args.inputs, tta=args.tta, batch_size=args.batch_size, progress=not args.quiet)
    write_rows(rows, args.output, bundle.class_names)
    bad = sum(r["error"] is not None for r in rows)
    if args.output:
        print(f"{len(rows) - bad} image(s) predicted, {bad} unreadable -> {args.output}")
    return 0 if bad < len(rows) else 1


def _load(args):
    """The bundle of --checkpoint for --engine (default: by file type) and --device."""
    from cxrlab.errors import CxrlabError
    from cxrlab.inference import inference_device, load_model_bundle, warn_onnx_device

    is_onnx = args.checkpoint.lower().endswith(".onnx")
    if is_onnx and args.engine == "torch":
        raise CxrlabError(f"--engine torch needs the .pt checkpoint; '{args.checkpoint}' is an exported ONNX model, "
                          "which runs with onnxruntime (drop --engine, or pass the .pt it was exported from)")
    if is_onnx or args.engine == "onnx":
        warn_onnx_device(args.device, args.checkpoint)
    else:
        inference_device(args.device)
    if args.engine == "onnx" and not is_onnx:
        from cxrlab.export import bundle_via_onnx

        return bundle_via_onnx(args.checkpoint)
    return load_model_bundle(args.checkpoint, device="cpu" if is_onnx else args.device)
