"""Accuracy benchmark: cxrlab's recommended recipe on a real data set within a wall-clock budget.

    python bench/accuracy.py --data ../shared/data/pneumonia --budget-min 30 --out runs/acc_pneumonia
    python bench/accuracy.py --data ../shared/data/cxr3 --budget-min 30 --out runs/acc_cxr3
    python bench/accuracy.py --data ../shared/data/pneumonia --recipe chestxray_cnn --budget-min 30 --out runs/ref1
    python bench/accuracy.py --data ../shared/data/pneumonia --budget-min 30 --seeds 0,1,2 --out runs/acc_seeds
    python bench/accuracy.py --data ../shared/data/pneumonia --budget-min 30 --members 2 --out runs/acc_m2
    python bench/accuracy.py --data ../shared/data/pneumonia --budget-min 30 --set model=efficientnet_lite2 --out runs/acc_lite2

Selects on validation only (carved from train and grouped by patient when there is no val split),
evaluates `best.pt` once on the test split, and writes RUN_DIR/best.pt and RUN_DIR/metrics.json
(the `cxrlab evaluate` schema; with a manifest that has a `source` column, metrics per source are in
metrics.json["groups"]). With `--members K` the budget is split between K models trained with seeds S,
S+1000, ... on one validation carve and averaged (OUT/memberI/, the ensemble in OUT/); `--parallel P` trains P
members at once in their own processes (on a GPU, whose batch-32 steps leave it mostly idle, or one member per
GPU), so each gets P/K of the budget instead of 1/K. Prints a one-line
summary and appends nothing by itself: copy the numbers into docs/BENCHMARKS.md with the command, machine
and date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from cxrlab.recipes import RECIPES, recipe_settings

# Kermany file names: person1000_bacteria_2931, IM-0115-0001, NORMAL2-IM-1427-0001 -> the patient
PATIENT_REGEX = r"^(?:[a-z0-9_]+__)?(person\d+|NORMAL2-IM-\d+|IM-\d+)"

# The recipes live in cxrlab/recipes.py (`cxrlab train --recipe NAME` uses the same settings): "recommended",
# and the two reference designs "chestxray_cnn" and "custom_cnn" with their own defaults.


def _reexec_with_allocator() -> None:
    want = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    if sys.platform.startswith("linux") and not all(k in os.environ for k in want):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})


def _overrides(items: list[str]) -> dict:
    """KEY=VALUE pairs typed like the TrainConfig field they set."""
    import dataclasses

    from cxrlab.commands.train import field_type
    from cxrlab.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a TrainConfig field")
        if isinstance(fields[key].default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
            continue
        if key in ("model_kwargs", "target_recall"):  # --set model_kwargs=drop_path_rate:0.1,drop_rate:0.2
            from cxrlab.commands.train import parse_model_args, parse_target_recall

            parse = parse_model_args if key == "model_kwargs" else parse_target_recall  # the CLI's own checks
            out[key] = parse([kv.replace(":", "=", 1) for kv in value.split(",") if kv])
            continue
        try:
            out[key] = field_type(fields[key])(value)
        except ValueError:
            raise SystemExit(f"--set {item!r}: {value!r} is not a valid value for {key}") from None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data folder (train/[val/]test/<CLASS>/ or with manifest.csv)")
    p.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget for the whole run")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="recommended")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--img-size", type=int, help="override the recipe's image size")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation carve, initialisation and augmentation")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], metavar="S1,S2,...",
                   help="run each seed with its own full budget into OUT/seedS and write OUT/seeds_summary.json "
                        "(mean, min, max); one seed alone cannot tell a 0.01 AUC change from noise")
    p.add_argument("--members", type=int, default=1,
                   help="train this many models (seeds S, S+1000, ...) on the same validation carve, each with 1/K of "
                        "the budget, and average them (cxrlab ensemble, temperature fitted on validation): OUT/memberI/ "
                        "and the ensemble as OUT/best.pt and OUT/metrics.json")
    p.add_argument("--parallel", type=int, default=1, metavar="P",
                   help="with --members: train P members at once, each in its own process (CPU threads split between "
                        "them; with several GPUs, one GPU per process, round robin), so each member gets P/K of the budget; "
                        "for GPUs, where one batch-32 run leaves the device mostly idle (default 1: one after another)")
    p.add_argument("--stress", action="store_true",
                   help="after the run (outside the budget), stress-test best.pt on the validation carve and the test "
                        "split (cxrlab stress): OUT/stress_val.json, OUT/stress_test.json, flip rates in the summary")
    p.add_argument("--stress-only", action="store_true",
                   help="no training: stress-test the finished run in --out (its config.yaml and best.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field (TrainConfig name), e.g. --set mixup=0.2, or a mapping as "
                        "--set model_kwargs=drop_path_rate:0.2,drop_rate:0.2; repeatable")
    args = p.parse_args()
    if args.parallel < 1 or args.members < 1:
        p.error("--members and --parallel must be at least 1")
    if args.parallel > 1 and args.members == 1:
        from cxrlab.members import PARALLEL_NEEDS_MEMBERS

        p.error(PARALLEL_NEEDS_MEMBERS)
    _reexec_with_allocator()

    from cxrlab.cli import setup_logging

    setup_logging()
    data = Path(args.data)
    if args.stress_only:
        from cxrlab.config import TrainConfig, load_yaml

        first = Path(args.out) / "config.yaml"
        cfg = TrainConfig.from_dict(load_yaml(first if first.is_file() else Path(args.out) / "member0" / "config.yaml"))
        print(json.dumps(stress_run(cfg, Path(args.out)), indent=2))
        return 0
    recipe = {**recipe_settings(args.recipe), "recipe": args.recipe}
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.img_size:
        recipe["img_size"] = args.img_size
    recipe.update(_overrides(args.set))
    if not args.seeds:
        print(json.dumps(run_one(args, data, recipe, args.seed, Path(args.out)), indent=2))
        return 0
    # One full budget per seed: single-seed differences of ~0.01 AUC are noise on these test sets.
    runs = [run_one(args, data, recipe, seed, Path(args.out) / f"seed{seed}") for seed in args.seeds]
    keys = ("accuracy", "auc_macro", "macro_f1")
    spread = {k: {"mean": sum(r[k] for r in runs) / len(runs), "min": min(r[k] for r in runs),
                  "max": max(r[k] for r in runs)} for k in keys}
    out = {"recipe": args.recipe, "data": str(data), "seeds": args.seeds, "runs": runs, "spread": spread}
    (Path(args.out) / "seeds_summary.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(spread, indent=2))
    return 0


def run_one(args, data: Path, recipe: dict, seed: int, out: Path) -> dict:
    """Train, select on validation and test one seed within the budget (`--members K`: K models, averaged);
    writes out/bench_summary.json."""
    t0 = time.perf_counter()
    k = max(1, args.members)
    parallel = min(max(1, args.parallel), k)
    cfgs = member_configs(data, recipe, seed, out, args.budget_min, k, parallel)
    results = train_members(cfgs, parallel)
    if k > 1:
        from cxrlab.members import ensemble_members

        ensemble_members(cfgs, out)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    summary = {"recipe": args.recipe, "data": str(data), "seed": seed, "wall_s": round(wall, 1),
               "best_epoch": results[0]["best_epoch"],
               "accuracy": metrics["accuracy"], "auc_macro": metrics["auc_macro"], "macro_f1": metrics["macro_f1"],
               "recall": {c: v["recall"] for c, v in metrics["per_class"].items()},
               "specificity": {c: v.get("specificity") for c, v in metrics["per_class"].items()},
               "groups": {g: {"n": m["n"], "accuracy": m["accuracy"]} for g, m in metrics.get("groups", {}).items()}}
    if k > 1:
        summary["members"] = []
        for cfg, result in zip(cfgs, results):
            m = json.loads((Path(cfg.out) / "metrics.json").read_text())
            summary["members"].append({"seed": cfg.seed, "best_epoch": result["best_epoch"], "accuracy": m["accuracy"],
                                       "auc_macro": m["auc_macro"], "macro_f1": m["macro_f1"]})
    cfg = cfgs[0]
    if args.stress:
        summary["stress"] = stress_run(cfg, out)
    (out / "bench_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def member_configs(data: Path, recipe: dict, seed: int, out: Path, budget_min: float, members: int = 1,
                   parallel: int = 1) -> list:
    """The TrainConfig of each member of one run: the recipe, the data's manifest when it has one, a validation carve
    grouped by Kermany patient with seed `seed`, member i seeded seed + 1000 i (cxrlab.members, as `cxrlab train
    --members K` does), and the share of `budget_min` left for training after the run's fixed costs."""
    from cxrlab.config import TrainConfig
    from cxrlab.members import member_configs as split_members

    manifest = data / "manifest.csv"
    rounds = -(-members // parallel)  # members trained one after another in each process
    # decode, calibration, test evaluation and report; with K members also K-1 more of those and the ensemble's
    # (members side by side do theirs at the same time, but share the machine while they do)
    margin = 2.5 + 0.05 * budget_min + 1.0 * (rounds - 1) + 0.25 * (members - rounds)
    base = TrainConfig(data=str(data), manifest=str(manifest) if manifest.is_file() else None, out=str(out), seed=seed,
                       split_seed=seed, group_regex=PATIENT_REGEX, val_fraction=0.15,
                       time_budget_min=max(1.0, (budget_min - margin) / rounds) * rounds, **recipe)
    return [base] if members == 1 else split_members(base, members, parallel)


def train_members(cfgs: list, parallel: int) -> list[dict]:
    """`fit` each config (with parallel > 1 side by side, cxrlab.members); the results in the order of `cfgs`."""
    from cxrlab.members import train_members as train

    done = dict(train(cfgs, parallel, progress=False))
    return [done[i] for i in range(len(cfgs))]


def stress_run(cfg, out: Path) -> dict:
    """`cxrlab stress` of out/best.pt on the run's own validation carve and on the test split: flip rates."""
    from cxrlab.evaluate import label_indices
    from cxrlab.inference import load_model_bundle
    from cxrlab.stress import stress_test, write_result
    from cxrlab.train import data_index

    bundle = load_model_bundle(out / "best.pt", device="cpu")
    index = data_index(cfg)
    flips = {}
    for split in ("val", "test"):
        samples = index.splits[split]
        arrays, ok, _ = bundle.arrays_for_files([s.path for s in samples])
        result = stress_test(bundle, arrays, label_indices([samples[i] for i in ok], bundle.class_names))
        write_result(out / f"stress_{split}", result)
        flips[split] = {r["name"]: round(r["flip_rate"], 4) for r in result["perturbations"]}
        flips[split]["mean"] = round(sum(r["flip_rate"] for r in result["perturbations"]) / len(result["perturbations"]), 4)
    return flips


if __name__ == "__main__":
    raise SystemExit(main())
