"""`cxrlab ensemble`: combine checkpoints into one probability-averaging ensemble checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="member checkpoints (same classes, same order)")
    p.add_argument("--out", required=True, help="ensemble checkpoint to write (e.g. ensemble.pt)")
    p.add_argument("--weights", help="comma-separated weight per checkpoint, e.g. 2,1,1 (default equal)")
    p.add_argument("--calibrate-data", metavar="DATA",
                   help="fit the ensemble's temperature (and --target-recall thresholds) on this data's --calibrate-split")
    p.add_argument("--calibrate-split", default="val", help="split of --calibrate-data to fit on (default val)")
    p.add_argument("--manifest", help="CSV manifest for --calibrate-data")
    p.add_argument("--target-recall", action="append", default=[], metavar="CLASS=RECALL",
                   help="with --calibrate-data: choose the threshold of CLASS to reach RECALL (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (for --calibrate-data)")


def run(args) -> int:
    from cxrlab.checkpoint import check_checkpoint_file, save_checkpoint
    from cxrlab.commands.train import parse_target_recall
    from cxrlab.ensemble import build_ensemble, calibrate_ensemble, parse_weights
    from cxrlab.errors import CxrlabError
    from cxrlab.inference import inference_device
    from cxrlab.outputs import check_new_checkpoint

    recall = parse_target_recall(args.target_recall)
    if recall and not args.calibrate_data:
        raise CxrlabError("--target-recall needs --calibrate-data (the labelled data to choose the thresholds on)")
    for path in args.checkpoints:
        check_checkpoint_file(path, "cxrlab ensemble")
    if args.calibrate_data:
        inference_device(args.device)
    check_new_checkpoint(args.out, inputs=tuple(args.checkpoints), what="the ensemble")
    ckpt = build_ensemble(args.checkpoints, parse_weights(args.weights, len(args.checkpoints)))
    if args.calibrate_data:
        ckpt = calibrate_ensemble(ckpt, args.calibrate_data, args.calibrate_split, args.manifest, recall, args.device)
    save_checkpoint(ckpt, args.out)
    ws = ", ".join(f"{w:.3f}" for w in ckpt["ensemble_weights"])
    print(f"ensemble of {len(ckpt['ensemble'])} models ({', '.join(ckpt['model']['members'])}; weights {ws}) -> {args.out}")
    if args.calibrate_data:
        print(f"temperature {ckpt['temperature']:.3f}; thresholds {ckpt.get('thresholds') or 'none'}")
    return 0
