"""Checkpoints: `state_dict` plus everything needed to use the model, written atomically.

A checkpoint is a plain dict of tensors and primitives (see docs/ARCHITECTURE.md), so it loads
with `torch.load(weights_only=True)`; files that need pickled code are refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from cxrlab import __version__
from cxrlab.errors import CxrlabError

FORMAT_VERSION = 1


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write a checkpoint atomically (temp file in the same folder, fsync, rename).

    A crash or kill at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = {"format_version": FORMAT_VERSION, "cxrlab_version": __version__, **payload}
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable: the error below says why
            pass
        raise CxrlabError(f"cannot write checkpoint {path}: {exc.strerror or exc}. Check free disk space and permissions") from exc


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, or a legacy pickle


def is_torch_file(path: str | Path) -> bool:
    """Whether a file starts like a PyTorch checkpoint (its first bytes only; no parsing)."""
    with open(path, "rb") as fh:
        return fh.read(4).startswith(_TORCH_MAGIC)


def file_kind(path: str | Path) -> str:
    """What a model file holds, by its content: "torch" (zip or legacy pickle), "onnx", "empty", "text" or "other"."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(_TORCH_MAGIC):
        return "torch"
    if not head:
        return "empty"
    if _is_onnx(path):
        return "onnx"
    try:
        head.decode("utf-8")
        return "text" if b"\x00" not in head else "other"
    except UnicodeDecodeError:
        return "other"


def _is_onnx(path: str | Path) -> bool:
    try:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a protobuf DecodeError, or onnx missing: not an ONNX model we can tell
        return False
    return m.ir_version > 0 and len(m.graph.node) > 0


def check_checkpoint_file(path: str | Path, command: str = "this command") -> Path:
    """Refuse a --checkpoint that is missing, an ONNX model or no PyTorch file at all, before any work.

    Args:
        path: the file given as --checkpoint.
        command: who needs the `.pt` file, for the message (e.g. "cxrlab calibrate").

    Returns:
        The path.
    """
    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"checkpoint '{path}' does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    kind = file_kind(path)
    if kind == "onnx":
        raise CxrlabError(f"'{path}' is an ONNX model; {command} needs the .pt checkpoint it was exported from "
                          "(best.pt / last.pt of the run)")
    if kind != "torch":
        what = {"empty": "an empty file", "text": "a text file"}.get(kind, "an unknown binary file")
        raise CxrlabError(f"'{path}' is not a PyTorch checkpoint ({what}), so not a readable checkpoint. Pass a "
                          "best.pt/last.pt written by cxrlab train")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a cxrlab checkpoint with `weights_only=True`.

    Args:
        path: the `.pt` file.
        map_location: where tensors go.

    Returns:
        The checkpoint dict.
    """
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign files
        if isinstance(exc, pickle.UnpicklingError) and ("Weights only load failed" in str(exc) or "global" in str(exc)):
            raise CxrlabError(f"'{path}' needs arbitrary Python code to load (a pickled model or object), which cxrlab "
                              f"refuses for safety. Re-save it as a state_dict checkpoint.") from exc
        raise CxrlabError(f"'{path}' is not a readable checkpoint ({type(exc).__name__}). Pass a best.pt/last.pt "
                          "written by cxrlab train") from exc
    return validate_checkpoint(ckpt, path)


def validate_checkpoint(ckpt, path) -> dict:
    """Check a loaded object is a cxrlab checkpoint this version understands."""
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt or "class_names" not in ckpt:
        raise CxrlabError(f"'{path}' is not a cxrlab checkpoint (no model/class_names/state_dict). For raw weights use --weights FILE with train")
    version = ckpt.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise CxrlabError(f"'{path}' has checkpoint format {version}, newer than this cxrlab ({__version__}, format "
                          f"{FORMAT_VERSION}). Upgrade cxrlab: pip install -U cxrlab")
    return ckpt


def build_model(ckpt: dict, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint (eval mode) from the checkpoint alone."""
    from cxrlab.models import create_model

    m = ckpt["model"]
    model = create_model(m["name"], num_classes=m["num_classes"], in_chans=m["in_chans"], **m.get("kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CxrlabError(f"checkpoint weights do not fit model {m['name']}: {str(exc)[:300]}") from exc
    return model.to(device).eval()


def model_meta(ckpt: dict) -> dict:
    """What a user of the model needs to know, for `/api/model`, ONNX metadata and reports."""
    return {"architecture": ckpt["model"]["name"], "class_names": list(ckpt["class_names"]),
            "img_size": ckpt["img_size"], "in_chans": ckpt["model"]["in_chans"], "mean": ckpt["mean"],
            "std": ckpt["std"], "preprocess": ckpt.get("preprocess", {}), "temperature": ckpt.get("temperature", 1.0),
            "cxrlab_version": ckpt.get("cxrlab_version"), "epoch": ckpt.get("epoch"), "metric": ckpt.get("metric")}
