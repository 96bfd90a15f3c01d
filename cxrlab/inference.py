"""Run a trained model on files: the checkpoint alone defines preprocessing, model and classes.

`load_model_bundle(path)` accepts a cxrlab checkpoint (`.pt`) and returns a `ModelBundle` whose
`logits_for_files` decodes with the exact preset the model was trained with.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrlab.data.preprocess import Preprocess
from cxrlab.engine import InputSpec, predict_logits
from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

MIN_SIDE = 32  # a decoded image smaller than this on a side gets a warning: no radiograph survives at that size


class BundleBase:
    """What every inference engine shares: file decoding with the model's preset, calibrated probabilities.

    Subclasses provide `ckpt` (with class_names, temperature), `pre` and `logits_for_arrays`.
    """

    ckpt: dict
    pre: Preprocess

    @property
    def class_names(self) -> list[str]:
        return list(self.ckpt["class_names"])

    def logits_for_arrays(self, images, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        raise NotImplementedError

    def arrays_for_files(self, paths: list, cache: bool | None = None,
                         progress: bool = False) -> tuple[np.ndarray, list[int], dict[str, str]]:
        """Decode files with the model's preset: (uint8 arrays (n_ok, S, S), their indices, {path: reason})."""
        from cxrlab.data.cache import load_arrays

        return load_arrays(paths, self.pre, cache_dir=None if cache else False,
                           workers=min(os.cpu_count() or 1, 4), progress=progress)

    def logits_for_files(self, paths: list, tta: bool = False, batch_size: int = 64, cache: bool | None = None,
                         progress: bool = False) -> tuple[np.ndarray, list[int], dict[str, str]]:
        """Decode files (bad ones reported, not raised) and compute logits.

        Returns:
            (logits of the readable files, their indices into `paths`, {path: reason} for the others).
        """
        return self.decode_and_logits(paths, tta=tta, batch_size=batch_size, cache=cache, progress=progress)[:3]

    def decode_and_logits(self, paths: list, tta: bool = False, batch_size: int = 64, cache: bool | None = None,
                          progress: bool = False) -> tuple[np.ndarray, list[int], dict[str, str], np.ndarray]:
        """`logits_for_files` plus the decoded model inputs (uint8 (n_ok, S, S), this bundle's preset), so that a
        caller can look at what the model saw (`input_warning`) without decoding the files twice."""
        arrays, ok, errors = self.arrays_for_files(paths, cache=cache, progress=progress)
        if not ok:
            return np.zeros((0, len(self.class_names)), np.float32), ok, errors, arrays
        return self.logits_for_arrays(arrays, tta=tta, batch_size=batch_size), ok, errors, arrays

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (the checkpoint's temperature)."""
        from cxrlab.metrics import apply_temperature

        return apply_temperature(logits, float(self.ckpt.get("temperature") or 1.0))


@dataclass
class ModelBundle(BundleBase):
    """A PyTorch model ready for inference, with everything needed to preprocess its input."""

    ckpt: dict
    model: torch.nn.Module
    pre: Preprocess
    spec: InputSpec
    device: torch.device

    def logits_for_arrays(self, images: np.ndarray | torch.Tensor, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Logits for preprocessed uint8 images (N, S, S)."""
        t = torch.as_tensor(images)
        return predict_logits(self.model, t, self.spec, self.device, batch_size=batch_size, tta=tta)


def bundle_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> ModelBundle:
    """Build a `ModelBundle` from a loaded checkpoint dict."""
    from cxrlab.checkpoint import build_model

    dev = torch.device(device)
    if dev.type == "cuda":
        full_fp32_on_cuda()
    model = build_model(ckpt, dev)
    in_chans = ckpt["model"]["in_chans"]
    spec = InputSpec(list(ckpt["mean"]), list(ckpt["std"]), in_chans)
    return ModelBundle(ckpt, model, Preprocess.of_checkpoint(ckpt), spec, dev)


def full_fp32_on_cuda() -> None:
    """No TF32 in CUDA convolutions and matmuls (PyTorch's default allows it in convolutions).

    With TF32 a model's probabilities on an H100 differed from the CPU's by up to 0.0066 and flipped a
    borderline label (bench/gpu_check.sh, docs/BENCHMARKS.md); thresholds and calibration fitted on one
    machine must hold on the other. Inference is cheap on a GPU either way; training turns TF32 back on.
    """
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def inference_device(device: str | torch.device, option: str = "--device") -> str:
    """`auto` -> CUDA when available, else CPU; any other name is checked (cpu, cuda, cuda:N, mps) and returned.

    Commands call it before any work, so that a typo or a missing GPU fails with the option's name.
    """
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise CxrlabError(f"{option} '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise CxrlabError(f"{option} {device}: no CUDA GPU is available here (torch {torch.__version__}); "
                              f"use {option} cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise CxrlabError(f"{option} {device}: only {n} CUDA GPU(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CxrlabError(f"{option} mps: Apple's MPS is not available here; use {option} cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CxrlabError(f"{option} '{device}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_device_for(checkpoint, device: str) -> None:
    """--device checked up front for a PyTorch checkpoint; an ONNX model runs with onnxruntime on the CPU whatever
    the device (loading it warns, `warn_onnx_device`)."""
    if not str(checkpoint).lower().endswith(".onnx"):
        inference_device(device)


def check_batch_size(batch_size: int, option: str = "--batch-size") -> int:
    """Refuse a batch size below 1 before any work."""
    if batch_size < 1:
        raise CxrlabError(f"{option} must be >= 1, got {batch_size}")
    return batch_size


def warn_onnx_device(device: str, path) -> None:
    """ONNX models run with onnxruntime on the CPU: say so when another --device was asked for."""
    if str(device) not in ("auto", "cpu"):
        log.warning("--device %s is ignored for the ONNX model %s: it runs with onnxruntime on the CPU "
                    "(pass the .pt checkpoint to run on %s)", device, path, device)


def bundle_for(ckpt: dict, device: str = "auto") -> ModelBundle:
    """The inference bundle of a loaded checkpoint or ensemble checkpoint."""
    dev = inference_device(device)
    if ckpt.get("ensemble"):
        from cxrlab.ensemble import bundle_from_ensemble

        return bundle_from_ensemble(ckpt, dev)
    return bundle_from_checkpoint(ckpt, dev)


def load_model_bundle(path: str | Path, device: str = "auto") -> ModelBundle:
    """Load a checkpoint for inference (device `auto`: CUDA when available, else CPU)."""
    from cxrlab.checkpoint import file_kind, load_checkpoint

    path = Path(path)
    if path.suffix.lower() != ".onnx" and path.is_file() and file_kind(path) == "onnx":
        raise CxrlabError(f"'{path}' is an ONNX model named like a PyTorch checkpoint: rename it to .onnx")
    if path.suffix.lower() == ".onnx":
        from cxrlab.export import load_onnx_bundle

        warn_onnx_device(device, path)
        return load_onnx_bundle(path)
    return bundle_for(load_checkpoint(path, map_location="cpu"), device)


def as_bundle(checkpoint, device: str = "auto"):
    """A loaded bundle as it is, or a checkpoint path loaded with `load_model_bundle`."""
    if hasattr(checkpoint, "model") and hasattr(checkpoint, "pre"):
        return checkpoint
    return load_model_bundle(checkpoint, device=device)


def check_inputs(inputs: list[str]) -> None:
    """Refuse, before any work, file or folder arguments that do not exist (a typo, or a pattern the shell
    did not expand), naming them all.

    Raises:
        CxrlabError: one or more inputs do not exist.
    """
    missing = [str(i) for i in inputs if not Path(i).exists()]
    if not missing:
        return
    msg = (f"{len(missing)} input path(s) not found: {', '.join(repr(m) for m in missing)}; "
           "check the spelling (nothing was processed)")
    if any(c in m for m in missing for c in "*?["):
        msg += (". A name with * or ? is a pattern the shell did not expand: no file matched it, or it was "
                "quoted; pass the folder itself (it is searched recursively) or an unquoted pattern that matches")
    raise CxrlabError(msg)


def input_warning(width: int | None, height: int | None, image: np.ndarray | None) -> str | None:
    """Why an input does not look like a radiograph, or None: tiny (under `MIN_SIDE` px on a side), or the
    intensity warning of `cxrlab.data.io.sniff_intensity_warning` (blank, constant, saturated, a mask).

    Args:
        width: the image's width in pixels as stored (None: unknown, not checked).
        height: its height in pixels.
        image: the decoded uint8 image (as read, or the model input), or None.

    Returns:
        One line ("; "-joined when several), or None.
    """
    from cxrlab.data.io import sniff_intensity_warning

    out = []
    if width is not None and height is not None and min(width, height) < MIN_SIDE:
        out.append(f"tiny image ({width}x{height} px, under {MIN_SIDE} px on a side)")
    sniffed = sniff_intensity_warning(np.asarray(image)) if image is not None else None
    if sniffed:
        out.append(sniffed)
    return "; ".join(out) or None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files and folders (searched recursively for image files) -> sorted unique file list.

    A path that does not exist is kept (callers report it per file as "file not found"); commands refuse such
    arguments up front with `check_inputs`. A folder without image files is logged.
    """
    from cxrlab.data.io import is_image_file

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and is_image_file(q))
            if not found:
                log.warning("no image files in the folder %s", p)
            files += found
        else:
            files.append(p)  # a missing one is reported per file, the others still run
    seen, out = set(), []
    for f in files:
        if f not in seen:
            seen.add(f)
            out.append(f)
    if not out:
        raise CxrlabError(f"no image files found in {', '.join(inputs)}")
    return out
