"""Building blocks of a training run: device, process group, model, optimiser, scheduler, loss."""

from __future__ import annotations

import logging
import math
import os
import statistics

import torch
import torch.nn as nn

from cxrlab.config import TrainConfig
from cxrlab.data.augment import AugmentConfig
from cxrlab.data.preprocess import Preprocess
from cxrlab.engine import DistInfo, FocalLoss, InputSpec, keep_depthwise_fp32, soft_cross_entropy
from cxrlab.errors import CxrlabError
from cxrlab.models import channel_stats, create_model, model_spec

log = logging.getLogger(__name__)

PROBE_MAX_IMAGES = 4096  # the linear probe fits at most this many training images
FORWARD_COST = 1 / 3  # a forward pass per image, as a share of a training step per image (budget estimates)


def uses_cuda(device: str) -> bool:
    """Whether a --device value trains on CUDA GPUs (`auto` does when one is visible)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def check_gpus_for_processes(nproc: int, device: str) -> None:
    """`--nproc N` on CUDA runs one process per GPU: fail before launching when fewer are visible."""
    if nproc > 1 and uses_cuda(device) and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise CxrlabError(f"--nproc {nproc} runs one process per GPU, but {n} CUDA GPU(s) are visible; use --nproc {n} "
                          f"(or --device cpu for {nproc} CPU processes)")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); 1 process otherwise.

    Args:
        device: the run's --device; a CPU run uses gloo and leaves the GPUs alone even where there are some.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    cuda = uses_cuda(device) and torch.cuda.is_available()
    if cuda:
        check_gpus_for_processes(world, device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda and dist.is_nccl_available() else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return info


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    """`auto` -> CUDA (this rank's GPU), else Apple MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if dist.world > 1 else torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CxrlabError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CxrlabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_preprocess(cfg: TrainConfig) -> Preprocess:
    """The preprocessing preset of a run (image size defaults to the model's own)."""
    spec = model_spec(cfg.model)
    return Preprocess(img_size=cfg.img_size or spec.img_size, equalize=cfg.equalize, crop_border=cfg.crop_border,
                      clahe=cfg.clahe)


def setup_model(cfg: TrainConfig, num_classes: int, pre: Preprocess, device: torch.device) -> tuple[nn.Module, InputSpec, dict]:
    """Create the model with its input spec; returns (model, input spec, architecture kwargs)."""
    spec = model_spec(cfg.model)
    in_chans = cfg.in_chans or spec.in_chans
    kwargs = dict(cfg.model_kwargs)
    if spec.extra.get("size_dependent"):
        kwargs.setdefault("img_size", pre.img_size)
    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, pretrained=cfg.pretrained,
                         weights=cfg.weights, **kwargs)
    channels_last = cfg.channels_last and device.type != "mps"
    if device.type == "cuda":  # TF32 tensor cores for training (PyTorch leaves matmuls in full fp32 by default)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = model.to(device)
    if device.type == "cpu":
        keep_depthwise_fp32(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ispec = InputSpec(channel_stats(spec.mean, in_chans), channel_stats(spec.std, in_chans), in_chans, channels_last)
    return model, ispec, kwargs


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head (timm's `get_classifier`, else the last Linear layer)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return list(head.parameters())
    last = last_linear(model)
    return list(last.parameters()) if last is not None else []


def last_linear(model: nn.Module) -> nn.Linear | None:
    """The model's last nn.Linear layer (the classifier's output layer), None when it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def probe_head(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: InputSpec, device: torch.device,
               balanced: bool = False, amp: str = "off", max_images: int = PROBE_MAX_IMAGES, seed: int = 0) -> dict:
    """Linear probe: set the classifier's last Linear layer to a logistic regression on its input features.

    The first half of LP-FT (Kumar et al. 2022, "Fine-tuning can distort pretrained features"): a new,
    random head sends large, noisy gradients into the pretrained backbone during the first steps of
    fine-tuning; a head fitted on the frozen features does not. Features are those the last Linear
    layer receives in eval mode (no augmentation), for at most `max_images` training images.

    Args:
        model: the model (its last nn.Linear is the head).
        images: uint8 training images (N, S, S).
        labels: class indices (N,).
        spec: input normalisation.
        device: where to compute the features.
        balanced: weight the classes by inverse frequency (as --class-weights does for the loss).
        amp: precision of the feature pass.
        max_images: above this many images, a random subset of this size (seeded).
        seed: subsample seed.

    Returns:
        {"images": how many were used, "train_acc": the probe's accuracy on them}.
    """
    from sklearn.linear_model import LogisticRegression

    from cxrlab.engine import predict_logits

    head = last_linear(model)
    if head is None:
        raise CxrlabError("--head-init probe needs a model whose classifier ends in a Linear layer")
    n_classes = head.out_features
    if len(images) > max_images:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        images, labels = images[pick], labels[pick]
    feats = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float().cpu()))
    try:
        predict_logits(model, images, spec, device, amp=amp)
    finally:
        hook.remove()
    x, y = torch.cat(feats).numpy(), labels.numpy()
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise CxrlabError("--head-init probe needs at least two classes among the training images")
    clf = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None).fit(x, y)
    w = torch.zeros(n_classes, x.shape[1])
    b = torch.full((n_classes,), -30.0)  # a class absent from the training images stays improbable
    coef, intercept = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if len(present) == 2:  # sklearn gives one row, the log-odds of the second class: split it symmetrically
        coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
    for row, cls in enumerate(clf.classes_):
        w[int(cls)], b[int(cls)] = coef[row], intercept[row]
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.device))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias.device))
    return {"images": len(y), "train_acc": float(clf.score(x, y))}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (default), AdamW or SGD; the backbone may get a smaller LR (`backbone_lr_mult`)."""
    head = {id(p) for p in head_parameters(model)}
    body = [p for p in model.parameters() if id(p) not in head and p.requires_grad]  # not --freeze-stages
    groups = [{"params": body, "lr": cfg.lr * cfg.backbone_lr_mult, "base_lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": [p for p in model.parameters() if id(p) in head], "lr": cfg.lr, "base_lr": cfg.lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """ReduceLROnPlateau on the monitored metric (reference: factor 0.5, patience 5), cosine, or none."""
    if cfg.scheduler == "plateau":
        mode = "min" if cfg.monitor.endswith("loss") else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - cfg.warmup_epochs))
    return None


def augment_config(cfg: TrainConfig, class_blur: tuple = ()) -> AugmentConfig:
    """The run's augmentation strengths (`class_blur`: --aug-blur-match's extra blur per class)."""
    return AugmentConfig(cfg.aug_flip, cfg.aug_rotation, cfg.aug_translate, cfg.aug_crop_scale_min,
                         cfg.aug_brightness, cfg.aug_contrast, cfg.aug_gamma, cfg.aug_noise, cfg.aug_blur,
                         cfg.aug_crop_scale_max, class_blur, cfg.aug_frame)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Reference design 2's weights from class frequencies: n / (classes * n_c)."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def build_criterion(cfg: TrainConfig, labels: torch.Tensor, num_classes: int, device: torch.device):
    """Cross-entropy (default) or focal loss, optionally class-weighted. Takes soft targets."""
    w = class_weights(labels, num_classes).to(device) if cfg.class_weights else None
    if w is not None:
        log.info("class weights: %s", ", ".join(f"{x:.3f}" for x in w.tolist()))
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, w, cfg.label_smoothing).to(device)
    return lambda logits, target: soft_cross_entropy(logits, target, w, cfg.label_smoothing)


def set_backbone_frozen(model: nn.Module, frozen: bool, fixed: frozenset = frozenset()) -> None:
    """Freeze (or unfreeze) everything but the classifier head; parameters whose id is in `fixed` stay frozen."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        if id(p) not in head:
            p.requires_grad_(not frozen and id(p) not in fixed)


def backbone_stages(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The input stem and the stages, in input order, of the architectures `--freeze-stages` knows; else ([], [])."""
    if all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks")):  # timm EfficientNet(-Lite), MobileNet
        return [model.conv_stem, model.bn1], list(model.blocks)
    if all(hasattr(model, a) for a in ("conv1", "bn1", "layer1")):  # ResNet (torchvision, timm)
        return [model.conv1, model.bn1], [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential) and type(model).__name__ in ("EfficientNet", "MobileNetV3"):  # torchvision
        return [feats[0]], list(feats[1:-1])  # the last entry is the final 1x1 convolution
    return [], []


def _stay_in_eval(module: nn.Module, _args) -> None:
    if module.training:  # model.train() switched it back: a fixed stage keeps its BatchNorm statistics
        module.eval()


def freeze_stages(model: nn.Module, n: int, name: str) -> frozenset:
    """Keep the stem and the first `n` stages fixed for the whole run.

    Their weights get no gradients (so the backward pass stops before them, which makes a step cheaper)
    and their BatchNorm layers normalise with their running statistics in training too (a forward
    pre-hook puts the stage back in eval mode whenever `model.train()` switched it). Precise BN then
    re-estimates the fixed stages' statistics with the same fixed weights, but not the stem's own BatchNorm:
    the hook sits on that layer itself, so it stays in eval mode after precise BN's reset and normalises
    with (0, 1) — measured better than re-estimating it on four Kermany seeds (docs/BENCHMARKS.md, "The
    stem's BatchNorm"); tests/test_models.py pins it.

    Args:
        model: the model (unwrapped).
        n: how many stages after the stem (0: nothing is frozen).
        name: the model's registered name, for error messages.

    Returns:
        The ids of the frozen parameters (for `set_backbone_frozen` and the optimizer).
    """
    if n <= 0:
        return frozenset()
    stem, stages = backbone_stages(model)
    if not stages:
        raise CxrlabError(f"--freeze-stages {n}: model {name} has no stage layout cxrlab knows (EfficientNet, "
                          f"EfficientNet-Lite, ResNet, MobileNetV3 have one); use --freeze-stages 0, or "
                          f"--freeze-epochs to train only the head for the first epochs")
    if n > len(stages):
        raise CxrlabError(f"--freeze-stages {n}: model {name} has {len(stages)} stages; use 0 to {len(stages)}")
    fixed = []
    for module in stem + stages[:n]:
        module.register_forward_pre_hook(_stay_in_eval)
        for p in module.parameters():
            p.requires_grad_(False)
            fixed.append(id(p))
    return frozenset(fixed)


# --auto-freeze: when fewer epochs of the whole network than this fit the time budget, the high-resolution
# stages (output at least 1/AUTO_FREEZE_STRIDE of the input size) stay fixed, which makes each step cheaper.
# Measured with EfficientNet-Lite0 on Kermany (docs/BENCHMARKS.md, "Auto-freeze" and "Where auto-freeze draws
# the line"): 3-4 full epochs against 5-6 with the first 3 stages fixed, the fixed ones won (3 seeds, AVX2 CPU);
# 7 full epochs against 11 fixed, the fixed ones won again (2 seeds, a Xeon whose estimates, 5.7-7.8, straddled
# the former threshold of 6); at 7-8 against 11-12 on a CPU with fast bf16, two averaged members each, level
# in accuracy and 0.006 of AUC to the fixed ones. Where 15-16 full epochs fit (that CPU, the recipe's best
# results) every layer trains (the fixed members fitted validation less well: AUC 0.992-0.994 against 0.995).
# 10 leaves room for the estimate's error (7.8 where 7.3 fitted) on both sides.
AUTO_FREEZE_BELOW_EPOCHS = 10
AUTO_FREEZE_STRIDE = 8


def high_resolution_stages(model: nn.Module, img_size: int, in_chans: int, stride: int = AUTO_FREEZE_STRIDE) -> int:
    """How many leading stages output feature maps at least `img_size / stride` pixels wide.

    They hold few weights but most of the compute (EfficientNet-Lite0 at stride 8: 3 of 7 stages,
    0.05M of 3.4M parameters; ResNet: 2 of 4). 0 for a model without a stage layout cxrlab knows.
    """
    _, stages = backbone_stages(model)
    if not stages:
        return 0
    widths: list[int] = []
    hooks = [s.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[-1])) for s in stages]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = 0
    while n < len(widths) and widths[n] * stride >= img_size:
        n += 1
    return n


