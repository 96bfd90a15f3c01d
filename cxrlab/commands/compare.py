"""`cxrlab compare`: train and evaluate several models on one data set; leaderboard + ROC comparison."""

from __future__ import annotations

import argparse

DEFAULT_MODELS = "chestxray_cnn,custom_cnn,resnet18,efficientnet_lite0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="data folder (or manifest) with train and test splits")
    p.add_argument("--manifest", help="CSV manifest path,label[,split][,group][,source]")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model names (default {DEFAULT_MODELS})")
    p.add_argument("--out", required=True, help="output folder: one run folder per model, leaderboard.csv/.md, roc_compare.png")
    p.add_argument("--budget-min", type=float, help="training time budget per model, minutes")
    p.add_argument("--recipe", help="train every model with this recipe's settings (`cxrlab train --list-recipes`); "
                                     "the options here and --config override them, --models picks the architectures")
    p.add_argument("--epochs", type=int, help="maximum epochs per model (default: the recipe's, else 10)")
    p.add_argument("--img-size", type=int, help="input size for every model (default: the recipe's, else each model's own)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the recipe's, else 32)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights, for the models that have them")
    p.add_argument("--lr", type=float, help="learning rate for every model")
    p.add_argument("--seed", type=int, help="random seed for every model")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None, help="persistent decode cache (default on)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                   help="draw each run's plots and report.html (default on)")
    p.add_argument("--target-recall", action="append", default=[], metavar="CLASS=RECALL",
                   help="operating point chosen on validation for every model (repeatable)")
    p.add_argument("--config", help="YAML of TrainConfig keys applied to every model (options above override it)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier runs in OUT/<model> (without it a folder that holds a run is refused)")


def run(args) -> int:
    from cxrlab.commands.train import parse_target_recall
    from cxrlab.compare import compare_models
    from cxrlab.config import TrainConfig, load_yaml
    from cxrlab.metrics import format_metric
    from cxrlab.outputs import check_output_dir
    from cxrlab.recipes import with_recipe

    base = load_yaml(args.config) if args.config else {}
    for key in ("manifest", "recipe", "pretrained", "lr", "seed", "device", "cache", "report"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.target_recall:
        base["target_recall"] = parse_target_recall(args.target_recall)
    TrainConfig.from_dict(with_recipe(base))  # unknown config keys and recipes fail before any training
    check_output_dir(args.out)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = compare_models(args.data, models, args.out, budget_min=args.budget_min, epochs=args.epochs,
                          img_size=args.img_size, batch_size=args.batch_size, base=base, overwrite=args.overwrite,
                          progress=not args.quiet)
    for r in rows:
        if r.get("error"):
            print(f"{r['model']:22s} FAILED: {r['error']}")
        else:
            print(f"{r['model']:22s} accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  AUC {format_metric(r['auc_macro'])}  "
                  f"({r['wall_time_s']:.0f}s)")
    print(f"leaderboard: {args.out}/leaderboard.md")
    return 0 if any(not r.get("error") for r in rows) else 1
