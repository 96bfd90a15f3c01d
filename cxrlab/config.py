"""Training configuration: one typed dataclass, written into every run folder as config.yaml."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cxrlab.errors import CxrlabError


@dataclass
class TrainConfig:
    """Everything that defines a training run. Defaults follow reference design 1.

    Attributes are documented in `cxrlab train --help`. `recipe` names the settings (cxrlab.recipes) that the
    CLI laid beneath the config file and options (`cxrlab.recipes.with_recipe`); here it only records them. The
    notable groups are data (`data`,
    `manifest`, `val_fraction`, `group_regex`), model (`model`, `pretrained`, `weights`), optimisation
    (`lr`, `weight_decay`, `epochs`, `batch_size`, `monitor`, `select`, `patience`, `early_stop`), imbalance
    (`class_weights`, `loss`, `sampler`), regularisation (`mixup`, `cutmix`, `label_smoothing`,
    augmentation strengths), speed (`amp`, `channels_last`, `compile`, `workers`, `cache`) and
    explanations during training (`cam_every`, `cam_images`).
    """

    data: str = ""
    out: str = "runs/run"
    manifest: str | None = None
    recipe: str | None = None
    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    in_chans: int | None = None
    img_size: int | None = None
    equalize: bool = False
    clahe: float = 0.0
    crop_border: float = 0.0
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    scheduler: str = "plateau"
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    warmup_epochs: int = 0
    freeze_epochs: int = 0
    freeze_stages: int = 0
    auto_freeze: bool = False
    head_init: str = "random"
    backbone_lr_mult: float = 1.0
    early_stop: int = 10
    monitor: str = "val_loss"
    select: str = "best"
    seed: int = 42
    split_seed: int | None = None
    workers: int | None = None
    val_fraction: float = 0.15
    group_regex: str | None = None
    class_weights: bool = False
    loss: str = "ce"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    sampler: str = "shuffle"
    mixup: float = 0.0
    cutmix: float = 0.0
    consistency: float = 0.0
    aug_flip: float = 0.5
    aug_rotation: float = 15.0
    aug_translate: float = 0.1
    aug_crop_scale_min: float = 0.8
    aug_brightness: float = 0.2
    aug_contrast: float = 0.2
    aug_gamma: float = 0.0
    aug_noise: float = 0.0
    aug_blur: float = 0.0
    aug_blur_match: bool = False
    aug_crop_scale_max: float = 1.0
    aug_frame: float = 0.0
    progressive_size: int = 0
    progressive_frac: float = 0.5
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"
    cache: bool = True
    cache_dir: str | None = None
    time_budget_min: float | None = None
    grad_accum: int = 1
    sync_bn: bool = False
    cam_every: int = 0
    cam_images: int = 8
    cam_method: str = "gradcam"
    allow_leakage: bool = False
    calibrate: bool = True
    target_recall: dict = field(default_factory=dict)
    report: bool = True
    precise_bn: int = 1024
    val_every: int = 1
    ema: float = 0.0

    @property
    def carve_seed(self) -> int:
        """Seed of the validation carve: `split_seed`, or `seed` when it is not set."""
        return self.seed if self.split_seed is None else self.split_seed

    def validate(self) -> "TrainConfig":
        """Check values a user can get wrong; returns self."""
        if self.recipe is not None:
            from cxrlab.recipes import recipe_settings

            recipe_settings(self.recipe)  # an unknown name: the error that lists the valid ones
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.monitor in ("val_loss", "val_acc", "val_auc"), f"--monitor must be val_loss, val_acc or val_auc, got {self.monitor}"),
            (self.select in ("best", "last"), f"--select must be best or last, got {self.select}"),
            (self.loss in ("ce", "focal"), f"--loss must be ce or focal, got {self.loss}"),
            (self.sampler in ("shuffle", "balanced"), f"--sampler must be shuffle or balanced, got {self.sampler}"),
            (self.optimizer in ("adam", "adamw", "sgd"), f"--optimizer must be adam, adamw or sgd, got {self.optimizer}"),
            (self.scheduler in ("plateau", "cosine", "none"), f"--scheduler must be plateau, cosine or none, got {self.scheduler}"),
            (self.amp in ("auto", "off", "fp16", "bf16"), f"--amp must be auto, off, fp16 or bf16, got {self.amp}"),
            (self.img_size is None or 16 <= self.img_size <= 2048, f"--img-size must be 16..2048, got {self.img_size}"),
            (0 <= self.clahe <= 40, f"--clahe is a clip limit in [0, 40] such as 2.0 (0: off), got {self.clahe}"),
            (not (self.equalize and self.clahe),
             "--equalize and --clahe both equalise contrast (globally / region by region): choose one"),
            (0 <= self.crop_border < 0.45, f"--crop-border must be in [0, 0.45), got {self.crop_border}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (0 < self.aug_crop_scale_min <= 1, f"--aug-crop-scale-min is an area fraction in (0, 1], got {self.aug_crop_scale_min}"),
            (1 <= self.aug_crop_scale_max <= 4,
             f"--aug-crop-scale-max is an area factor in [1, 4] (above 1 also zooms out), got {self.aug_crop_scale_max}"),
            (0 <= self.aug_blur <= 10, f"--aug-blur is a Gaussian sigma in pixels, 0..10, got {self.aug_blur}"),
            (0 <= self.aug_frame < 0.5, f"--aug-frame is the largest band width as a fraction of the side, 0..0.5 "
                                        f"(e.g. 0.15), got {self.aug_frame}"),
            (self.progressive_size == 0 or self.progressive_size >= 16,
             f"--progressive-size is the early epochs' image size in pixels, e.g. 160 (0: off), got {self.progressive_size}"),
            (0 < self.progressive_frac < 1, f"--progressive-frac is the share of the epochs trained at --progressive-size, "
                                            f"in (0, 1) such as 0.5, got {self.progressive_frac}"),
            (0 < self.val_fraction < 1, f"--val-fraction is the share of train/ carved out for validation when the "
                                        f"data has no val/ split, in (0, 1) such as 0.15, got {self.val_fraction}"),
            (self.group_regex is None or _regex_error(self.group_regex) is None,
             f"--group-regex '{self.group_regex}' is not a regular expression ({_regex_error(self.group_regex or '')}); "
             "e.g. '(person\\d+)_' takes the patient id from file names like person12_bacteria_3.jpeg"),
            (self.val_every >= 0, f"--val-every must be >= 0 (1: every epoch; 0: only the final one), got {self.val_every}"),
            (0 <= self.ema < 1, f"--ema must be a decay in [0, 1) such as 0.998 (0: off), got {self.ema}"),
            (self.freeze_stages >= 0, f"--freeze-stages must be >= 0 (0: train every layer), got {self.freeze_stages}"),
            (not (self.auto_freeze and self.freeze_stages),
             f"--auto-freeze chooses the fixed stages itself; drop it or --freeze-stages {self.freeze_stages}"),
            (not self.auto_freeze or bool(self.time_budget_min),
             "--auto-freeze decides from the time budget: add --time-budget-min M, or fix stages with --freeze-stages N"),
            (self.head_init in ("random", "probe"), f"--head-init must be random or probe, got {self.head_init}"),
            (0 <= self.consistency <= 100, f"--consistency is a loss weight in [0, 100] such as 12 (0: off), got {self.consistency}"),
            (not (self.consistency and (self.mixup or self.cutmix)),
             "--consistency compares two views of the same image, which --mixup / --cutmix replace: use one or the other"),
        ]
        for ok, msg in checks:
            if not ok:
                raise CxrlabError(msg)
        return self

    def to_dict(self) -> dict:
        """Plain dict (JSON/YAML/checkpoint safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; unknown keys are an error that lists them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CxrlabError(f"unknown config keys: {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _typed(k, hints[k], v) for k, v in d.items()})


def _regex_error(pattern: str) -> str | None:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        return str(exc)
    return None


def class_named(names: list[str], name: str) -> str | None:
    """The class of `names` that a user's `name` means: the exact name, else the one that matches in any letter case
    (`pneumonia` for `PNEUMONIA`, as data folders match); None when there is none or it is ambiguous."""
    if name in names:
        return name
    folded = [n for n in names if n.casefold() == str(name).casefold()]
    return folded[0] if len(folded) == 1 else None


def target_recall_classes(target_recall: dict, names: list[str]) -> dict[str, float]:
    """--target-recall with each class written as the data names it (`class_named`); an unknown class is an error
    listing the valid ones."""
    out = {}
    for cls, recall in (target_recall or {}).items():
        match = class_named(names, str(cls))
        if match is None:
            raise CxrlabError(f"--target-recall: unknown class '{cls}'; classes are {', '.join(names)}")
        out[match] = float(recall)
    return out


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping (key: value)"}


def _typed(key: str, hint, value):
    """`value` as the field's type: numbers written as strings (YAML reads 1e-3 as a string) become floats, an
    integer is a float too; anything else of the wrong type is an error naming the key."""
    kinds = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    kind = kinds[0]
    if value is None and type(None) in typing.get_args(hint):
        return None
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = (isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))) or \
        (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise CxrlabError(f"config key '{key}' must be {_KINDS.get(kind, kind.__name__)}"
                          f"{' or null' if type(None) in typing.get_args(hint) else ''}, got {value!r}")
    return float(value) if kind is float else value


def save_yaml(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config."""
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    """Read a config file into a dict (validated by `TrainConfig.from_dict`)."""
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CxrlabError(f"cannot read config '{path}': {exc}") from exc
    if not isinstance(d, dict):
        raise CxrlabError(f"config '{path}' must be a mapping of keys to values")
    try:
        TrainConfig.from_dict(d)
    except CxrlabError as exc:
        raise CxrlabError(f"config '{path}': {exc}") from None
    return d
