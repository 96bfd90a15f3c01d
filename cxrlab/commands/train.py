"""`cxrlab train`: options are generated from `TrainConfig`, so the CLI and the config never drift."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cxrlab.config import TrainConfig

log = logging.getLogger(__name__)

HELP = {
    "data": "data folder (ROOT/{train,val,test}/<CLASS>/* or ROOT/<CLASS>/*) or a CSV manifest",
    "out": "run folder to write (config.yaml, history.csv, best.pt, last.pt, metrics, plots)",
    "manifest": "CSV manifest path,label[,split][,group][,source]",
    "recipe": "start from a named set of settings that the config file and options then override: recommended "
              "(the benchmarks' pretrained EfficientNet-Lite0 recipe; give --time-budget-min), chestxray_cnn, "
              "custom_cnn (see `cxrlab train --list-recipes`)",
    "model": "architecture (see `cxrlab train --list-models`)",
    "pretrained": "start from ImageNet weights (hub; needs internet or a warm cache)",
    "weights": "start from a local weights file (offline machines)",
    "img_size": "square input size in pixels (default: the model's own)",
    "equalize": "histogram-equalise every radiograph (evens out exposure between sites)",
    "clahe": "contrast-limited adaptive histogram equalisation with this clip limit (e.g. 2.0; 0: off): "
             "evens out contrast region by region (instead of --equalize, which uses one curve per image)",
    "crop_border": "fraction trimmed from each side before resizing (borders, text markers)",
    "monitor": "metric that picks best.pt (--select best) and drives the scheduler and early stopping: val_loss, val_acc, val_auc",
    "select": "which epoch becomes best.pt: best (the best --monitor value) or last (the final epoch: for "
              "schedules that anneal to the end, e.g. cosine within --time-budget-min)",
    "early_stop": "stop after this many validations without improvement (0: never)",
    "class_weights": "weight the loss by inverse class frequency (reference design 2)",
    "loss": "ce or focal",
    "sampler": "shuffle, or balanced (class-balanced sampling with replacement)",
    "mixup": "mixup alpha (0: off)",
    "cutmix": "cutmix alpha (0: off)",
    "consistency": "weight of a Jensen-Shannon consistency loss between two augmented views of each image "
                   "(AugMix; e.g. 12; 0: off); each step costs about twice as much",
    "amp": "mixed precision: auto (fp16 on CUDA), off, fp16, bf16",
    "workers": "decoding processes (default: CPU count, at most 8)",
    "cache": "persistent cache of decoded, resized images (default on)",
    "cam_every": "save Grad-CAM overlays every N epochs (0: off)",
    "cam_images": "how many fixed validation images get overlays",
    "cam_method": "gradcam, gradcam++, xgradcam, eigencam, ...",
    "allow_leakage": "train even when val/test images are copies of training images",
    "time_budget_min": "stop before this many minutes of training have passed (a cosine schedule is fitted to end then, "
                       "re-fitted after each epoch on the median epoch time, or the last if slower)",
    "group_regex": "regex whose first group on the file name is the patient id (grouped validation split)",
    "split_seed": "seed of the validation carve (default: --seed); keep it fixed to train models with different "
                  "--seed on the same train/validation split, e.g. ensemble members",
    "val_fraction": "share of train carved out as validation when there is no val/ split",
    "freeze_epochs": "train only the head for this many epochs first",
    "freeze_stages": "keep the input stem and the first N stages of the pretrained backbone fixed for the whole run "
                     "(EfficientNet: 7 stages, ResNet: 4, MobileNetV3: 11 blocks); training steps get cheaper, "
                     "e.g. 1.6x (bf16) to 2.0x (fp32) with 3 on EfficientNet-Lite0 at 224 px (0: train every layer)",
    "auto_freeze": "with --time-budget-min: time a training step first and, when fewer than 10 epochs of the whole "
                   "network would fit, keep the pretrained stem and high-resolution stages (down to 1/8 of the input "
                   "size) fixed as --freeze-stages does, so that more, cheaper epochs fit (the choice is in train.log)",
    "head_init": "random, or probe: fit the new head by logistic regression on the pretrained features before "
                 "fine-tuning (LP-FT)",
    "backbone_lr_mult": "learning-rate multiplier of the backbone (discriminative learning rates)",
    "warmup_epochs": "linear learning-rate warm-up epochs",
    "grad_accum": "gradient accumulation steps (keeps the global batch when processes change)",
    "sync_bn": "SyncBatchNorm in distributed runs",
    "aug_blur": "largest Gaussian blur sigma in pixels (each image draws one from [0, v]): takes away "
                "sharpness shortcuts such as classes resized from different original sizes (0: off)",
    "aug_blur_match": "blur the sharper classes' training images more (up to twice the blur that brings a class's "
                      "median sharpness down to the least sharp class's), so that sharpness stops telling the "
                      "classes apart (`cxrlab audit` reports such differences)",
    "aug_crop_scale_min": "smallest image area kept by the random resized crop (zoom in; 1: off)",
    "aug_crop_scale_max": "largest area factor: above 1 also zooms out onto a black frame, so framing "
                          "differences between sites stop being a cue (1: off)",
    "aug_frame": "largest width of random black bands painted over the film's edges (fraction of the side; each "
                 "side of each image gets one with probability 0.5): borders and markers stop being a cue "
                 "(`cxrlab explain --regions` measures how much the edges decide; 0: off)",
    "progressive_size": "progressive resizing: the first --progressive-frac of the planned epochs train on images "
                        "shrunk to this many pixels (e.g. 160; an epoch costs about the pixel ratio, (160/224)^2 = 0.51, "
                        "so more epochs fit --time-budget-min); the rest, validation and the model train and run at "
                        "--img-size (0: off)",
    "progressive_frac": "share of the planned epochs trained at --progressive-size (the first ones)",
    "report": "draw plots and report.html at the end",
    "ema": "keep an exponential moving average of the weights with this per-step decay (e.g. 0.998; 0: off); "
           "validation, checkpoints and the final model use the averaged weights",
    "precise_bn": "re-estimate BatchNorm statistics on this many clean training images before each validation (0: off)",
    "val_every": "validate (with --precise-bn) every N epochs and after the final one (1: every epoch; 0: only the "
                 "final one): more of --time-budget-min trains, e.g. with --select last; --early-stop and the plateau "
                 "scheduler then count validations, and history.csv leaves the other epochs' val columns empty",
}
SKIP = {"model_kwargs", "target_recall"}


def field_type(field: dataclasses.Field):
    """int, float or str: how a command-line string becomes this TrainConfig field's value."""
    t = str(field.type)
    return int if "int" in t else float if "float" in t else str


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cxrlab.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{HELP.get(f.name, '')} (default {default})")
        else:
            p.add_argument(flag, type=field_type(f), default=None, help=f"{HELP.get(f.name, '')} (default {default})")
    p.add_argument("--target-recall", action="append", default=[], metavar="CLASS=RECALL",
                   help="choose the decision threshold of CLASS on validation to reach RECALL (repeatable)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture argument passed to the model's constructor, e.g. drop_path_rate=0.1 or "
                        "drop_rate=0.2 for timm models (repeatable; stored in the checkpoint)")
    p.add_argument("--config", help="YAML file of TrainConfig keys (command-line options override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pt, with the settings of its config.yaml (options given "
                        "now override them, e.g. --epochs to train longer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in --out (its checkpoints, log, report and member folders are deleted "
                        "first); without it a folder holding a run is refused")
    p.add_argument("--nproc", type=int, default=0, help="launch N processes with torchrun (DistributedDataParallel)")
    p.add_argument("--members", type=int, default=None, metavar="K",
                   help="train an ensemble: K models (seeds S, S+1000, ...) on one validation carve, each in OUT/memberI/, "
                        "averaged into OUT/best.pt (temperature fitted on that carve) and tested once; "
                        "--time-budget-min covers all K (one after another each gets 1/K)")
    p.add_argument("--parallel", type=int, default=None, metavar="P",
                   help="with --members: train P members at once in their own processes (each then gets P/K of the "
                        "budget; for GPUs: on a 2-core CPU side by side is no faster in total); default 1")
    p.add_argument("--list-models", action="store_true", help="list the registered models and exit")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes (--recipe) with their settings and exit")


