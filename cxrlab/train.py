"""`fit(cfg)`: a whole training run, from a data folder to a run folder.

Order of work: check the output folder, index the data, refuse leakage, decode once (cache),
build the model, then per epoch: train, validate, schedule, checkpoint (best by the monitored
metric, last every epoch, both atomic), append history; finally calibrate on validation, pick
operating points, evaluate `best.pt` on the test split and draw the report from the files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrlab.config import TrainConfig, save_yaml, target_recall_classes
from cxrlab.data.dataset import DataIndex, build_index
from cxrlab.data.preprocess import Preprocess
from cxrlab.engine import (ArrayData, EarlyStopping, InputSpec, StepConfig, Timer, average_buffers,
                           epoch_metrics, predict_logits, recalibrate_batchnorm, resolve_amp, train_one_epoch,
                           weight_ema)
from cxrlab.errors import CxrlabError
from cxrlab.outputs import RUN_FILES, check_output_dir
from cxrlab.progressive import cost_fraction, epoch_size, more_epochs_that_fit
from cxrlab.training_setup import (AUTO_FREEZE_BELOW_EPOCHS, AUTO_FREEZE_STRIDE, FORWARD_COST, PROBE_MAX_IMAGES,
                                   augment_config, build_criterion, build_optimizer, build_scheduler, epochs_that_fit,
                                   freeze_stages, high_resolution_stages, init_distributed, measure_step_seconds,
                                   resolve_device, set_backbone_frozen, setup_model)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds", "img_size"]


@dataclass
class SplitData:
    """Decoded images of a split plus the samples they came from."""

    arrays: ArrayData
    samples: list


# What a training run (or an ensemble of members) writes into its folder: --overwrite removes these, and only these.
RUN_OUTPUTS = ("config.yaml", "history.csv", "train.log", "best.pt", "last.pt", "metrics.json", "predictions.csv",
               "classification_report.txt", "data_summary.json", "report.html", "members.json", "history.png",
               "confusion.png", "roc.png", "pr.png", "reliability.png", "samples.png", "per_class.png")
RUN_OUTPUT_DIRS = ("cam",)  # Grad-CAM overlays per epoch (--cam-every); ensembles add memberI/


def guard_run_folder(out: Path, resume: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse to train over an earlier run in `out` (its checkpoints, log and report would be mixed with or replaced
    by the new run's) unless --resume continues it or --overwrite replaces it; --overwrite removes its files first
    (`remove=False`: only the check, for all but one of several processes)."""
    found = [name for name in RUN_FILES if (out / name).is_file()]
    if not found or resume:
        return
    if not overwrite:
        raise CxrlabError(f"'{out}' already holds a training run ({', '.join(found)}); --resume continues it, "
                          "--overwrite replaces it (its checkpoints, log and report are deleted), or choose another --out")
    if not remove:
        return
    log.info("--overwrite: removing the earlier run in %s", out)
    for name in RUN_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for d in [*(out / n for n in RUN_OUTPUT_DIRS), *out.glob("member[0-9]*")]:
        if d.is_dir():
            shutil.rmtree(d)


def load_split(index: DataIndex, split: str, pre: Preprocess, cfg: TrainConfig, progress: bool) -> SplitData:
    """Decode one split through the cache; unreadable files are skipped with one warning."""
    from cxrlab.data.cache import load_arrays

    samples = index.splits[split]
    workers = cfg.workers if cfg.workers is not None else min(os.cpu_count() or 1, 8)
    cache = False if not cfg.cache else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    arrays, ok, errors = load_arrays([s.path for s in samples], pre, cache_dir=cache, workers=workers,
                                     progress=progress, desc=f"decode {split}")
    if errors:
        listing = "; ".join(f"{p}: {r}" for p, r in list(errors.items())[:20])
        log.warning("skipped %d unreadable file(s) in %s: %s%s", len(errors), split, listing, " ..." if len(errors) > 20 else "")
    kept = [samples[i] for i in ok]
    if not kept:
        raise CxrlabError(f"no readable images in the {split} split of '{index.root}'")
    lookup = {c: i for i, c in enumerate(index.class_names)}
    labels = torch.tensor([lookup[s.label] for s in kept], dtype=torch.long)
    return SplitData(ArrayData(torch.from_numpy(arrays), labels), kept)


