"""Model registry: `create_model(name, num_classes, ...)` in the style of timm.

Every registered model carries a `ModelSpec`: its default input size, channels, normalisation and
the layer Grad-CAM should look at, so preprocessing and explanations are derived, never retyped.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from cxrlab.errors import CxrlabError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What cxrlab needs to know about a registered architecture.

    Attributes:
        name: registry name.
        builder: `builder(num_classes, in_chans, pretrained, **kwargs) -> nn.Module`.
        cam_layer: `cam_layer(model) -> nn.Module`, the Grad-CAM target layer.
        img_size: default square input size.
        in_chans: default input channels.
        mean, std: per-channel normalisation for 3 channels (reduced to 1 channel by averaging).
        pretrained_tag: what `pretrained=True` loads ("" when no pretrained weights exist).
        description: one line for `list_models`.
    """

    name: str
    builder: Callable[..., nn.Module]
    cam_layer: Callable[[nn.Module], nn.Module]
    img_size: int = 224
    in_chans: int = 3
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    pretrained_tag: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
_MODULES = ("cxrlab.models.reference", "cxrlab.models.small", "cxrlab.models.tv", "cxrlab.models.lite")
_loaded = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (used by the model modules at import)."""
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for mod in _MODULES:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as exc:
                if exc.name != mod:
                    raise
        _loaded = True


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model; unknown names list the valid ones."""
    _load_all()
    if name not in _REGISTRY:
        raise CxrlabError(f"unknown model '{name}'. Valid models: {', '.join(list_models())}")
    return _REGISTRY[name]


def channel_stats(spec_or_mean, in_chans: int) -> list[float]:
    """Reduce a 3-channel mean/std to `in_chans` values (1 channel: the average)."""
    vals = [float(v) for v in spec_or_mean]
    if in_chans == len(vals):
        return vals
    if in_chans == 1:
        return [sum(vals) / len(vals)]
    raise CxrlabError(f"cannot adapt {len(vals)}-channel statistics to {in_chans} channels")


def create_model(name: str, num_classes: int, in_chans: int | None = None, pretrained: bool = False,
                 weights: str | None = None, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: registry name (see `list_models()`).
        num_classes: size of the output layer.
        in_chans: input channels (default: the model's own, 3 for ImageNet-style models).
        pretrained: load the model's ImageNet weights (hub names; needs internet unless cached).
        weights: path to a local weights file (a state_dict, a cxrlab checkpoint, or a package
            file); takes precedence over `pretrained`. The classifier head is re-initialised.
        **kwargs: architecture arguments (e.g. `dropout`).

    Returns:
        The model, in training mode.
    """
    spec = model_spec(name)
    in_chans = spec.in_chans if in_chans is None else int(in_chans)
    if num_classes < 2:
        raise CxrlabError(f"num_classes must be >= 2, got {num_classes}")
    try:
        model = spec.builder(num_classes=num_classes, in_chans=in_chans, pretrained=pretrained and not weights, **kwargs)
    except TypeError as exc:
        if not kwargs or "argument" not in str(exc):
            raise
        raise CxrlabError(f"model {name} does not take the architecture argument(s) {sorted(kwargs)} ({exc}); "
                          f"fix or remove them (--model-arg, or model_kwargs in the config file)") from None
    if weights:
        from cxrlab.models.weights import load_local_weights

        load_local_weights(model, weights, in_chans=in_chans)
    return model