def parse_target_recall(items: list[str]) -> dict[str, float]:
    """`["TUBERCULOSIS=0.95", ...]` -> {"TUBERCULOSIS": 0.95}; a clear error for anything else."""
    from cxrlab.errors import CxrlabError

    out = {}
    for item in items:
        cls, sep, val = item.partition("=")
        try:
            out[cls] = float(val)
        except ValueError:
            out[cls] = -1.0
        if not sep or not cls or not 0 < out[cls] <= 1:
            raise CxrlabError(f"--target-recall wants CLASS=RECALL with 0 < RECALL <= 1 (e.g. TUBERCULOSIS=0.95), got '{item}'")
    return out


def parse_model_args(items: list[str]) -> dict:
    """`["drop_path_rate=0.1", ...]` -> {"drop_path_rate": 0.1} (values read as YAML scalars)."""
    import yaml

    from cxrlab.errors import CxrlabError

    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.isidentifier():
            raise CxrlabError(f"--model-arg wants KEY=VALUE with KEY an argument name (e.g. drop_path_rate=0.1), got '{item}'")
        try:
            out[key] = yaml.safe_load(val)
        except yaml.YAMLError:
            out[key] = val
    return out


def _base_settings(args) -> dict:
    """The --config file's keys; on --resume without --config, the run folder's own config.yaml (every setting of the
    run, so `cxrlab train --resume --out RUN` is enough; options given with it still override)."""
    from pathlib import Path

    from cxrlab.config import TrainConfig, load_yaml
    from cxrlab.errors import CxrlabError

    if args.config:
        return load_yaml(args.config)
    if not getattr(args, "resume", False):
        return {}
    saved = Path(args.out or TrainConfig.out) / "config.yaml"
    if saved.is_file():
        log.info("--resume: settings from %s (options given now override them)", saved)
        return load_yaml(saved)
    if not args.data:
        raise CxrlabError(f"--resume: '{saved.parent}' has no config.yaml (nothing to resume there); give the run "
                          "folder as --out, or start a new run without --resume")
    return {}


