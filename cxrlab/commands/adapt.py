"""`cxrlab adapt`: a copy of a checkpoint whose BatchNorm statistics come from a new site's images."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="the new site's image files and folders (labels are not needed)")
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint to adapt (best.pt)")
    p.add_argument("--out", required=True, help="adapted checkpoint to write (a new file)")
    p.add_argument("--n", type=int, default=1024, help="at most this many images (default 1024; at least 32 needed)")
    p.add_argument("--batch-size", type=int, default=64, help="forward batch (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset when there are more than --n images")


def run(args) -> int:
    from cxrlab.adapt import adapt_checkpoint, check_n
    from cxrlab.checkpoint import check_checkpoint_file
    from cxrlab.inference import check_batch_size, inference_device
    from cxrlab.outputs import check_new_checkpoint

    check_checkpoint_file(args.checkpoint, "cxrlab adapt")
    check_n(args.n)
    check_batch_size(args.batch_size)
    inference_device(args.device)
    check_new_checkpoint(args.out, inputs=(args.checkpoint,), what="the adapted copy")
    r = adapt_checkpoint(args.checkpoint, args.inputs, args.out, n=args.n, batch_size=args.batch_size,
                         device=args.device, seed=args.seed)
    print(f"wrote {args.out}: BatchNorm statistics from {r['images']} images ({r['unreadable']} unreadable skipped); "
          f"weights, classes, preprocessing and temperature unchanged. Check it on labelled images from the "
          f"site with `cxrlab evaluate` before use")
    return 0
