"""`cxrlab predict`: classes and probabilities for files and folders; each bad file gets its own error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)


def predict_paths(bundle, inputs: list[str], tta: bool = False, batch_size: int = 64, progress: bool = False,
                  chunk: int = 512) -> list[dict]:
    """Predict every image under `inputs`.

    Args:
        bundle: a `ModelBundle` (or anything with `logits_for_files`, `probs`, `class_names`).
        inputs: files and folders (searched recursively).
        tta: flip test-time augmentation.
        batch_size: inference batch.
        progress: show a progress bar over chunks.
        chunk: files decoded at a time (bounds memory on huge folders).

    Returns:
        One dict per file in input order: path, predicted, probabilities {CLASS: p}, error (None if ok),
        warning (None, or why the image does not look like a radiograph: `file_warning`).
    """
    from tqdm.auto import tqdm

    from cxrlab.inference import expand_inputs

    files = expand_inputs(inputs)
    rows: list[dict] = []
    for start in tqdm(range(0, len(files), chunk), disable=None if (progress and len(files) > chunk) else True, unit="chunk"):
        rows += _predict_chunk(bundle, files[start : start + chunk], tta, batch_size)
    warned = sum(r["warning"] is not None for r in rows)
    if warned:
        log.warning("%d of %d image(s) do not look like radiographs (blank, constant, saturated or tiny): their "
                    "predictions mean little; see the warning column", warned, len(rows))
    return rows


def _predict_chunk(bundle, part: list[Path], tta: bool, batch_size: int) -> list[dict]:
    from cxrlab.evaluate import decide

    names = bundle.class_names
    decode = getattr(bundle, "decode_and_logits", None)
    if decode is not None:
        logits, ok, errors, arrays = decode(part, tta=tta, batch_size=batch_size)
    else:
        (logits, ok, errors), arrays = bundle.logits_for_files(part, tta=tta, batch_size=batch_size), None
    probs = bundle.probs(logits) if len(ok) else np.zeros((0, len(names)))
    pred = decide(probs, bundle.ckpt) if len(ok) else []
    by_index = {i: j for j, i in enumerate(ok)}
    rows = []
    for i, f in enumerate(part):
        if i in by_index:
            j = by_index[i]
            rows.append({"path": str(f), "predicted": names[int(pred[j])],
                         "probabilities": {c: float(probs[j, k]) for k, c in enumerate(names)}, "error": None,
                         "warning": file_warning(f, None if arrays is None else arrays[j])})
        else:
            reason = "file not found" if not Path(f).exists() else errors.get(str(f), "unreadable")
            log.warning("cannot predict %s: %s", f, reason)
            rows.append({"path": str(f), "predicted": None, "probabilities": None, "error": reason, "warning": None})
    return rows


def file_warning(path, model_input: np.ndarray | None) -> str | None:
    """Why a readable file does not look like a radiograph, or None: its stored size (header only) under
    `cxrlab.inference.MIN_SIDE` px on a side, or `sniff_intensity_warning` of the decoded model input."""
    from cxrlab.data.io import read_header
    from cxrlab.inference import input_warning

    try:
        head = read_header(path)
        width, height = head["width"], head["height"]
    except (CxrlabError, OSError, KeyError):
        width = height = None
    return input_warning(width, height, model_input)


def write_rows(rows: list[dict], output: str | None, class_names: list[str]) -> None:
    """Write predictions as CSV (`path,predicted,prob_<class>...,error,warning`) or JSON, or print them."""
    import csv
    import sys

    if output and output.lower().endswith(".json"):
        Path(output).write_text(json.dumps(rows, indent=2))
        return
    if output and not output.lower().endswith(".csv"):
        raise CxrlabError(f"--output must end in .csv or .json, got '{output}'")
    fh = open(output, "w", newline="") if output else sys.stdout
    try:
        w = csv.writer(fh)
        w.writerow(["path", "predicted", *[f"prob_{c}" for c in class_names], "error", "warning"])
        for r in rows:
            probs = [f"{r['probabilities'][c]:.6f}" for c in class_names] if r["probabilities"] else [""] * len(class_names)
            w.writerow([r["path"], r["predicted"] or "", *probs, r["error"] or "", r.get("warning") or ""])
    finally:
        if output:
            fh.close()
