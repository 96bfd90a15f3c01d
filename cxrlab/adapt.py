"""Site adaptation: re-estimate a model's BatchNorm statistics on a new site's unlabelled images.

A network's BatchNorm layers normalise each feature with a mean and variance measured on the training
images. Radiographs from another hospital (other detectors, exposure, processing) shift those
statistics, and a model that ranks its own site's images well can then call the new site's normals
abnormal. Re-measuring the statistics on a few hundred of the new site's images, without labels and
without changing any learned weight ("AdaBN", Li et al. 2016), undoes much of that shift. It needs only
images the site already has; it cannot fix a model that learned the wrong features.

`cxrlab adapt` writes an adapted copy of a checkpoint; `cxrlab evaluate --adapt-bn` adapts to the
evaluated images themselves before scoring them (transductive: report it as such).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

MIN_IMAGES = 32


def check_n(n: int) -> int:
    """Refuse an image count (--n) below what a BatchNorm estimate needs."""
    if n < MIN_IMAGES:
        raise CxrlabError(f"--n {n}: BatchNorm adaptation needs at least {MIN_IMAGES} images (default 1024)")
    return n


def adapt_batchnorm(bundle, arrays: np.ndarray, n: int = 1024, batch_size: int = 64, seed: int = 0,
                    where: str = "the images") -> int:
    """Replace the BatchNorm statistics of `bundle.model` with those of `arrays` (in place).

    Args:
        bundle: a `ModelBundle` (PyTorch model, its input spec and device).
        arrays: uint8 images (N, S, S) preprocessed with the model's own preset.
        n: at most this many images (a seeded subset when there are more).
        batch_size: forward batch.
        seed: seed of the subset.
        where: what the images are, for error messages.

    Returns:
        The number of images the statistics were measured on.
    """
    from cxrlab.engine import batchnorms_with_statistics, recalibrate_batchnorm, unnormalised_batchnorms

    check_n(n)
    if not hasattr(bundle, "model") or bundle.ckpt.get("ensemble"):
        raise CxrlabError("BatchNorm adaptation needs a PyTorch checkpoint (best.pt); adapt each ensemble member "
                          "or the checkpoint before exporting it to ONNX")
    if not batchnorms_with_statistics(bundle.model):
        raise CxrlabError(f"model {bundle.ckpt['model']['name']} has no BatchNorm layers: there is nothing to adapt")
    if len(arrays) < MIN_IMAGES:
        raise CxrlabError(f"BatchNorm adaptation needs at least {MIN_IMAGES} readable images from the new site; "
                          f"{where} gave {len(arrays)}")
    # a BatchNorm that training left at (0, 1) stays so: re-estimating the stem of a --freeze-stages model on the
    # Kermany test images cost 2 points of accuracy (0.918 -> 0.897) and 0.022 AUC (docs/BENCHMARKS.md)
    keep = unnormalised_batchnorms(bundle.model)
    used = recalibrate_batchnorm(bundle.model, torch.as_tensor(np.asarray(arrays)), bundle.spec, bundle.device,
                                 n=n, batch_size=batch_size, seed=seed, keep=keep)
    bundle.model.eval()
    log.info("BatchNorm statistics re-estimated on %d images from %s%s", used, where,
             f" ({len(keep)} layer(s) left unnormalised, as trained)" if keep else "")
    return used


def adapt_checkpoint(checkpoint: str | Path, inputs: list[str], out: str | Path, n: int = 1024,
                     batch_size: int = 64, device: str = "auto", seed: int = 0) -> dict:
    """`cxrlab adapt`: write a copy of `checkpoint` whose BatchNorm statistics come from `inputs`.

    Args:
        checkpoint: a cxrlab checkpoint (not an ensemble).
        inputs: image files and folders from the new site (labels are not needed or read).
        out: the adapted checkpoint to write (must differ from `checkpoint`).
        n: at most this many images.
        batch_size: forward batch.
        device: auto, cpu, cuda.
        seed: seed of the subset when there are more than `n` images.

    Returns:
        The `adapted` record stored in the new checkpoint.
    """
    from cxrlab.checkpoint import load_checkpoint, save_checkpoint
    from cxrlab.inference import bundle_from_checkpoint, expand_inputs, inference_device

    src, dst = Path(checkpoint), Path(out)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CxrlabError(f"--out {dst} is the checkpoint being adapted; write the adapted copy to a new file")
    ckpt = load_checkpoint(src)
    if ckpt.get("ensemble"):
        raise CxrlabError(f"'{src}' is an ensemble: adapt each member checkpoint, then build the ensemble again")
    bundle = bundle_from_checkpoint(ckpt, inference_device(device))
    files = expand_inputs(inputs)
    arrays, ok, errors = bundle.arrays_for_files(files)
    for path, reason in errors.items():
        log.warning("skipped %s: %s", path, reason)
    used = adapt_batchnorm(bundle, arrays, n=n, batch_size=batch_size, seed=seed, where=", ".join(inputs))
    record = {"method": "batchnorm statistics (AdaBN)", "images": used, "readable": len(ok), "unreadable": len(errors),
              "inputs": [str(i) for i in inputs], "base_checkpoint": str(src),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    state = {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({**ckpt, "state_dict": state, "adapted": record}, dst)
    return record
