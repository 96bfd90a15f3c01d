"""The training and evaluation steps: `train_one_epoch` and `predict_logits` over in-memory uint8 data.

Images are decoded once (see `cxrlab.data.cache`) into a uint8 tensor; each epoch draws its batch
order and augmentation from generators seeded by (seed, epoch), so epoch k gives the same result
whether the run was resumed or not. In a distributed run every rank draws the same order and takes
its own shard; evaluation gathers all shards so metrics cover every sample exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlab.data.augment import AugmentConfig, augment_batch
from cxrlab.data.preprocess import to_model_input
from cxrlab.progressive import scaled_augment, shrink

log = logging.getLogger(__name__)


@dataclass
class ArrayData:
    """Decoded images of one split: uint8 (N, S, S) with integer labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DistInfo:
    """Rank and world size (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class InputSpec:
    """How uint8 images become model input."""

    mean: list
    std: list
    in_chans: int
    channels_last: bool = False


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63 - 1))


def epoch_order(labels: torch.Tensor, seed: int, epoch: int, sampler: str = "shuffle") -> torch.Tensor:
    """The epoch's sample order: a permutation, or a class-balanced draw with replacement."""
    g = epoch_generator(seed, epoch, salt=1)
    n = len(labels)
    if sampler == "balanced":
        counts = torch.bincount(labels).float()
        w = (1.0 / counts.clamp(min=1))[labels]
        return torch.multinomial(w, n, replacement=True, generator=g)
    return torch.randperm(n, generator=g)


def shard(indices: torch.Tensor, dist: DistInfo, pad: bool = True) -> torch.Tensor:
    """This rank's share of `indices` (padded by wrapping so all ranks get equal lengths when `pad`)."""
    if dist.world == 1:
        return indices
    if pad:
        total = math.ceil(len(indices) / dist.world) * dist.world
        indices = torch.cat([indices, indices[: total - len(indices)]])
    return indices[dist.rank :: dist.world]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 or AMX on x86, oneDNN's own check elsewhere.

    Without it, CPU autocast emulates bf16 and is far slower than fp32 (measured on a 2-core AVX2 AMD EPYC:
    EfficientNet-Lite0 training 2.3 against 11.8 images/s, inference 6.5 against 51.5; docs/BENCHMARKS.md).
    """
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private helpers that a future PyTorch may move
        return False


def resolve_amp(amp: str, device: torch.device, native_bf16: bool | None = None) -> str:
    """The precision a run actually uses for `--amp`: "off", "fp16" or "bf16".

    auto: fp16 (with a GradScaler) on CUDA, fp32 elsewhere. On a CPU, bf16 (and fp16, which CPU autocast
    runs as bf16) needs native bf16: emulated it is several times slower than fp32, so it falls back to
    fp32 with a warning that says why.
    """
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "off"
    if amp in ("bf16", "fp16") and device.type == "cpu":  # CPU autocast is bf16 either way
        if not (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
            log.warning("--amp %s: this CPU has no native bf16 (AVX512-BF16 or AMX), so autocast would emulate it, "
                        "several times slower than fp32 (6x in training on an AVX2 EPYC); running in fp32 instead", amp)
            return "off"
        return "bf16"
    return amp


def autocast_context(device: torch.device, amp: str):
    """Mixed precision: fp16 on CUDA (with GradScaler), bf16 on CPU when asked, else nothing."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" or device.type != "cuda" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_depthwise_fp32(model: nn.Module) -> int:
    """Run depthwise convolutions in fp32 under CPU bf16 autocast; returns how many were hooked.

    oneDNN's bf16 kernels make dense convolutions about 1.7x faster on CPUs with native bf16, but its
    bf16 depthwise-convolution backward is slower than fp32, so EfficientNet / MobileNet models trained
    *slower* in bf16 than in fp32 (measured: docs/PERFORMANCE.md). Forward hooks switch autocast off
    around each depthwise layer (input cast to fp32) and back on after it; outside CPU bf16 autocast
    they do nothing. Weights, state_dict keys and checkpoints are unchanged.
    """
    hooked = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            module.register_forward_pre_hook(_depthwise_enter)
            module.register_forward_hook(_depthwise_exit)
            hooked += 1
    return hooked


