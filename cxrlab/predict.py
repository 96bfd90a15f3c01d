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
        One dict per file in input order: path, predicted, probabilities {CLASS: p}, error (None if ok).
    """
    from tqdm.auto import tqdm

    from cxrlab.evaluate import decide
    from cxrlab.inference import expand_inputs

    files = expand_inputs(inputs)
    names = bundle.class_names
    rows: list[dict] = []
    for start in tqdm(range(0, len(files), chunk), disable=None if (progress and len(files) > chunk) else True, unit="chunk"):
        part = files[start : start + chunk]
        logits, ok, errors = bundle.logits_for_files(part, tta=tta, batch_size=batch_size)
        probs = bundle.probs(logits) if len(ok) else np.zeros((0, len(names)))
        pred = decide(probs, bundle.ckpt) if len(ok) else []
        by_index = {i: j for j, i in enumerate(ok)}
        for i, f in enumerate(part):
            if i in by_index:
                j = by_index[i]
                rows.append({"path": str(f), "predicted": names[int(pred[j])],
                             "probabilities": {c: float(probs[j, k]) for k, c in enumerate(names)}, "error": None})
            else:
                reason = errors.get(str(f), "unreadable")
                log.warning("cannot predict %s: %s", f, reason)
                rows.append({"path": str(f), "predicted": None, "probabilities": None, "error": reason})
    return rows


def write_rows(rows: list[dict], output: str | None, class_names: list[str]) -> None:
    """Write predictions as CSV (`path,predicted,prob_<class>...,error`) or JSON, or print them."""
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
        w.writerow(["path", "predicted", *[f"prob_{c}" for c in class_names], "error"])
        for r in rows:
            probs = [f"{r['probabilities'][c]:.6f}" for c in class_names] if r["probabilities"] else [""] * len(class_names)
            w.writerow([r["path"], r["predicted"] or "", *probs, r["error"] or ""])
    finally:
        if output:
            fh.close()
