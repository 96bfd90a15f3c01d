"""`cxrlab evaluate`: metrics, report and plots for a checkpoint on a data split or folder."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="best.pt / last.pt / ensemble checkpoint")
    p.add_argument("--data", required=True, help="data folder or manifest CSV")
    p.add_argument("--split", default="test", help="train, val, test, or all for a flat folder (default test)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, classification_report.txt, plots)")
    p.add_argument("--manifest", help="CSV manifest (e.g. with a source column)")
    p.add_argument("--group-by", choices=["source", "group", "split", "folder"], help="also report metrics per group")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--adapt-bn", action="store_true",
                   help="first re-estimate BatchNorm statistics on the evaluated images themselves (unlabelled; "
                        "transductive, see `cxrlab adapt`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--no-report", action="store_true", help="skip plots and report.html")


def run(args) -> int:
    from pathlib import Path

    from cxrlab.evaluate import evaluate_checkpoint
    from cxrlab.inference import check_device_for
    from cxrlab.metrics import format_metric
    from cxrlab.outputs import check_not_run_folder, check_output_dir

    check_device_for(args.checkpoint, args.device)
    check_not_run_folder(args.out, instead=f"eval_{Path(args.data).stem or 'data'}")
    check_output_dir(args.out)
    m = evaluate_checkpoint(args.checkpoint, args.data, args.out, split=args.split, manifest=args.manifest,
                            group_by=args.group_by, tta=args.tta, adapt_bn=args.adapt_bn, device=args.device, n_boot=args.bootstrap,
                            report=not args.no_report)
    ci = m.get("ci95", {}).get("accuracy")
    ci_txt = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
    print(f"{m['split']}: n={m['n']} accuracy {m['accuracy']:.4f}{ci_txt}  macro-F1 {m['macro_f1']:.4f}  AUC {format_metric(m['auc_macro'])}")
    for c in m["class_names"]:
        pc = m["per_class"][c]
        print(f"  {c:20s} recall {pc['recall']:.4f}  precision {pc['precision']:.4f}  f1 {pc['f1']:.4f}  n={pc['support']}")
    print(f"results: {args.out}/metrics.json")
    return 0
