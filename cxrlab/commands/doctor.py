"""`cxrlab doctor`: this machine's facts that decide training speed, and (--measure) a timed estimate."""

from __future__ import annotations

import argparse

# --measure's settings when not given (the benchmark recipe's model and batch on Kermany, a 30-minute budget)
MEASURE_DEFAULTS = {"model": "efficientnet_lite0", "img_size": None, "batch_size": 32, "images": 4431,
                    "budget_min": 30.0, "steps": 4, "device": "auto"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--measure", action="store_true",
                   help="also time training steps and inference of --model here and estimate the epochs that fit "
                        "--budget-min (about half a minute on 2 cores at the defaults)")
    p.add_argument("--model", help=f"model to time (default {MEASURE_DEFAULTS['model']})")
    p.add_argument("--img-size", type=int, help="input size (default: the model's own)")
    p.add_argument("--batch-size", type=int, help=f"images a step (default {MEASURE_DEFAULTS['batch_size']})")
    p.add_argument("--images", type=int, help=f"training images an epoch, for the estimate (default "
                   f"{MEASURE_DEFAULTS['images']}: Kermany's training folder less its validation carve)")
    p.add_argument("--budget-min", type=float, help=f"time budget the estimate is for, minutes (default "
                   f"{MEASURE_DEFAULTS['budget_min']:g})")
    p.add_argument("--steps", type=int, help=f"timed training steps per variant after a warm-up step (default "
                   f"{MEASURE_DEFAULTS['steps']})")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--json", metavar="FILE", help="also write everything to this JSON file")


def run(args) -> int:
    import json
    from pathlib import Path

    from cxrlab.doctor import check_measure_args, format_measure, format_report, measure, report
    from cxrlab.errors import CxrlabError
    from cxrlab.outputs import check_output_file

    given = [k for k in MEASURE_DEFAULTS if getattr(args, k) is not None]
    if given and not args.measure:
        flag = "--" + given[0].replace("_", "-")
        raise CxrlabError(f"{flag} only acts with --measure (cxrlab doctor --measure {flag} ...)")
    settings = {k: MEASURE_DEFAULTS[k] if getattr(args, k) is None else getattr(args, k) for k in MEASURE_DEFAULTS}
    check_measure_args(settings["images"], settings["budget_min"], settings["steps"], settings["model"],
                       settings["img_size"], settings["batch_size"], settings["device"])
    if args.json:
        check_output_file(args.json, "--json")
    r = report()
    for line in format_report(r):
        print(line)
    if args.measure:
        r["measure"] = measure(**settings)
        for line in format_measure(r["measure"]):
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
        print(f"written: {args.json}")
    return 0