def _depthwise_enter(module: nn.Module, args: tuple):
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        torch.set_autocast_enabled("cpu", False)  # torch.autocast's __exit__ restores it even on error
        module._cxrlab_autocast_off = True
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)
    return None


def _depthwise_exit(module: nn.Module, args: tuple, output):
    if module.__dict__.pop("_cxrlab_autocast_off", False):
        torch.set_autocast_enabled("cpu", True)
    return None


def weight_ema(model: nn.Module, decay: float):
    """An exponential moving average of `model`'s weights (torch's `AveragedModel`), updated per step.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates (as timm's ModelEmaV2 and
    TensorFlow's ExponentialMovingAverage do), so early epochs are not dominated by the initial
    weights. BatchNorm buffers are averaged too; `recalibrate_batchnorm` then re-estimates them.
    """
    from torch.optim.swa_utils import AveragedModel

    def lerp(averaged: list, current: list, n: torch.Tensor) -> None:
        k = float(n)
        d = min(decay, (1.0 + k) / (10.0 + k))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():
                a.copy_(c)

    ema = AveragedModel(model, multi_avg_fn=lerp, use_buffers=True)
    ema.requires_grad_(False)
    return ema


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) with optional class weights."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        if target.ndim == 1:
            target = F.one_hot(target, logits.shape[1]).float()
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[1]
        focal = (1 - logp.exp()).pow(self.gamma)
        w = self.weight if self.weight is not None else torch.ones(logits.shape[1], device=logits.device)
        return -(w * target * focal * logp).sum(1).mean()