def _leak_check(index: DataIndex, cfg: TrainConfig) -> None:
    try:
        from cxrlab.audit import fast_leak_check
    except ImportError:
        return
    samples = [s for ss in index.splits.values() for s in ss]
    leaks = fast_leak_check(samples)
    if not leaks:
        return
    lines = "\n".join(f"  {d['b']} ({d['b_split']}) == {d['a']} ({d['a_split']})" for d in leaks[:10])
    msg = f"{len(leaks)} validation/test image(s) are exact copies of training images:\n{lines}"
    if not cfg.allow_leakage:
        raise CxrlabError(msg + "\nRemove the copies (see `cxrlab audit`) or pass --allow-leakage to train anyway")
    log.warning("%s\n(--allow-leakage given: training anyway; the evaluation will be optimistic)", msg)


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(".history.csv.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _fmt(v: float) -> float | str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 6)


def make_checkpoint(model, cfg: TrainConfig, class_names, pre: Preprocess, spec: InputSpec, epoch: int,
                    metric: tuple[str, float], history: list[dict], model_kwargs: dict, **extra) -> dict:
    """The checkpoint dict (see docs/ARCHITECTURE.md)."""
    core = model.module if hasattr(model, "module") else model
    core = getattr(core, "_orig_mod", core)
    return {
        "model": {"name": cfg.model, "kwargs": model_kwargs, "num_classes": len(class_names), "in_chans": spec.in_chans},
        "class_names": list(class_names), "img_size": pre.img_size, "mean": list(spec.mean), "std": list(spec.std),
        "preprocess": pre.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "config": cfg.to_dict(), "epoch": epoch, "metric": {"name": metric[0], "value": float(metric[1])},
        "temperature": 1.0, "history": history, **extra,
    }


def data_index(cfg: TrainConfig):
    """The run's splits: the data's own, with validation carved from train (seed `cfg.carve_seed`) when it has none."""
    return build_index(cfg.data, cfg.manifest, val_fraction=cfg.val_fraction, seed=cfg.carve_seed,
                       group_regex=cfg.group_regex)


# an epoch that fits the time budget to within this fraction still runs (the mid-epoch guard trims its end)
BUDGET_SLACK = 0.1


class Run:
    """State of one training run (kept small: everything else is derived or in the checkpoint)."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg, self.resume = cfg.validate(), resume
        self.dist = init_distributed(cfg.device)
        self.device = resolve_device(cfg.device, self.dist)
        self.out = Path(cfg.out)
        self.progress = True
        self.history: list[dict] = []
        self.eval_s: float | None = None  # seconds of the last validation (precise BN included)
        self.planned_end: int | None = None  # the epoch the time budget expects to be the last
        self.full_size_seen = False  # --progressive-size: an epoch has trained at the full size (the rest will too)

    def prepare_data(self) -> None:
        cfg = self.cfg
        self.index = data_index(cfg)
        for note in self.index.notes:
            log.info("%s", note)
        _leak_check(self.index, cfg)
        target_recall_classes(cfg.target_recall, self.index.class_names)  # before training, not after it
        self.splits = {}
        for split in ("train", "val", "test"):
            if split in self.index.splits:
                if self.dist.world > 1 and not self.dist.main:
                    torch.distributed.barrier()  # rank 0 fills the cache first
                self.splits[split] = load_split(self.index, split, self.pre, cfg, self.progress and self.dist.main)
                if self.dist.world > 1 and self.dist.main:
                    torch.distributed.barrier()
        counts = {sp: {c: int((d.arrays.labels == i).sum()) for i, c in enumerate(self.index.class_names)}
                  for sp, d in self.splits.items()}
        log.info("data: %s", ", ".join(f"{sp} {sum(c.values())}" for sp, c in counts.items()))
        self.counts = counts

    def setup(self) -> None:
        cfg = self.cfg
        names = self.index.class_names
        torch.manual_seed(cfg.seed)  # same initial weights for a given seed, whatever the world size
        self.model, self.spec, self.model_kwargs = setup_model(cfg, len(names), self.pre, self.device)
        self._check_progressive_size()
        n_params = sum(p.numel() for p in self.model.parameters())
        self.amp = resolve_amp(cfg.amp, self.device)  # the precision used: a CPU without native bf16 trains in fp32
        log.info("model %s: %.2fM parameters, input %d px x %d channel(s), device %s, %s, world size %d%s",
                 cfg.model, n_params / 1e6, self.pre.img_size, self.spec.in_chans, self.device,
                 {"off": "fp32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[self.amp], self.dist.world,
                 f"; recipe {cfg.recipe} (every setting in config.yaml)" if cfg.recipe else "")
        self.criterion = build_criterion(cfg, self.splits["train"].arrays.labels, len(names), self.device)
        resumed = self._resume_checkpoint() if self.resume else None
        self.pre_loop_s = 0.0  # budget time spent before the loop (--auto-freeze's measurement)
        self.frozen_stages = self._auto_freeze(resumed) if cfg.auto_freeze else cfg.freeze_stages
        self.fixed = freeze_stages(self.model, self.frozen_stages, cfg.model)
        if self.fixed:
            n_fixed = sum(p.numel() for p in self.model.parameters() if id(p) in self.fixed)
            log.info("stem and first %d stage(s) fixed (%s): %.2fM of %.2fM parameters train", self.frozen_stages,
                     "--auto-freeze" if cfg.auto_freeze else "--freeze-stages", (n_params - n_fixed) / 1e6, n_params / 1e6)
        if self.dist.main:
            check_output_dir(self.out, "--out", need_bytes=n_params * 4 * 5 + 50_000_000)  # checkpoints
        if cfg.sync_bn and self.dist.world > 1 and self.device.type != "cuda":
            log.warning("--sync-bn ignored: PyTorch's SyncBatchNorm runs on CUDA GPUs only; on %s each process "
                        "keeps its own BatchNorm batch statistics", self.device.type)
        elif cfg.sync_bn and self.dist.world > 1:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" and self.amp == "fp16" else None
        self.stopper = EarlyStopping(cfg.monitor, cfg.early_stop)
        self.ema = weight_ema(self.model, cfg.ema) if cfg.ema else None
        self.start_epoch = 1
        if resumed is not None:
            self._load_resume_state(resumed)
        self.train_model = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def _check_progressive_size(self) -> None:
        """--progressive-size must be below --img-size, and needs a model that takes any input size (global
        pooling): one forward pass at that size in eval mode (BatchNorm statistics untouched) tells, before any
        time is spent."""
        size = self.cfg.progressive_size
        if not size:
            return
        if size >= self.pre.img_size:
            raise CxrlabError(f"--progressive-size {size} must be smaller than the training size "
                              f"({self.pre.img_size} px, --img-size): e.g. --progressive-size {self.pre.img_size * 5 // 7}")
        x = torch.zeros(1, self.spec.in_chans, size, size, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(x)
        except RuntimeError as exc:
            raise CxrlabError(f"--progressive-size {size}: model {self.cfg.model} does not take {size} px images, only "
                              f"--img-size ({self.pre.img_size} px; {str(exc).splitlines()[0]}). Use a model with global "
                              "pooling (e.g. efficientnet_lite0, resnet18, small_cnn) or drop --progressive-size") from None
        finally:
            self.model.train(was_training)

    @property
    def _micro(self) -> int:
        """Images per process per step (the global batch split over processes and accumulation steps)."""
        return max(1, self.cfg.batch_size // (self.dist.world * self.cfg.grad_accum))

    def _probe_images(self) -> tuple[int, int]:
        """--head-init probe's work: (BatchNorm re-estimation images, feature images)."""
        return self.cfg.precise_bn or 1024, min(len(self.splits["train"].arrays), PROBE_MAX_IMAGES)

    def _auto_freeze(self, resumed: dict | None) -> int:
        """--auto-freeze: how many stages stay fixed, from one measured training step and the time budget.

        A resumed run keeps its first choice (last.pt records it). Otherwise, for a pretrained model with a
        stage layout cxrlab knows, a few training steps of the whole network are timed on a copy (rank 0's
        time on every rank; the seconds count against the budget) and the epochs that fit are estimated;
        below AUTO_FREEZE_BELOW_EPOCHS the high-resolution stages stay fixed.
        """
        cfg, t = self.cfg, Timer()
        if resumed is not None:
            n = int(resumed["train_state"].get("frozen_stages", 0))
            log.info("--auto-freeze: resuming with the first run's choice, %d fixed stage(s)", n)
            return n
        k = high_resolution_stages(self.model, self.pre.img_size, self.spec.in_chans)
        if not (cfg.pretrained or cfg.weights) or k == 0:
            log.info("--auto-freeze: every layer trains (%s)", f"model {cfg.model} has no stage layout cxrlab knows"
                     if k == 0 else "the model starts from random weights, nothing pretrained to keep")
            return 0
        train, world = self.splits["train"].arrays, self.dist.world
        micro = self._micro
        step = StepConfig(micro, cfg.seed, 0, len(self.index.class_names), augment_config(cfg), cfg.sampler,
                          cfg.mixup, cfg.cutmix, self.amp, 1, False, cfg.consistency)
        step_s = self._rank0_value(measure_step_seconds(self.model, train, self.criterion, self.spec, step, self.device,
                                                        cfg))
        n_probe = sum(self._probe_images()) if cfg.head_init == "probe" else 0
        n_eval = math.ceil(len(self.splits["val"].arrays) / world) + cfg.precise_bn
        if cfg.val_every != 1:  # --val-every: a share of a validation per epoch, and the final one
            n_probe, n_eval = n_probe + n_eval, n_eval / cfg.val_every if cfg.val_every > 1 else 0
        fit, epoch_s = epochs_that_fit(step_s, micro, math.ceil(len(train) / world), n_eval, n_probe,
                                       cfg.time_budget_min * 60 - t())
        self.pre_loop_s = t()
        head = (f"--auto-freeze: about {fit:.1f} epochs of the whole network fit the {cfg.time_budget_min:g} min budget "
                f"({epoch_s:.0f} s each from a measured step of {step_s:.2f} s)")
        if fit >= AUTO_FREEZE_BELOW_EPOCHS:
            log.info("%s: every layer trains", head)
            return 0
        log.info("%s, fewer than %d: the stem and the %d stage(s) at 1/%d of the input size or more stay fixed, "
                 "so that steps get cheaper and more epochs fit", head, AUTO_FREEZE_BELOW_EPOCHS, k, AUTO_FREEZE_STRIDE)
        return k

    def _resume_checkpoint(self) -> dict:
        """--resume: the run folder's last.pt, loaded once (a clear error when there is none)."""
        from cxrlab.checkpoint import load_checkpoint

        path = self.out / "last.pt"
        if not path.is_file():
            raise CxrlabError(f"--resume: no last.pt in '{self.out}' (nothing to resume). Run without --resume to start")
        ckpt = load_checkpoint(path, map_location=self.device)
        if "train_state" not in ckpt or "config" not in ckpt:
            raise CxrlabError(f"--resume: '{path}' holds no training state (optimizer, schedule): it was replaced by a "
                              f"copy written by another command, e.g. calibrate or adapt. Resume is not possible; start "
                              f"again with --overwrite, or use best.pt as it is")
        return ckpt

    def _load_resume_state(self, ckpt: dict) -> None:
        path = self.out / "last.pt"
        old = ckpt["config"]
        for key in ("model", "img_size", "seed", "split_seed", "batch_size", "freeze_stages", "auto_freeze",
                    "progressive_size", "progressive_frac"):
            if old.get(key, getattr(TrainConfig, key)) != getattr(self.cfg, key):
                raise CxrlabError(f"--resume: {key} was {old.get(key)!r} in '{path}' but is {getattr(self.cfg, key)!r} now; "
                                  "resume with the original settings")
        if ckpt["class_names"] != self.index.class_names:
            raise CxrlabError(f"--resume: '{path}' was trained on classes {ckpt['class_names']}, the data has {self.index.class_names}")
        st = ckpt["train_state"]
        if bool(self.ema) != ("ema_n" in st):
            raise CxrlabError(f"--resume: '{path}' was trained {'with' if 'ema_n' in st else 'without'} --ema; resume with "
                              "the original settings")
        if self.ema is not None:  # last.pt holds the averaged weights; the raw ones are in train_state
            self.model.load_state_dict(st["model"])
            self.ema.module.load_state_dict(ckpt["state_dict"])
            self.ema.n_averaged.fill_(int(st["ema_n"]))
        else:
            self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("scheduler"):
            self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.stopper.load_state_dict(st["stopper"])
        self.history = list(ckpt["history"])
        self.planned_end = st.get("planned_end")
        self.full_size_seen = any(int(r.get("img_size") or 0) >= self.pre.img_size for r in self.history)
        self.start_epoch = int(ckpt["epoch"]) + 1
        log.info("resuming from %s after epoch %d", path, ckpt["epoch"])

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated, saved and shipped: the EMA when --ema is on."""
        return self.ema.module if self.ema is not None else self.model

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _warmup_hook(self, epoch: int, n_batches: int):
        w = self.cfg.warmup_epochs
        if epoch > w:
            return None

        def hook(i: int) -> None:
            frac = ((epoch - 1) * n_batches + i + 1) / (w * n_batches)
            for gr in self.optimizer.param_groups:
                gr["lr"] = gr["base_lr"] * frac
        return hook

    @property
    def _small_size(self) -> int:
        """--progressive-size while it can still apply, else 0: once an epoch has trained at the full size the rest
        do too (a re-fit of the budget that moves the planned end later never sends training back to small images)."""
        return 0 if self.full_size_seen else self.cfg.progressive_size

    def epoch_size(self, epoch: int) -> int:
        """The image size epoch `epoch` trains at: --img-size, or --progressive-size early in the planned run."""
        cfg = self.cfg
        return epoch_size(epoch, self.planned_end or cfg.epochs, self.pre.img_size, self._small_size,
                          cfg.progressive_frac)

    def run_epoch(self, epoch: int, size: int) -> dict:
        """Train one epoch (on images shrunk to `size` px when smaller than --img-size); its history row with the
        validation columns still empty (see `validate_epoch`)."""
        cfg, t = self.cfg, Timer()
        if cfg.freeze_epochs:
            set_backbone_frozen(self.model, epoch <= cfg.freeze_epochs, self.fixed)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout and other module randomness
        train = self.splits["train"].arrays
        step = StepConfig(cfg.batch_size, cfg.seed, epoch, len(self.index.class_names), self.augment, cfg.sampler,
                          cfg.mixup, cfg.cutmix, self.amp, cfg.grad_accum, self.progress, cfg.consistency,
                          size=size if size < self.pre.img_size else 0)
        micro = self._micro
        n_batches = math.ceil(math.ceil(len(train) / self.dist.world) / micro)
        on_step = (lambda: self.ema.update_parameters(self.model)) if self.ema is not None else None
        tr = train_one_epoch(self.train_model, train, self.optimizer, self.criterion, self.spec, step, self.device,
                             self.dist, self.scaler, on_batch=self._warmup_hook(epoch, n_batches), on_step=on_step,
                             stop=self._budget_stop(micro))
        self.cut_short = tr["batches"] < n_batches
        if self.cut_short:
            log.info("time budget: epoch %d ended after %d of %d batches to leave time for validation", epoch,
                     tr["batches"], n_batches)
        return {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": None, "val_acc": None,
                "val_auc": None, "lr": self._lr(), "seconds": t(), "img_size": size}

    def validate_epoch(self, row: dict) -> None:
        """Precise BN and the validation pass on the weights that are shipped; fills `row` in place."""
        cfg, t = self.cfg, Timer()
        if cfg.precise_bn:
            recalibrate_batchnorm(self.eval_model, self.splits["train"].arrays.images, self.spec, self.device,
                                  n=cfg.precise_bn, seed=cfg.seed + row["epoch"], amp=self.amp)
        average_buffers(self.eval_model, self.dist)
        val = self.splits["val"].arrays
        logits = predict_logits(self.eval_model, val.images, self.spec, self.device, amp=self.amp, dist=self.dist)
        vm = epoch_metrics(logits, val.labels.numpy())
        self.eval_s = self._rank0_value(t())
        row.update(val_loss=vm["loss"], val_acc=vm["acc"], val_auc=vm["auc"], seconds=row["seconds"] + self.eval_s)

    def _validates(self, epoch: int) -> bool:
        """--val-every: whether this epoch is validated before the budget has spoken (every N-th, the last of
        --epochs, and the one the time budget expects to be the last; a run that stops elsewhere validates its
        final epoch then)."""
        n = self.cfg.val_every
        return n == 1 or (n > 1 and epoch % n == 0) or epoch >= self.cfg.epochs or epoch == self.planned_end

    def _eval_estimate(self) -> float:
        """Seconds of one validation (precise BN included): measured once there was one, before that from the
        training speed (FORWARD_COST of a training step per image, as the mid-epoch guard assumes)."""
        if self.eval_s is not None:
            return self.eval_s
        n_train = math.ceil(len(self.splits["train"].arrays) / self.dist.world)
        n_eval = math.ceil(len(self.splits["val"].arrays) / self.dist.world) + self.cfg.precise_bn
        return self.train_s / max(n_train, 1) * n_eval * FORWARD_COST

    def _schedule(self, epoch: int, row: dict) -> None:
        if epoch <= self.cfg.warmup_epochs or self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if row[self.cfg.monitor] is not None:  # steps on validated epochs only (--val-every)
                self.scheduler.step(row[self.cfg.monitor])
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) and \
                self.scheduler.last_epoch >= self.scheduler.T_max:
            return  # a budget-shortened schedule has ended: stay at the minimum (stepping on would climb again)
        else:
            with warnings.catch_warnings():  # fp16's GradScaler skips the steps whose gradients overflowed
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.scheduler.step()

    def save(self, epoch: int, row: dict, is_best: bool) -> None:
        metric = (self.cfg.monitor, row[self.cfg.monitor] if row[self.cfg.monitor] != "" else float("nan"))
        base = make_checkpoint(self.eval_model, self.cfg, self.index.class_names, self.pre, self.spec, epoch, metric,
                               self.history, self.model_kwargs)
        from cxrlab.checkpoint import save_checkpoint

        if is_best:
            save_checkpoint(base, self.out / "best.pt")
        state = {"optimizer": self.optimizer.state_dict(), "stopper": self.stopper.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "frozen_stages": self.frozen_stages, "planned_end": self.planned_end}
        if self.ema is not None:
            state.update(model={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                         ema_n=int(self.ema.n_averaged))
        save_checkpoint({**base, "train_state": state}, self.out / "last.pt")

    def loop(self) -> None:
        cfg, t = self.cfg, Timer()
        self.augment = augment_config(self.cfg, self._class_blur())
        if self.dist.main:
            _write_history(self.out / "history.csv", self.history)
        t.t0 -= self.pre_loop_s  # the budget's clock started before the loop
        self.loop_start = t.t0
        if cfg.head_init == "probe" and self.start_epoch == 1:
            self._probe_head()  # inside the time budget
        # the budget is fitted on the epochs that train the whole network (frozen epochs are cheaper)
        fit_epoch, self.full_epochs = max(self.start_epoch, cfg.freeze_epochs + 1), []
        last_size = None
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            epoch_t0 = t()
            size = self.epoch_size(epoch)
            if cfg.progressive_size and size != last_size:
                log.info("progressive resizing: epoch %d trains at %d px", epoch, size)
            last_size = size
            row = self.run_epoch(epoch, size)
            self.full_size_seen |= size == self.pre.img_size
            train_s = row["seconds"]
            self.train_s = train_s / cost_fraction(size, self.pre.img_size)  # what it would cost at the full size
            validated = self._validates(epoch)
            if validated:
                self.validate_epoch(row)
            self._schedule(epoch, row)
            # what an epoch costs the budget: with --val-every N > 1 its training and a share of a validation
            # (in epochs at the full size: a --progressive-size epoch's training is scaled up by the pixel ratio)
            n = cfg.val_every
            cost = t() - epoch_t0 + self.train_s - train_s if n == 1 else \
                self.train_s + (self._eval_estimate() / n if n > 1 else 0.0)
            out_of_time = self._budget_after_epoch(epoch, t(), cost, full=epoch >= fit_epoch and not self.cut_short,
                                                   at_full_size=size == self.pre.img_size)
            if out_of_time and not validated:  # the run ends here: its final weights get validated now
                self.validate_epoch(row)
                validated = True
            row = {k: (v if k in ("epoch", "img_size") else _fmt(v)) for k, v in row.items()}
            is_best = validated and self.stopper.step(float(row[cfg.monitor] if row[cfg.monitor] != "" else "nan"),
                                                      epoch)
            self.history.append(row)
            if self.dist.main:
                _write_history(self.out / "history.csv", self.history)
                self.save(epoch, row, validated and (is_best or cfg.select == "last"))
                self._on_epoch_end(epoch)
            log.info("epoch %d/%d  train loss %.4f acc %.3f | %s | lr %.2g | %.1fs%s", epoch, cfg.epochs,
                     row["train_loss"], row["train_acc"],
                     f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} auc {row['val_auc']}" if validated
                     else f"not validated (--val-every {cfg.val_every})", row["lr"], row["seconds"],
                     "  *best*" if is_best else "")
            if self.stopper.should_stop:
                log.info("early stopping: %s has not improved for %d validations (best %.4f at epoch %d)", cfg.monitor,
                         cfg.early_stop, self.stopper.best, self.stopper.best_epoch)
                break
            if out_of_time:
                log.info("time budget of %.1f min: stopping after epoch %d", cfg.time_budget_min, epoch)
                break

    def _class_blur(self) -> tuple[float, ...]:
        """--aug-blur-match: the extra blur per class that takes sharpness away as a class cue."""
        if not self.cfg.aug_blur_match:
            return ()
        from cxrlab.data.augment import sharpness_matching_blur

        train, names = self.splits["train"].arrays, self.index.class_names
        top, info = sharpness_matching_blur(train.images, train.labels, len(names), seed=self.cfg.seed)
        log.info("sharpness matching (--aug-blur-match): median sharpness %s; extra blur up to %s px",
                 ", ".join(f"{names[c]} {m:.2f}" for c, m in info["median"].items()),
                 ", ".join(f"{n} {v:.2f}" for n, v in zip(names, top)) or "none (fewer than two classes)")
        return top

    def _probe_head(self) -> None:
        """--head-init probe: the head fitted on frozen features (every rank alike; rank 0's is broadcast)."""
        from cxrlab.training_setup import probe_head

        train, t = self.splits["train"].arrays, Timer()
        # features as training will see them: BatchNorm statistics of these radiographs, not ImageNet's
        n_bn, n_features = self._probe_images()
        recalibrate_batchnorm(self.model, train.images, self.spec, self.device, n=n_bn,
                              seed=self.cfg.seed, amp=self.amp)
        info = probe_head(self.model, train.images, train.labels, self.spec, self.device,
                          balanced=self.cfg.class_weights, amp=self.amp, max_images=n_features, seed=self.cfg.seed)
        if self.dist.world > 1:
            for p in self.model.parameters():
                torch.distributed.broadcast(p.data, src=0)
        log.info("head initialised by a linear probe on %d training images (train accuracy %.3f, %.0f s)",
                 info["images"], info["train_acc"], t())

    def _budget_stop(self, micro: int):
        """With --time-budget-min, a callback that ends an epoch early when finishing it would overrun the
        budget: it stops once now + the expected validation time (forward passes over the validation and
        precise-BN images, FORWARD_COST of a training step per image) passes the deadline."""
        cfg = self.cfg
        if not cfg.time_budget_min:
            return None
        deadline = self.loop_start + cfg.time_budget_min * 60
        n_eval = len(self.splits["val"].arrays) + (cfg.precise_bn or 0)
        start = time.perf_counter()

        def stop(done: int) -> bool:
            now = time.perf_counter()
            per_image = (now - start) / (done * micro)
            return now + per_image * n_eval * FORWARD_COST > deadline
        return stop

    def _budget_after_epoch(self, epoch: int, elapsed_s: float, epoch_s: float, full: bool,
                            at_full_size: bool = True) -> bool:
        """With --time-budget-min: re-fit the cosine schedule after a full epoch and say whether to stop.

        One count of the epochs that still fit serves both, so the run stops where the schedule ends. The
        next epoch is expected to cost the median of the full epochs so far (a slow first epoch, from a cold
        page cache or decoding, does not set the pace of the whole run), or the epoch just finished when that
        was slower (the machine got busier); an epoch that fits to within a tenth still counts (the mid-epoch
        guard trims its end if need be), so that a few seconds of noise on long epochs do not end the
        schedule an epoch early. The run stops when no epoch fits, when the mid-epoch guard cut this one
        short, or when the schedule has already reached its minimum (more epochs would train at a zero
        learning rate: the cosine cannot climb back).

        Args:
            epoch: the epoch just finished.
            elapsed_s: seconds since the loop started (the linear probe and decoding included).
            epoch_s: what this epoch cost: its training and validation, or with --val-every N > 1 its
                training and 1/N of a validation (the final validation is then set aside from the time left).
            full: whether it trained the whole network to the end (not frozen, not cut short).
            at_full_size: whether it trained at --img-size (with --progressive-size, the next epoch's cost is the
                median of those once there are any, since a small epoch scaled by the pixel ratio is an estimate).
        """
        cfg = self.cfg
        if not cfg.time_budget_min:
            return False
        cosine = isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        if cosine and cfg.warmup_epochs < epoch < cfg.epochs and self.scheduler.last_epoch >= self.scheduler.T_max:
            log.info("time budget: the cosine schedule reached its minimum at epoch %d; stopping with %.0f s of the "
                     "budget left", epoch, max(0.0, cfg.time_budget_min * 60 - elapsed_s))
            return True
        if full:
            self.full_epochs.append((epoch_s, at_full_size))
        costs = [s for s, at_full in self.full_epochs if at_full] or [s for s, _ in self.full_epochs]
        next_s = max(statistics.median(costs), epoch_s) if costs else epoch_s
        left_s = cfg.time_budget_min * 60 - elapsed_s
        if cfg.val_every != 1:  # the last epoch's validation, not in the per-epoch cost
            left_s -= self._eval_estimate()
        budget = self._rank0_value(max(0.0, left_s / max(next_s, 1e-9) + BUDGET_SLACK))  # same on every rank
        small = self._small_size
        more = more_epochs_that_fit(epoch, budget, cfg.epochs, self.pre.img_size, small, cfg.progressive_frac) if small \
            else int(budget)
        if full and cosine:
            self._fit_cosine_to_budget(epoch + more, next_s)
        self.planned_end = min(epoch + more, cfg.epochs)
        return self.cut_short or more == 0

    def _fit_cosine_to_budget(self, fit: int, epoch_s: float) -> None:
        """Make the cosine schedule end at epoch `fit`, so that the learning rate reaches its minimum when
        the budget ends instead of being cut off half-way (capped at --epochs; never behind the steps already
        taken). `epoch_s` (the expected cost of an epoch) is only logged.

        Called after every full epoch: the schedule's end moves when the estimate does. PyTorch's cosine
        steps are relative (each multiplies the distance to the minimum by a ratio of cosines), so moving
        T_max bends the curve from the current learning rate: it never jumps and still ends at the minimum.
        """
        cfg = self.cfg
        fit = min(fit, cfg.epochs)
        t_max = max(1, self.scheduler.last_epoch, fit - cfg.warmup_epochs)
        if t_max == self.scheduler.T_max:
            return
        self.scheduler.T_max = t_max
        log.info("time budget: about %d of %d epochs fit in %.1f min (%.0f s an epoch); cosine schedule ends at epoch %d",
                 fit, cfg.epochs, cfg.time_budget_min, epoch_s, t_max + cfg.warmup_epochs)

    def _rank0_value(self, value: float) -> float:
        """Rank 0's value of a clock-derived number on every rank."""
        if self.dist.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def _on_epoch_end(self, epoch: int) -> None:
        cfg = self.cfg
        if cfg.cam_every and epoch % cfg.cam_every == 0:
            if not hasattr(self, "cams"):
                from cxrlab.explain import TrainingCams

                val = self.splits["val"]
                k = min(cfg.cam_images, len(val.samples))
                pick = np.linspace(0, len(val.samples) - 1, k).round().astype(int)
                self.cams = TrainingCams(self.out / "cam", val.arrays.images[pick], val.arrays.labels[pick],
                                         [val.samples[i].path.stem for i in pick], self.index.class_names, self.spec,
                                         cfg.model, cfg.cam_method, self.device)
            self.cams.on_epoch_end(epoch, self.eval_model)


def fit(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train a model as configured and write the run folder.

    Args:
        cfg: the configuration.
        resume: continue from `cfg.out/last.pt`.
        progress: show progress bars.

    Returns:
        Summary: run folder, best epoch and metric, and the test metrics when there is a test split.
    """
    run = Run(cfg, resume)
    run.progress = progress
    from cxrlab.training_setup import resolve_preprocess

    run.pre = resolve_preprocess(cfg)
    handler = _attach_log_file(run)
    try:
        run.prepare_data()
        run.setup()
        if run.dist.main:
            save_yaml(cfg, run.out / "config.yaml")
            import json

            (run.out / "data_summary.json").write_text(json.dumps(run.counts, indent=2))
        run.loop()
        result = {"run_dir": str(run.out), "best_epoch": run.stopper.best_epoch, "best": run.stopper.best}
        if cfg.select == "last" and run.history:
            result.update(best_epoch=run.history[-1]["epoch"], best=run.history[-1][cfg.monitor])
        if run.dist.main:
            from cxrlab.finalize import finalize_run

            result.update(finalize_run(run))
        return result
    except Exception as exc:
        if handler is not None:  # into train.log only: the console gets the error from the caller
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s: %s",
                                          (type(exc).__name__, exc), None))
        raise
    finally:
        if handler is not None:
            detach_log_file(handler)
        if run.dist.world > 1:
            if sys.exc_info()[0] is None:  # after a failure, exit at once (torchrun stops the other ranks)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _attach_log_file(run: Run):
    if not run.dist.main:
        logging.getLogger("cxrlab").setLevel(logging.WARNING)
        return None
    check_output_dir(run.out)
    return attach_log_file(run.out / "train.log")


def attach_log_file(path: Path) -> logging.Handler:
    """Append cxrlab's INFO messages and above to `path` (with time stamps) until `detach_log_file`."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("cxrlab")
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def detach_log_file(handler: logging.Handler) -> None:
    logging.getLogger("cxrlab").removeHandler(handler)
    handler.close()
