"""Named training recipes: settings that `cxrlab train --recipe NAME` lays beneath the config file and the
command-line options (TrainConfig defaults < recipe < --config file < options), and that `bench/accuracy.py`
benchmarks, so that the numbers in docs/BENCHMARKS.md are one command away for a user's own data.

    cxrlab train --data DATA --recipe recommended --time-budget-min 30 --out runs/lite0
    cxrlab train --list-recipes
"""

from __future__ import annotations

import logging

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

RECIPES: dict[str, dict] = {
    # Pretrained EfficientNet-Lite0 fine-tuned with what tends to generalise across sites: histogram
    # equalisation, strong photometric augmentation, random blur (sites and resizing differ in sharpness),
    # class weights, label smoothing, a gentler learning rate for the pretrained backbone, bf16 autocast on
    # CPUs with native bf16 (depthwise layers stay fp32; fp32 on CPUs without it, where bf16 would be
    # emulated and 6x slower), an EMA of the weights, and a cosine schedule that the time budget
    # shortens to the epochs that fit. The head starts as a linear probe on the pretrained features (LP-FT),
    # so the first steps do not distort them (docs/BENCHMARKS.md: three-seed mean 0.936 / 0.977 against 0.925 /
    # 0.968 on the Kermany test, TB recall 0.978 -> 0.989 on cxr3, fewer flips under cxrlab stress).
    # best.pt is the final epoch (select="last"), where the cosine schedule has annealed: the validation
    # carve (785 Kermany images) is too small to rank epochs, and its loss picked early, worse epochs
    # (Kermany test, five seeds: 0.936-0.949 / AUC 0.979-0.980 with the final epoch; 0.925-0.946 / 0.974-0.979
    # for seeds 0-2 with the loss).
    # auto_freeze: on a machine where fewer than 10 epochs of the whole network fit the budget (a 2-core CPU
    # without native bf16: 3-4; a Xeon whose bf16 is no faster than fp32: 7), the stem and the stages down to
    # 1/8 of the input stay fixed and 1.6-2x as many, cheaper epochs fit (docs/BENCHMARKS.md, "Auto-freeze");
    # where bf16 is fast (15-16 Kermany epochs) or on a GPU every layer trains. It decides from the time
    # budget, so without --time-budget-min the recipe trains every layer (see `with_recipe`).
    # val_every=0: with select="last" and no early stopping nothing between the first and the final epoch is
    # chosen, so only the final epoch is validated (for the temperature and the operating points); the per-epoch
    # validations only drew the history curve, and their time trains instead: one or two more epochs in 30 minutes
    # on 2-core CPUs, the same training otherwise (docs/BENCHMARKS.md, "Validation only at the end": paired seeds).
    "recommended": dict(model="efficientnet_lite0", pretrained=True, head_init="probe", img_size=224, equalize=True,
                        epochs=30, ema=0.998,
                        batch_size=32, optimizer="adamw", lr=1e-3, weight_decay=1e-2, backbone_lr_mult=0.3,
                        warmup_epochs=1, scheduler="cosine", label_smoothing=0.1, class_weights=True,
                        aug_rotation=10.0, aug_translate=0.06, aug_crop_scale_min=0.75, aug_brightness=0.3,
                        aug_contrast=0.3, aug_gamma=0.3, aug_noise=0.02, aug_blur=1.5, early_stop=0, monitor="val_loss",
                        select="last", val_every=0, amp="bf16", auto_freeze=True),
    # The two reference designs with their own defaults (design 1: Adam 1e-3, plateau, 224 px;
    # design 2: class weights, best by validation AUC).
    # Both in bf16 autocast on CPU (design 1 asks for mixed precision; about 2x faster on CPUs with native
    # bf16; fp32 on CPUs without it).
    "chestxray_cnn": dict(model="chestxray_cnn", img_size=224, epochs=50, batch_size=32, early_stop=10, amp="bf16"),
    "custom_cnn": dict(model="custom_cnn", img_size=224, epochs=50, batch_size=32, class_weights=True,
                       monitor="val_auc", early_stop=10, amp="bf16"),
}

DESCRIPTIONS = {
    "recommended": "pretrained EfficientNet-Lite0 (offline weights), linear-probe head, histogram equalisation, "
                   "photometric and blur augmentation, class weights, label smoothing, AdamW + cosine fitted to "
                   "--time-budget-min, weight EMA, final epoch kept, bf16 where the CPU has it; the benchmarks' recipe",
    "chestxray_cnn": "reference design 1 as benchmarked: VGG-style CNN from scratch, Adam, plateau, early stopping",
    "custom_cnn": "reference design 2 as benchmarked: 4-block CNN from scratch, class weights, best by validation AUC",
}


def recipe_settings(name: str) -> dict:
    """A copy of recipe `name`'s TrainConfig settings; unknown names are an error that lists the valid ones."""
    if name not in RECIPES:
        raise CxrlabError(f"unknown recipe '{name}'. Valid recipes: {', '.join(sorted(RECIPES))} "
                          "(`cxrlab train --list-recipes` shows their settings)")
    return dict(RECIPES[name])


def with_recipe(d: dict) -> dict:
    """Config keys `d` with the settings of its `recipe` (if any) beneath them: every key in `d` wins.

    The recommended recipe's `auto_freeze` decides from the time budget; without `time_budget_min` it is left
    out (every layer trains for all the recipe's epochs) unless `d` asks for it, which `validate` then refuses.

    Args:
        d: TrainConfig keys, e.g. a config file merged with command-line options.

    Returns:
        A new dict: the recipe's settings updated with `d`.
    """
    from cxrlab.config import TrainConfig

    name = d.get("recipe")
    if not name:
        return dict(d)
    settings = recipe_settings(name)
    if settings.get("auto_freeze") and not d.get("time_budget_min"):
        del settings["auto_freeze"]
        epochs = d.get("epochs") or settings.get("epochs", TrainConfig.epochs)
        fixed = d.get("freeze_stages")
        trains = f"stages fixed by --freeze-stages {fixed}" if fixed else "every layer trains"
        log.info("recipe %s without --time-budget-min: no --auto-freeze (it decides from the budget); %s for %d "
                 "epochs", name, trains, epochs)
    return {**settings, **d}


def _as_option(key: str, value) -> str:
    """One setting as the `cxrlab train` option that sets it."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def format_recipes() -> str:
    """`cxrlab train --list-recipes`: each recipe's description and settings."""
    import textwrap

    lines = []
    for name in RECIPES:
        lines.append(textwrap.fill(f"{name}: {DESCRIPTIONS.get(name, '')}", 110, subsequent_indent="    ",
                                   break_on_hyphens=False))
        settings = " ".join(_as_option(k, v).replace(" ", "\xa0") for k, v in RECIPES[name].items())  # no break inside
        lines.append(textwrap.fill(settings, 110, initial_indent="    ", subsequent_indent="    ",
                                   break_on_hyphens=False).replace("\xa0", " "))
    return "\n".join(lines)
