"""Evaluate a checkpoint: metrics.json (with calibration, CIs, operating points, groups),
classification_report.txt and predictions.csv, from logits the caller computed once.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)


def thresholds_by_index(ckpt: dict) -> dict[int, float]:
    """The checkpoint's decision thresholds ({CLASS: t}) keyed by class index."""
    names = list(ckpt["class_names"])
    return {names.index(c): float(t) for c, t in (ckpt.get("thresholds") or {}).items() if c in names}


def decide(probs: np.ndarray, ckpt: dict) -> np.ndarray:
    """Predicted class indices: the operating-point thresholds when the checkpoint has them, else argmax."""
    from cxrlab.metrics import predict_with_thresholds

    th = thresholds_by_index(ckpt)
    return predict_with_thresholds(probs, th) if th else probs.argmax(1)


def evaluation_metrics(ckpt: dict, logits: np.ndarray, y: np.ndarray, groups: list[str] | None = None,
                       n_boot: int = 1000, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """All metrics of one evaluation.

    Args:
        ckpt: the checkpoint (class names, temperature, thresholds).
        logits: (n, C) raw logits.
        y: true class indices.
        groups: optional group name per sample (e.g. the source hospital).
        n_boot: bootstrap resamples for the 95% intervals.
        seed: bootstrap seed.

    Returns:
        (metrics dict in the metrics.json schema, calibrated probabilities, predicted indices).
    """
    from cxrlab import metrics as M

    names = list(ckpt["class_names"])
    temp = float(ckpt.get("temperature", 1.0))
    probs = M.apply_temperature(logits, temp)
    y_pred = decide(probs, ckpt)
    out = M.compute_metrics(y, probs, names, y_pred=y_pred)
    raw = M.apply_temperature(logits, 1.0)
    out["calibration"] = {"temperature": temp, "ece_before": M.expected_calibration_error(raw, y),
                          "ece_after": M.expected_calibration_error(probs, y),
                          "fitted_on": ckpt.get("calibration_fitted_on", "not fitted (temperature 1)")}
    out["ci95"] = M.bootstrap_ci(y, probs, names, n_resamples=n_boot, seed=seed, y_pred=y_pred)
    ops = {}
    for c, t in (ckpt.get("thresholds") or {}).items():
        if c in names:
            ops[c] = {"threshold": t, **M.operating_point(y, y_pred, names.index(c))}
    if ops:
        out["operating_points"] = ops
        first = next(iter(ops))
        out["operating_point"] = {"class": first, **ops[first]}
    if groups is not None:
        out["groups"] = M.group_metrics(y, probs, names, list(groups), y_pred=y_pred)
    return out, probs, y_pred


def write_evaluation(out_dir: Path, metrics: dict, y: np.ndarray, probs: np.ndarray, y_pred: np.ndarray,
                     paths: list, class_names: list[str], errors: dict[str, str] | None = None) -> None:
    """Write metrics.json, classification_report.txt and predictions.csv into `out_dir`."""
    from cxrlab.metrics import classification_report_text, write_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    if errors:
        metrics["unreadable"] = errors
    write_metrics(out_dir, metrics, classification_report_text(y, y_pred, class_names))
    write_predictions_csv(out_dir / "predictions.csv", paths, probs, class_names, y=y, y_pred=y_pred, errors=errors)


def write_predictions_csv(path: Path, paths: list, probs: np.ndarray, class_names: list[str], y=None, y_pred=None,
                          errors: dict[str, str] | None = None) -> None:
    """One row per image: path, [true,] pred, prob_<class>...; unreadable files get an error column."""
    y_pred = probs.argmax(1) if y_pred is None else y_pred
    cols = ["path"] + (["true"] if y is not None else []) + ["pred"] + [f"prob_{c}" for c in class_names] + ["error"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for i, p in enumerate(paths):
            row = [str(p)] + ([class_names[int(y[i])]] if y is not None else []) + [class_names[int(y_pred[i])]]
            w.writerow(row + [f"{v:.6f}" for v in probs[i]] + [""])
        for p, reason in (errors or {}).items():
            w.writerow([p] + ([""] if y is not None else []) + [""] + [""] * len(class_names) + [reason])


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path, split: str = "test",
                        manifest: str | None = None, group_by: str | None = None, tta: bool = False,
                        adapt_bn: bool = False, device: str = "auto", n_boot: int = 1000, report: bool = True) -> dict:
    """`cxrlab evaluate`: score a checkpoint on a split (or a flat folder of class folders).

    Args:
        checkpoint: a cxrlab checkpoint (or ensemble).
        data: folder or manifest.
        out: output folder.
        split: train, val, test or all (a flat folder is `all`; `test` falls back to it).
        manifest: manifest CSV (for sources/groups).
        group_by: report metrics per `source`, `group` or `split`.
        tta: flip test-time augmentation.
        adapt_bn: re-estimate BatchNorm statistics on the evaluated images first (see cxrlab.adapt).
        device: auto, cpu, cuda.
        n_boot: bootstrap resamples (at least 1).
        report: draw plots and report.html.

    Returns:
        The metrics dict.
    """
    from cxrlab.inference import load_model_bundle

    if n_boot < 1:
        raise CxrlabError(f"--bootstrap must be at least 1 (resamples for the 95% confidence intervals; default 1000), "
                          f"got {n_boot}")
    bundle = load_model_bundle(checkpoint, device=device)
    samples, split = split_samples(data, split, manifest, bundle.ckpt["class_names"], checkpoint)
    paths = [s.path for s in samples]
    adapted = 0
    if adapt_bn:
        from cxrlab.adapt import adapt_batchnorm

        arrays, ok, errors = bundle.arrays_for_files(paths)
        adapted = adapt_batchnorm(bundle, arrays, where=f"the {split} split of {data}")
        logits = bundle.logits_for_arrays(arrays, tta=tta)
    else:
        logits, ok, errors = bundle.logits_for_files(paths, tta=tta)
    kept = [samples[i] for i in ok]
    names = list(bundle.ckpt["class_names"])
    y = label_indices(kept, names)
    groups = sample_groups(kept, group_by)
    metrics, probs, y_pred = evaluation_metrics(bundle.ckpt, logits, y, groups, n_boot=n_boot)
    metrics.update({"split": split, "checkpoint": str(checkpoint), "tta": tta, "data": str(data)})
    if adapt_bn:
        metrics["adapt_bn"] = {"images": adapted, "from": f"the evaluated {split} images (unlabelled)"}
    out = Path(out)
    write_evaluation(out, metrics, y, probs, y_pred, [s.path for s in kept], names, errors)
    if report:
        draw_report(out)
    return metrics


def split_samples(data: str | Path, split: str, manifest: str | None, class_names: list[str],
                  checkpoint) -> tuple[list, str]:
    """The labelled samples of one split (a flat folder of class folders is `all`; `test` falls back to it).

    Only that split is checked: the other splits may lack classes. `checkpoint` names the checkpoint in
    messages (its path; None: "the checkpoint").

    Raises CxrlabError when the split is missing or has classes the checkpoint does not know.
    """
    from cxrlab.data.dataset import build_index

    index = build_index(data, manifest, require=(), val_fraction=0, check=(split, "all") if split == "test" else (split,))
    if split not in index.splits:
        if split == "test" and "all" in index.splits:
            split = "all"
        else:
            raise CxrlabError(f"'{data}' has no '{split}' split (it has: {', '.join(index.splits)}); pass --split")
    samples = index.splits[split]
    _check_classes(class_names, sorted({s.label for s in samples}), checkpoint)
    return samples, split


def label_indices(samples: list, class_names: list[str]) -> np.ndarray:
    """Class indices of samples, matched to the checkpoint's class names without regard to case."""
    return np.array([class_names.index(_match(s.label, class_names)) for s in samples], dtype=np.int64)


def _match(label: str, names: list[str]) -> str:
    low = {n.lower(): n for n in names}
    return low[label.lower()]


def _check_classes(ckpt_names: list[str], data_names: list[str], checkpoint) -> None:
    low = {n.lower() for n in ckpt_names}
    extra = [c for c in data_names if c.lower() not in low]
    if extra:
        which = f"checkpoint '{checkpoint}'" if checkpoint is not None else "the checkpoint"
        raise CxrlabError(f"the data has classes {', '.join(extra)} that {which} does not know "
                          f"(it was trained on {', '.join(ckpt_names)}); use a data set with the same classes")


def sample_groups(samples: list, group_by: str | None) -> list[str] | None:
    if not group_by:
        return None
    if group_by not in ("source", "group", "split", "folder"):
        raise CxrlabError(f"--group-by must be source, group, split or folder, got '{group_by}'")
    if group_by == "folder":
        return [s.path.parent.parent.name for s in samples]
    vals = [getattr(s, group_by) for s in samples]
    if all(v is None for v in vals):
        raise CxrlabError(f"--group-by {group_by}: the data has no '{group_by}' column; pass a --manifest that has one")
    return [v or "unknown" for v in vals]


def draw_report(folder: Path) -> None:
    """Draw plots and report.html in a folder; a failure is logged, never raised (results stay)."""
    try:
        from cxrlab.report import build_report
    except ImportError:
        return
    try:
        build_report(folder)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the evaluation
        log.warning("could not draw the report in %s: %s", folder, exc)