def soft_cross_entropy(logits, target, weight=None, label_smoothing: float = 0.0):
    """Cross-entropy that accepts integer or (mixed) probability targets."""
    return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=label_smoothing)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix (one chosen per batch at random when both are on) with soft targets."""
    y1 = F.one_hot(y, num_classes).float()
    if mixup <= 0 and cutmix <= 0:
        return x, y1
    perm = torch.randperm(x.shape[0], generator=g).to(x.device)
    use_cut = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=g).item() < 0.5)
    alpha = cutmix if use_cut else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample().item()) if alpha > 0 else 1.0
    if use_cut:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        y0, y1_, x0, x1_ = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1_, x0:x1_] = x[perm][..., y0:y1_, x0:x1_]
        lam = 1 - (y1_ - y0) * (x1_ - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * y1 + (1 - lam) * y1[perm]


@dataclass
class StepConfig:
    """What `train_one_epoch` needs beyond model, data and optimiser."""

    batch_size: int
    seed: int
    epoch: int
    num_classes: int
    augment: AugmentConfig
    sampler: str = "shuffle"
    mixup: float = 0.0
    cutmix: float = 0.0
    amp: str = "auto"
    grad_accum: int = 1
    progress: bool = True
    consistency: float = 0.0
    size: int = 0  # --progressive-size: train on images shrunk to this many px (0: as cached)


def train_one_epoch(model: nn.Module, data: ArrayData, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                    spec: InputSpec, step: StepConfig, device: torch.device, dist: DistInfo = DistInfo(),
                    scaler: torch.amp.GradScaler | None = None, on_batch=None, on_step=None, stop=None) -> dict:
    """One pass over the (sharded) training data.

    Args:
        model: the model (DDP-wrapped in a distributed run).
        data: training images and labels (CPU).
        optimizer, criterion: as usual; `criterion(logits, soft_targets)`.
        spec: normalisation and channel layout.
        step: batch size (global), seeds, augmentation, mixing, precision, and the size the images are
            shrunk to before augmentation (`step.size`, progressive resizing; blur sigmas shrink with them).
        device: where to compute.
        dist: rank and world size.
        scaler: GradScaler for fp16 on CUDA.
        on_batch: optional callback(batch_index) (e.g. a warm-up LR schedule).
        on_step: optional callback() after each optimiser step (e.g. a weight EMA update).
        stop: optional callback(batches_done) -> True to end the epoch early (a time budget); in a
            distributed run the ranks stop together when any of them says so.

    Returns:
        {"loss": mean training loss, "acc": accuracy against the hard labels} over all ranks, and
        "batches": how many batches ran (fewer than the epoch's when `stop` ended it).
    """
    from tqdm.auto import tqdm

    model.train()
    order = shard(epoch_order(data.labels, step.seed, step.epoch, step.sampler), dist)
    micro = max(1, step.batch_size // (dist.world * step.grad_accum))
    batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    g = epoch_generator(step.seed, step.epoch, salt=100 + dist.rank)
    augment = step.augment
    if step.size:
        augment = scaled_augment(augment, step.size / max(data.images.shape[-2:]))
    totals = torch.zeros(3, dtype=torch.float64)
    bar = tqdm(batches, desc=f"epoch {step.epoch}", disable=None if (step.progress and dist.main) else True, leave=False, unit="batch")
    optimizer.zero_grad(set_to_none=True)
    done = 0
    for i, idx in enumerate(bar):
        if on_batch:
            on_batch(i)
        raw = data.images[idx].to(device, non_blocking=True)
        if step.size:
            raw = shrink(raw, step.size)
        labels = data.labels[idx]
        x = augment_batch(raw, augment, g, labels)
        if step.consistency:  # a second, independently augmented view of the same images
            x = torch.cat([x, augment_batch(raw, augment, g, labels)])
        x = to_model_input(x, spec.mean, spec.std, spec.in_chans)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device)
        if step.consistency:
            ym = F.one_hot(y, step.num_classes).float()
            with autocast_context(device, step.amp):
                both = model(x).float()
            logits, other = both[: len(y)], both[len(y):]
            loss = (criterion(logits, ym) + criterion(other, ym)) / 2 + step.consistency * js_divergence(logits, other)
        else:
            xm, ym = mix_batch(x, y, step.num_classes, step.mixup, step.cutmix, g)
            with autocast_context(device, step.amp):
                logits = model(xm)
            loss = criterion(logits.float(), ym)
        sync = (i + 1) % step.grad_accum == 0 or i + 1 == len(batches)
        _backward_step(loss / step.grad_accum, optimizer, scaler, model, sync=sync)
        if sync and on_step:
            on_step()
        totals += torch.tensor([loss.item() * len(idx), (logits.argmax(1) == y).sum().item(), len(idx)], dtype=torch.float64)
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}")
        done = i + 1
        if sync and stop is not None and done < len(batches) and _all_reduce(torch.tensor([float(stop(done))]), dist).item() > 0:
            break
    bar.close()
    totals = _all_reduce(totals, dist)
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2]), "batches": done}


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between the softmax outputs of two views, averaged over the batch.

    AugMix's consistency term (Hendrycks et al. 2020): the mean of KL(p_i || m) with m the mixture;
    0 when the views agree, at most log 2. The mixture is clamped as in the AugMix reference code.
    """
    pa, pb = torch.softmax(logits_a.float(), dim=1), torch.softmax(logits_b.float(), dim=1)
    log_m = ((pa + pb) / 2).clamp(1e-7, 1.0).log()
    return (F.kl_div(log_m, pa, reduction="batchmean") + F.kl_div(log_m, pb, reduction="batchmean")) / 2


def _backward_step(loss, optimizer, scaler, model, sync: bool) -> None:
    no_sync = getattr(model, "no_sync", None)
    ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
    with ctx:
        (scaler.scale(loss) if scaler else loss).backward()
    if sync:
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _all_reduce(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.world == 1:
        return t
    import torch.distributed as tdist

    t = t.clone()
    tdist.all_reduce(t)
    return t


@torch.no_grad()
def average_buffers(model: nn.Module, dist: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the ranks, in place.

    Each rank updates its BatchNorm statistics from its own shard, so without this the ranks would
    evaluate different models and the validation metrics would not be those of the saved checkpoint.
    """
    if dist.world == 1:
        return
    import torch.distributed as tdist

    for b in model.buffers():
        if b.is_floating_point():
            tdist.all_reduce(b)
            b.div_(dist.world)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, spec: InputSpec, device: torch.device,
                   batch_size: int = 128, amp: str = "off", dist: DistInfo = DistInfo(), tta: bool = False) -> np.ndarray:
    """Logits for uint8 images (N, S, S); in a distributed run each rank does a shard and all get all.

    Args:
        model: the model (unwrapped or DDP).
        images: uint8 tensor.
        spec: normalisation.
        device: where to compute.
        batch_size: inference batch.
        amp: precision (see `autocast_context`).
        dist: rank/world; results are gathered so every sample is counted exactly once.
        tta: average the logits of the image and its horizontal flip.

    Returns:
        float32 array (N, C) in the order of `images`.
    """
    model.eval()
    idx = shard(torch.arange(len(images)), dist, pad=False)
    outs = []
    for i in range(0, len(idx), batch_size):
        x = to_model_input(images[idx[i : i + batch_size]].to(device), spec.mean, spec.std, spec.in_chans)
        if spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            out = model(x).float()
            if tta:
                out = (out + model(torch.flip(x, dims=[3])).float()) / 2
        outs.append(out.cpu())
    logits = torch.cat(outs) if outs else torch.zeros(0, 0)
    if dist.world == 1:
        return logits.numpy()
    return _gather_ordered(idx, logits, len(images))


def _gather_ordered(idx: torch.Tensor, logits: torch.Tensor, n: int) -> np.ndarray:
    import torch.distributed as tdist

    parts = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, (idx.numpy(), logits.numpy()))
    c = max(p[1].shape[1] for p in parts if len(p[0]))
    out = np.full((n, c), np.nan, dtype=np.float32)
    seen = np.zeros(n, dtype=np.int64)
    for pidx, plog in parts:
        if len(pidx):
            out[pidx] = plog
            seen[pidx] += 1
    assert (seen == 1).all(), "distributed evaluation must see every sample exactly once"
    return out


def epoch_metrics(logits: np.ndarray, labels: np.ndarray, weight: torch.Tensor | None = None) -> dict:
    """Validation loss (unweighted CE), accuracy and macro one-vs-rest AUC from logits."""
    from sklearn.metrics import roc_auc_score

    t = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    loss = float(F.cross_entropy(t, y).item())
    acc = float((t.argmax(1) == y).float().mean().item())
    probs = torch.softmax(t, 1).numpy()
    try:
        if probs.shape[1] == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))
    except ValueError:
        auc = float("nan")
    return {"loss": loss, "acc": acc, "auc": auc}


class EarlyStopping:
    """Tracks the monitored metric: best value, epochs without improvement, whether to stop."""

    def __init__(self, monitor: str, patience: int):
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.patience = patience
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; returns True when it is a new best."""
        better = value < self.best if self.mode == "min" else value > self.best
        if not math.isnan(value) and better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = d["best"], d["best_epoch"], d["bad_epochs"]


class Timer:
    """Wall-clock seconds since creation."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def batchnorms_with_statistics(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def unnormalised_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose running statistics are exactly mean 0 and variance 1 while others' are not: left so by
    training's precise BN (the stem's own BatchNorm under --freeze-stages, see `cxrlab.training_setup.freeze_stages`).
    A model whose every BatchNorm is so never measured any: none is returned."""
    bns = [m for m in batchnorms_with_statistics(model) if m.running_mean is not None]
    unit = [m for m in bns if not m.running_mean.any() and bool((m.running_var == 1).all())]
    return unit if len(unit) < len(bns) else []


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, spec: InputSpec, device: torch.device,
                          n: int = 1024, batch_size: int = 64, seed: int = 0, amp: str = "off",
                          keep: list[nn.Module] = ()) -> int:
    """"Precise BN": re-estimate BatchNorm running statistics with the current weights on clean images.

    The running averages kept during training mix statistics of many past weights and of augmented
    batches; measured here on a fine-tuned EfficientNet-Lite0, they underestimated the variances so badly
    that validation accuracy fell from 0.97 (re-estimated) to 0.47. This resets them and takes the exact
    average over `n` un-augmented images (a seeded subset), with only the BatchNorm layers in train mode.

    Args:
        model: the model (unwrapped).
        images: uint8 images (N, S, S) to estimate from (training images).
        spec: normalisation.
        device: where to compute.
        n: how many images (all when fewer).
        batch_size: batch for the forward passes.
        seed: seed of the subset.
        amp: precision of the forward passes.
        keep: BatchNorm layers left as they are (they normalise with their own statistics meanwhile).

    Returns:
        The number of images used (0 when the model has no BatchNorm).
    """
    kept = {id(m) for m in keep}
    bns = [m for m in batchnorms_with_statistics(model) if id(m) not in kept]
    if not bns or n <= 0:
        return 0
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the batches
        m.train()
    try:
        for i in range(0, len(idx), batch_size):
            x = to_model_input(images[idx[i : i + batch_size]].to(device), spec.mean, spec.std, spec.in_chans)
            if spec.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp):
                model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, training in modes.items():
            m.train(training)
    return len(idx)