def config_from_args(args) -> TrainConfig:
    """Merge: defaults < --recipe (from the options or the config file) < --config file (on --resume without
    --config: the run's config.yaml) < command-line options."""
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.recipes import with_recipe

    d = _base_settings(args)
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if f.name not in SKIP and v is not None:
            d[f.name] = v
    recall = {**(d.get("target_recall") or {}), **parse_target_recall(args.target_recall)}
    d["target_recall"] = recall
    d["model_kwargs"] = {**(d.get("model_kwargs") or {}), **parse_model_args(args.model_arg)}
    if not d.get("data"):
        raise CxrlabError("--data is required (a folder or a manifest CSV)")
    return TrainConfig.from_dict(with_recipe(d)).validate()


def _launch_torchrun(args) -> int:
    import subprocess

    argv = sys.argv[1:] if sys.argv[1:2] == ["train"] else ["train", *sys.argv[2:]]
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "cxrlab", *rest]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)


def run(args) -> int:
    if args.list_recipes:
        from cxrlab.recipes import format_recipes

        print(format_recipes())
        return 0
    if args.list_models:
        from cxrlab.models import list_models, model_spec

        for name in list_models():
            print(f"{name:22s} {model_spec(name).description}")
        return 0
    members, parallel = _ensemble_args(args)
    cfg = config_from_args(args)  # bad options fail before processes start or an earlier run is touched
    from pathlib import Path

    from cxrlab.train import guard_run_folder

    # under torchrun every process checks, and only rank 0 removes an earlier run with --overwrite
    guard_run_folder(Path(cfg.out), args.resume, args.overwrite, remove=os.environ.get("RANK", "0") == "0")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from cxrlab.training_setup import check_gpus_for_processes

        check_gpus_for_processes(args.nproc, cfg.device)
        return _launch_torchrun(args)
    if members > 1:
        return _run_members(cfg, args, members, parallel)
    from cxrlab.train import fit

    result = fit(cfg, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result['run_dir']}")
        if "test" in result:
            _print_test(result["test"])
    return 0


def _ensemble_args(args) -> tuple[int, int]:
    """--members / --parallel, on --resume defaulting to the ensemble folder's own record; refused with --nproc."""
    from pathlib import Path

    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.members import PARALLEL_NEEDS_MEMBERS, check_members, load_state

    saved = load_state(Path(args.out or TrainConfig.out)) if args.resume else {}
    members = args.members if args.members is not None else saved.get("members") or 1
    parallel = args.parallel or saved.get("parallel") or 1
    if members == 1 and args.members is None:
        if args.parallel:
            raise CxrlabError(PARALLEL_NEEDS_MEMBERS)
        return 1, 1
    check_members(members, parallel)
    if args.nproc and args.nproc > 1:
        raise CxrlabError("--members with --nproc: train the members with --parallel P instead (one process each)")
    return members, parallel


def _run_members(cfg, args, members: int, parallel: int) -> int:
    from cxrlab.members import fit_members
    from cxrlab.metrics import format_metric

    result = fit_members(cfg, members, parallel, resume=args.resume, progress=not args.quiet and parallel == 1)
    print(f"ensemble folder: {result['run_dir']} ({members} members)")
    for m in result["members"]:
        numbers = f"test accuracy {m['accuracy']:.4f}  AUC {format_metric(m['auc_macro'])}" if "accuracy" in m else "no test split"
        print(f"  member {m['member']} (seed {m['seed']}): {numbers}")
    if "test" in result:
        _print_test(result["test"])
    return 0


def _print_test(t: dict) -> None:
    from cxrlab.metrics import format_metric

    print(f"test: accuracy {t['accuracy']:.4f}  macro-F1 {t['macro_f1']:.4f}  AUC {format_metric(t['auc_macro'])}  (n={t['n']})")