def measure_step_seconds(model: nn.Module, data, criterion: nn.Module, spec: InputSpec, step, device: torch.device,
                         cfg: TrainConfig, steps: int = 4, fixed_stages: int = 0) -> float:
    """Seconds per training step (augmentation, forward, backward, optimiser) at `step.batch_size` images, of
    the whole network or with its stem and first `fixed_stages` stages fixed, timed on a throwaway copy after
    one warm-up step: the model is untouched.
    The median step counts (`typical_step_seconds`): single steps on a shared 2-core CPU vary by 15%.

    Args:
        model: the model, unwrapped, before any stage is frozen.
        data: training ArrayData (the first few batches are used).
        criterion: the loss.
        spec: input normalisation.
        step: a StepConfig whose batch_size is one process's step.
        device: where to compute.
        cfg: for the optimiser.
        steps: timed steps after the warm-up.
        fixed_stages: stages kept fixed on the copy, as `freeze_stages` does (0: every layer trains).
    """
    import copy
    import time

    from cxrlab.engine import ArrayData, train_one_epoch

    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(True)
    freeze_stages(clone, fixed_stages, cfg.model)
    n = min(len(data), (steps + 1) * step.batch_size)
    stamps: list[float] = []
    train_one_epoch(clone, ArrayData(data.images[:n], data.labels[:n]), build_optimizer(clone, cfg), criterion, spec,
                    step, device, on_batch=lambda _i: stamps.append(time.perf_counter()))
    return typical_step_seconds(stamps + [time.perf_counter()])


def typical_step_seconds(stamps: list[float]) -> float:
    """The median of the steps between consecutive time stamps (each step's start, then the end), the first
    step left out when there are others: it also builds kernels and buffers."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(steps[1:] or steps)


def epochs_that_fit(step_s: float, micro: int, n_train: int, n_eval: float, n_probe: float,
                    budget_s: float) -> tuple[float, float]:
    """How many epochs of the whole network fit `budget_s`, and what one costs, from one measured step.

    An epoch is ceil(n_train / micro) steps plus forward passes over `n_eval` images (validation and
    precise BN; with --val-every N a 1/N share of them); a forward pass costs FORWARD_COST of a training
    step per image (as the mid-epoch budget guard assumes). Forward passes over `n_probe` images happen
    once, outside the epochs (the linear probe; with --val-every the final validation).

    Returns:
        (epochs, seconds an epoch)
    """
    forward_s = step_s / micro * FORWARD_COST
    epoch_s = math.ceil(n_train / micro) * step_s + n_eval * forward_s
    return max(0.0, budget_s - n_probe * forward_s) / epoch_s, epoch_s
