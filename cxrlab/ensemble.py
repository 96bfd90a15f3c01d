"""Probability-averaging ensembles, stored as one checkpoint usable wherever a checkpoint is.

An ensemble checkpoint is an ordinary cxrlab checkpoint dict (loadable with
`torch.load(weights_only=True)`, accepted by `validate_checkpoint`) whose `state_dict` is empty and
whose `ensemble` key holds the member checkpoints (the full dicts, minus `train_state`):

```
model: {name: "ensemble", kwargs: {}, num_classes, in_chans (first member), members: [arch, ...]},
class_names, img_size, mean, std, preprocess (first member), state_dict: {}, temperature: 1.0,
ensemble: [member checkpoint, ...], ensemble_weights: [w, ...] (sum 1), ensemble_sources: [path, ...]
```

Prediction: every member decodes the files with its own preprocessing preset (members may differ
in image size, equalisation or border crop; each distinct preset is decoded once), computes its
logits (with flip TTA if asked), applies its own temperature, and the calibrated probabilities are
averaged with the weights. The bundle returns `log(avg_probs)` as its "logits", so with the
ensemble temperature 1.0 `probs()` gives back the averaged probabilities exactly; a temperature
and thresholds fitted later on the ensemble (`calibrate_ensemble`) act on those log-probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxrlab.errors import CxrlabError
from cxrlab.inference import ModelBundle, bundle_from_checkpoint

log = logging.getLogger(__name__)


def is_ensemble(ckpt: dict) -> bool:
    """Whether a loaded checkpoint dict is an ensemble."""
    return bool(ckpt.get("ensemble"))


def member_weights(ckpt: dict) -> list[float]:
    """An ensemble checkpoint's member weights (equal when it stores none)."""
    n = len(ckpt["ensemble"])
    return [float(w) for w in ckpt.get("ensemble_weights") or [1.0 / n] * n]


def first_member(ckpt: dict) -> dict:
    """The checkpoint Grad-CAM uses: the first member of an ensemble, else `ckpt` (`cxrlab.explain` explains the
    first member's layers while the probabilities shown are the whole ensemble's)."""
    return ckpt["ensemble"][0] if is_ensemble(ckpt) else ckpt


def parse_weights(text: str | None, n: int) -> list[float]:
    """`"1,2,1"` -> normalised weights (sum 1); None -> equal weights.

    Args:
        text: comma-separated positive numbers, one per member, or None.
        n: number of members.

    Returns:
        n floats summing to 1.
    """
    if not text:
        return [1.0 / n] * n
    try:
        w = [float(v) for v in text.split(",")]
    except ValueError:
        raise CxrlabError(f"--weights wants comma-separated numbers such as 1,2,1; got '{text}'") from None
    if len(w) != n:
        raise CxrlabError(f"--weights has {len(w)} value(s) but there are {n} checkpoints; give one weight per checkpoint")
    if any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise CxrlabError(f"--weights must be non-negative numbers with a positive sum, got '{text}'")
    return [v / sum(w) for v in w]


def _members_of(ckpt: dict, source: str) -> list[tuple[dict, float, str]]:
    """(member, relative weight, source) of a checkpoint; a nested ensemble is flattened."""
    if not is_ensemble(ckpt):
        return [({k: v for k, v in ckpt.items() if k != "train_state"}, 1.0, source)]
    return [(m, w, f"{source}[{i}]") for i, (m, w) in enumerate(zip(ckpt["ensemble"], member_weights(ckpt)))]


def build_ensemble(checkpoints: list[str | Path], weights: list[float] | None = None) -> dict:
    """Combine checkpoints into one ensemble checkpoint dict (save it with `save_checkpoint`).

    Args:
        checkpoints: checkpoint files, two or more models in all (ensembles among them are flattened,
            so one ensemble file can be re-weighted or re-calibrated).
        weights: one non-negative weight per file (normalised); default equal.

    Returns:
        The ensemble checkpoint dict (no thresholds; temperature 1.0).
    """
    from cxrlab.checkpoint import load_checkpoint

    if not checkpoints:
        raise CxrlabError("an ensemble needs at least 2 checkpoints, got none")
    weights = weights or [1.0 / len(checkpoints)] * len(checkpoints)
    members, ws, sources = [], [], []
    for path, w in zip(checkpoints, weights):
        for m, mw, src in _members_of(load_checkpoint(path), str(path)):
            members.append(m)
            ws.append(w * mw)
            sources.append(src)
    if len(members) < 2:
        raise CxrlabError(f"an ensemble needs at least 2 models, got {len(members)} ({', '.join(sources)})")
    _check_same_classes(members, sources)
    first, total = members[0], sum(ws)
    return {
        "model": {"name": "ensemble", "kwargs": {}, "num_classes": len(first["class_names"]),
                  "in_chans": first["model"]["in_chans"], "members": [m["model"]["name"] for m in members]},
        "class_names": list(first["class_names"]), "img_size": first["img_size"], "mean": list(first["mean"]),
        "std": list(first["std"]), "preprocess": dict(first.get("preprocess") or {"img_size": first["img_size"]}),
        "state_dict": {}, "config": {}, "epoch": None, "metric": {"name": "ensemble", "value": None},
        "temperature": 1.0, "history": [], "ensemble": members,
        "ensemble_weights": [w / total for w in ws], "ensemble_sources": sources,
    }


