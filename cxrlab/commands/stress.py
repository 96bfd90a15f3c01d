"""`cxrlab stress`: how far decisions move under framing, exposure, sharpness and noise changes."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="PATH", help="unlabelled image files/folders (or use --data)")
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint, ensemble or exported .onnx")
    p.add_argument("--data", help="labelled data folder or manifest (adds accuracy, AUC, recall per perturbation)")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--manifest", help="CSV manifest")
    p.add_argument("--out", required=True, help="output folder (stress.json, stress.csv)")
    p.add_argument("--only", help="comma-separated perturbations or families, e.g. zoom,blur (default all)")
    p.add_argument("--n", type=int, default=1000, help="at most this many images, a seeded random subset (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args) -> int:
    from cxrlab.inference import check_batch_size, check_device_for, check_inputs
    from cxrlab.outputs import check_output_dir
    from cxrlab.stress import format_table, stress_checkpoint

    if args.inputs:
        check_inputs(args.inputs)
    check_batch_size(args.batch_size)
    check_device_for(args.checkpoint, args.device)
    check_output_dir(args.out)
    r = stress_checkpoint(args.checkpoint, args.out, data=args.data, split=args.split, manifest=args.manifest,
                          inputs=args.inputs, only=args.only, n=args.n or None, seed=args.seed,
                          batch_size=args.batch_size, device=args.device)
    print(f"{r['n']} image(s) from {r['images_from']} ({len(r['unreadable'])} unreadable)")
    print(format_table(r))
    for h in r["hints"]:
        print("fragile: " + h)
    if r["too_few_to_judge"]:
        print(f"only {r['n']} image(s): too few to call any perturbation fragile (at least {r['min_images']}); "
              "the flip rates above are not evidence either way")
    elif not r["hints"]:
        print(f"no perturbation flips more than {100 * r['fragile_threshold']:.0f}% of decisions")
    print(f"results: {args.out}/stress.json, {args.out}/stress.csv")
    return 0
