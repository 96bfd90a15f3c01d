"""`cxrlab calibrate`: re-fit a checkpoint's temperature and operating-point thresholds on a labelled split."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint or ensemble to calibrate")
    p.add_argument("--data", required=True, help="labelled data folder or manifest CSV")
    p.add_argument("--split", default="val", help="split to fit on (default val; never the test split you report)")
    p.add_argument("--manifest", help="CSV manifest (its split column can mark the validation images)")
    p.add_argument("--target-recall", action="append", default=[], metavar="CLASS=RECALL",
                   help="choose the threshold of CLASS to reach RECALL on the split, e.g. TUBERCULOSIS=0.99 (repeatable)")
    p.add_argument("--out", required=True, help="calibrated checkpoint to write (a new file)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args) -> int:
    from cxrlab.checkpoint import check_checkpoint_file, load_checkpoint, save_checkpoint
    from cxrlab.commands.train import parse_target_recall
    from cxrlab.finalize import calibrate_on_split
    from cxrlab.inference import inference_device
    from cxrlab.outputs import check_new_checkpoint

    src = check_checkpoint_file(args.checkpoint, "cxrlab calibrate")
    dst = check_new_checkpoint(args.out, inputs=(src,), what="the calibrated copy")
    inference_device(args.device)
    ckpt = calibrate_on_split(load_checkpoint(src), args.data, args.split, args.manifest,
                              parse_target_recall(args.target_recall), args.device)
    save_checkpoint(ckpt, dst)
    print(f"wrote {dst}: temperature {ckpt['temperature']:.3f} fitted on the {ckpt['calibration_fitted_on']}")
    for cls, op in (ckpt.get("operating_points_val") or {}).items():
        print(f"  {cls}: threshold {ckpt['thresholds'][cls]:.4f} -> recall {op['recall']:.4f} on that split")
    return 0