def _check_same_classes(members: list[dict], sources: list[str]) -> None:
    want = list(members[0]["class_names"])
    for m, src in zip(members[1:], sources[1:]):
        if list(m["class_names"]) != want:
            raise CxrlabError(f"'{src}' has classes {list(m['class_names'])} but '{sources[0]}' has {want}: "
                              "all members of an ensemble must have the same classes in the same order")


@dataclass
class EnsembleBundle(ModelBundle):
    """A `ModelBundle` over several member bundles; `model`, `pre` and `spec` are the first member's."""

    members: list[ModelBundle] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def _combine(self, member_logits: list[np.ndarray]) -> np.ndarray:
        """log(sum_i w_i p_i) as logsumexp(log w_i + log p_i): exact where probabilities are tiny, as in the
        ONNX export of the ensemble (`cxrlab.export`)."""
        from scipy.special import log_softmax, logsumexp

        parts = [np.log(w) + log_softmax(np.asarray(lg, np.float64) / float(b.ckpt.get("temperature") or 1.0), axis=1)
                 for w, b, lg in zip(self.weights, self.members, member_logits) if w > 0]
        return logsumexp(parts, axis=0).astype(np.float32)

    def logits_for_arrays(self, images, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Log averaged probabilities for uint8 images (N, S, S) preprocessed with the first member's preset.

        Members with another image size get the arrays resized (antialiased bilinear); a member whose
        preset differs otherwise (equalize, clahe, crop_border) needs the files: use `logits_for_files`.
        """
        t = torch.as_tensor(images if isinstance(images, torch.Tensor) else np.require(images, requirements="W"))
        outs = [b.logits_for_arrays(self._adapt(t, b), tta=tta, batch_size=batch_size) for b in self.members]
        return self._combine(outs)

    def _adapt(self, images: torch.Tensor, member: ModelBundle) -> torch.Tensor:
        if member.pre == self.pre:
            return images
        if not self.pre.same_pixels_at(member.pre):
            raise CxrlabError("ensemble members use different preprocessing (equalize/clahe/crop_border): arrays decoded "
                              "for the first member do not fit them; predict from files instead")
        s = member.pre.img_size
        x = torch.nn.functional.interpolate(images[:, None].float(), size=(s, s), mode="bilinear",
                                            antialias=True, align_corners=False)
        return x[:, 0].round().clamp(0, 255).to(torch.uint8)

    def decode_and_logits(self, paths: list, tta: bool = False, batch_size: int = 64, cache: bool | None = None,
                          progress: bool = False) -> tuple[np.ndarray, list[int], dict[str, str], np.ndarray]:
        """Decode the files once per distinct member preset and combine the members (`logits_for_files` uses it).

        Returns:
            (log averaged probabilities of the readable files, their indices into `paths`, {path: reason},
            the readable files decoded with the first member's preset (uint8 (n_ok, S, S))).
        """
        from cxrlab.data.cache import load_arrays

        decoded: dict = {}
        for pre in dict.fromkeys([self.pre, *(b.pre for b in self.members)]):
            decoded[pre] = load_arrays(paths, pre, cache_dir=None if cache else False,
                                       workers=min(os.cpu_count() or 1, 4), progress=progress)
        ok = sorted(set.intersection(*(set(d[1]) for d in decoded.values())))
        errors = {k: v for d in decoded.values() for k, v in d[2].items()}
        if not ok:
            return np.zeros((0, len(self.class_names)), np.float32), ok, errors, decoded[self.pre][0][:0]
        outs = [b.logits_for_arrays(self._rows(decoded[b.pre], ok), tta=tta, batch_size=batch_size)
                for b in self.members]
        return self._combine(outs), ok, errors, self._rows(decoded[self.pre], ok)

    @staticmethod
    def _rows(decoded: tuple, ok: list[int]) -> np.ndarray:
        """The arrays of the files `ok` (indices into the paths) out of one preset's `load_arrays` result."""
        arrays, b_ok, _ = decoded
        if len(b_ok) == len(ok):
            return arrays
        where = {i: j for j, i in enumerate(b_ok)}
        return arrays[[where[i] for i in ok]]


def bundle_from_ensemble(ckpt: dict, device: str | torch.device = "cpu") -> EnsembleBundle:
    """Build the inference bundle of an ensemble checkpoint (called by `load_model_bundle`).

    Args:
        ckpt: a loaded ensemble checkpoint.
        device: where the members run.

    Returns:
        An `EnsembleBundle` (the `ModelBundle` interface); `model` is the first member's model.
    """
    members = [bundle_from_checkpoint(m, device) for m in ckpt["ensemble"]]
    ws = member_weights(ckpt)
    if len(ws) != len(members):
        raise CxrlabError(f"ensemble checkpoint has {len(members)} members but {len(ws)} weights; rebuild it with cxrlab ensemble")
    first = members[0]
    return EnsembleBundle(ckpt, first.model, first.pre, first.spec, first.device, members=members, weights=ws)


def calibrate_ensemble(ckpt: dict, data: str | Path, split: str = "val", manifest: str | None = None,
                       target_recall: dict[str, float] | None = None, device: str = "auto") -> dict:
    """Fit the ensemble's own temperature and operating-point thresholds on a labelled split
    (`cxrlab.finalize.calibrate_on_split`)."""
    from cxrlab.finalize import calibrate_on_split

    return calibrate_on_split(ckpt, data, split, manifest, target_recall, device)
