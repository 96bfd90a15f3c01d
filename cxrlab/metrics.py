"""Classification metrics, calibration, bootstrap intervals and operating points.

Everything here is pure numpy / scikit-learn on arrays: `y_true` holds class indices
(0..C-1), `probs` is an (n, C) array of class probabilities, `class_names` gives the C names in
index order. The only file IO is `write_metrics`, which saves the evaluate outputs.

Conventions (the `metrics.json` schema in docs/ARCHITECTURE.md):
- Per-class metrics are one-vs-rest. "Per-class accuracy" is correct / total *of that class*,
  i.e. the class recall (sensitivity), as in the reference notebooks.
- An AUC is undefined when a class has no positives or no negatives in `y_true`; it is then
  `None` (JSON null), never NaN. `auc_macro` averages the defined per-class AUCs (None if none).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

from cxrlab.errors import CxrlabError

T_MIN, T_MAX = 0.05, 20.0


# ---------------------------------------------------------------- validation


def _check(y_true, probs=None, n_classes: int | None = None, y_pred=None):
    """Validate and convert inputs; return (y_true int64, probs float64 or None, y_pred or None)."""
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise CxrlabError(f"y_true must be a non-empty 1-D array of class indices, got shape {y.shape}")
    y = y.astype(np.int64)
    p = None
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != y.size:
            raise CxrlabError(f"probs must have shape (n={y.size}, C), got {p.shape}")
        if not np.isfinite(p).all():
            raise CxrlabError("probs contain NaN or infinite values")
        n_classes = p.shape[1] if n_classes is None else n_classes
        if p.shape[1] != n_classes:
            raise CxrlabError(f"probs have {p.shape[1]} columns but there are {n_classes} classes")
    if n_classes is not None and (y.min() < 0 or y.max() >= n_classes):
        raise CxrlabError(f"y_true values must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    if y_pred is not None:
        y_pred = np.asarray(y_pred).astype(np.int64)
        if y_pred.shape != y.shape:
            raise CxrlabError(f"y_pred must have shape {y.shape}, got {y_pred.shape}")
        if n_classes is not None and (y_pred.min() < 0 or y_pred.max() >= n_classes):
            raise CxrlabError(f"y_pred values must lie in 0..{n_classes - 1}")
    return y, p, y_pred


def _safe_div(a, b):
    """a / b elementwise, 0 where b == 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


# ---------------------------------------------------------------- AUC


def _weighted_auc(scores: np.ndarray, pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC (Mann-Whitney, ties count 1/2) under sample weights.

    Args:
        scores: (n,) scores for the positive class.
        pos: (n,) bool, True for positives.
        weights: (B, n) non-negative weights, one row per resample (bootstrap counts).

    Returns:
        (B,) AUCs; NaN where a row has no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    w = weights[:, order]
    wp = np.add.reduceat(w * pos[order], starts, axis=1)
    wn = np.add.reduceat(w * ~pos[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def per_class_auc(y_true, probs) -> list[float | None]:
    """One-vs-rest ROC AUC of each class (None where undefined: no positives or no negatives)."""
    y, p, _ = _check(y_true, probs)
    ones = np.ones((1, y.size))
    out = [_weighted_auc(p[:, c], y == c, ones)[0] for c in range(p.shape[1])]
    return [None if math.isnan(a) else float(a) for a in out]


def _macro_auc(aucs: list[float | None]) -> float | None:
    """Binary AUC of class 1 for two classes, else the mean of the defined per-class AUCs."""
    if len(aucs) == 2:
        return aucs[1]
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None


# ---------------------------------------------------------------- core metrics


def compute_metrics(y_true, probs, class_names: list[str], y_pred=None) -> dict:
    """Accuracy, F1, AUC, confusion matrix and per-class metrics (the metrics.json schema).

    Args:
        y_true: (n,) true class indices.
        probs: (n, C) class probabilities, columns in `class_names` order.
        class_names: the C class names.
        y_pred: (n,) predicted indices (e.g. from `predict_with_thresholds`); default argmax.

    Returns:
        dict with accuracy, macro_f1 (over the classes present in `y_true` or `y_pred`, as sklearn's
        f1_score averages; auc_macro likewise over the classes with positives), weighted_f1, auc_macro, n,
        class_names, confusion_matrix
        (rows true, cols predicted, all C classes) and per_class[name] = {precision, recall, f1,
        support, auc, accuracy, sensitivity, specificity}. Per-class accuracy equals recall
        (correct / total of that class); sensitivity/specificity are one-vs-rest; undefined
        values are None.
    """
    C = len(class_names)
    y, p, y_pred = _check(y_true, probs, C, y_pred)
    if y_pred is None:
        y_pred = p.argmax(axis=1)
    labels = list(range(C))
    cm = confusion_matrix(y, y_pred, labels=labels)
    prec, rec, f1, sup = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    aucs = per_class_auc(y, p)
    per_class = {}
    for c, name in enumerate(class_names):
        op = _op_from_cm(cm, c)
        per_class[name] = {
            "precision": float(prec[c]), "recall": float(rec[c]), "f1": float(f1[c]),
            "support": int(sup[c]), "auc": aucs[c], "accuracy": float(rec[c]), **op,
        }
    return {
        "accuracy": float(np.mean(y == y_pred)),
        "macro_f1": _macro_over_present(f1, y, y_pred),
        "weighted_f1": float(np.sum(f1 * sup) / max(sup.sum(), 1)),
        "auc_macro": _macro_auc(aucs),
        "n": int(y.size),
        "class_names": list(class_names),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


def _macro_over_present(f1: np.ndarray, y: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean of the per-class F1 (every class, in order) over the classes in the labels or the predictions, as
    sklearn's f1_score averages: a class absent from the evaluated images and never predicted has no F1, so a site
    without pneumonia is not scored 0 for it."""
    return float(np.mean(f1[np.isin(np.arange(len(f1)), np.union1d(y, y_pred))]))


def _op_from_cm(cm: np.ndarray, c: int) -> dict:
    """One-vs-rest sensitivity and specificity of class `c` from a confusion matrix (None if undefined)."""
    tp = cm[c, c]
    pos = cm[c].sum()
    neg = cm.sum() - pos
    tn = neg - (cm[:, c].sum() - tp)
    return {"sensitivity": float(tp / pos) if pos else None,
            "specificity": float(tn / neg) if neg else None}


def operating_point(y_true, y_pred, class_index: int) -> dict:
    """Sensitivity and specificity of one class treated one-vs-rest.

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.
        class_index: the class treated as positive.

    Returns:
        {"sensitivity", "specificity"}; None where there are no positives / negatives.
    """
    y, _, yp = _check(y_true, y_pred=y_pred)
    C = int(max(y.max(), yp.max(), class_index)) + 1
    return _op_from_cm(confusion_matrix(y, yp, labels=list(range(C))), class_index)


def classification_report_text(y_true, y_pred, class_names: list[str]) -> str:
    """scikit-learn's text classification report over all classes (absent ones included, with a note giving the
    macro F1 of metrics.json when a class is absent and never predicted).

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.
        class_names: the C class names.

    Returns:
        the report as a string (digits=4, zero_division=0).
    """
    y, _, yp = _check(y_true, n_classes=len(class_names), y_pred=y_pred)
    text = classification_report(y, yp, labels=list(range(len(class_names))),
                                 target_names=list(class_names), digits=4, zero_division=0)
    absent = [c for k, c in enumerate(class_names) if k not in set(np.union1d(y, yp).tolist())]
    if absent:
        f1 = precision_recall_fscore_support(y, yp, labels=list(range(len(class_names))), zero_division=0)[2]
        text += (f"\n{', '.join(absent)}: no image of {'this class' if len(absent) == 1 else 'these classes'} and none "
                 f"predicted; 'macro avg' above counts {'it' if len(absent) == 1 else 'them'} as 0, metrics.json's "
                 f"macro_f1 leaves {'it' if len(absent) == 1 else 'them'} out: {_macro_over_present(f1, y, yp):.4f}\n")
    return text


def group_metrics(y_true, probs, class_names: list[str], groups, y_pred=None) -> dict:
    """`compute_metrics` for each subgroup (site, sex, scanner, ...).

    Args:
        y_true, probs, class_names, y_pred: as for `compute_metrics`.
        groups: (n,) group label of each sample (converted to str).

    Returns:
        {group: metrics dict}, groups in sorted order.
    """
    y, p, yp = _check(y_true, probs, len(class_names), y_pred)
    g = np.asarray([str(v) for v in groups])
    if g.shape != y.shape:
        raise CxrlabError(f"groups must have one entry per sample ({y.size}), got {g.size}")
    out = {}
    for name in sorted(set(g.tolist())):
        m = g == name
        out[name] = compute_metrics(y[m], p[m], class_names, None if yp is None else yp[m])
    return out


# ---------------------------------------------------------------- calibration


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|, bins (k/n_bins, (k+1)/n_bins].

    Args:
        probs: (n, C) class probabilities.
        y_true: (n,) true class indices.
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        the ECE in [0, 1].
    """
    y, p, _ = _check(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.abs(np.bincount(b, correct, n_bins) - np.bincount(b, conf, n_bins))
    return float(gap.sum() / y.size)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Softmax of logits / temperature (numerically stable).

    Args:
        logits: (n, C) raw model outputs.
        temperature: T > 0; T > 1 softens over-confident predictions.

    Returns:
        (n, C) probabilities.
    """
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / T)."""
    z = logits / temperature
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(y.size), y]))


def format_metric(value, digits: int = 4) -> str:
    """A metric for a console line: `digits` decimals, or "n/a" where it is undefined (e.g. AUC with one class)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fit_temperature(logits, y_true) -> float:
    """Temperature scaling: the T in [0.05, 20] minimising validation NLL of softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T is
    robust (no learning rate, no divergence) and exact to ~1e-6 in about 60 evaluations.

    Args:
        logits: (n, C) validation logits.
        y_true: (n,) validation labels.

    Returns:
        the fitted temperature.
    """
    y, z, _ = _check(y_true, logits)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(z, y, math.exp(a)), _nll(z, y, math.exp(b))
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(z, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(z, y, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def calibration_summary(val_logits, val_y, test_logits, test_y, n_bins: int = 15) -> dict:
    """Fit a temperature on validation and report test ECE and NLL before / after.

    Args:
        val_logits, val_y: validation logits (n, C) and labels, used to fit T.
        test_logits, test_y: test logits and labels, used to measure calibration.
        n_bins: ECE bins.

    Returns:
        {temperature, ece_before, ece_after, nll_before, nll_after}.
    """
    t = fit_temperature(val_logits, val_y)
    y, z, _ = _check(test_y, test_logits)
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(apply_temperature(z, 1.0), y, n_bins),
        "ece_after": expected_calibration_error(apply_temperature(z, t), y, n_bins),
        "nll_before": _nll(z, y, 1.0),
        "nll_after": _nll(z, y, t),
    }


# ---------------------------------------------------------------- bootstrap


def _stratified_counts(y: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) multiplicity of each sample in B resamples drawn with replacement within each class."""
    n = y.size
    flat = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        draw = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
        flat.append((draw + n * np.arange(n_resamples)[:, None]).ravel())
    counts = np.bincount(np.concatenate(flat), minlength=n_resamples * n)
    return counts.reshape(n_resamples, n).astype(np.float64)


def _resample_stats(y, yp, p, w: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, per-class recall and macro AUC for each row of weights `w` (B, n)."""
    C = p.shape[1]
    cm = (w @ np.eye(C * C)[y * C + yp]).reshape(-1, C, C)  # (B, true, pred)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    f1 = _safe_div(2 * tp, support + predicted)
    recall = np.where(support > 0, _safe_div(tp, support), np.nan)
    aucs = np.stack([_weighted_auc(p[:, c], y == c, w) for c in range(C)], axis=1)
    if C == 2:
        auc = aucs[:, 1]
    else:  # mean of the defined per-class AUCs, as in `_macro_auc`
        defined = np.isfinite(aucs).sum(axis=1)
        auc = np.where(defined > 0, _safe_div(np.nansum(aucs, axis=1), defined), np.nan)
    return {"accuracy": tp.sum(axis=1) / w.sum(axis=1), "macro_f1": f1.mean(axis=1),
            "auc_macro": auc, "recall": recall}


def _interval(samples: np.ndarray, point: float | None, alpha: float) -> list[float] | None:
    """Percentile interval of the finite samples, widened to contain the point estimate."""
    samples = samples[np.isfinite(samples)]
    if point is None or samples.size == 0:
        return None
    lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return [float(min(lo, point)), float(max(hi, point))]


def bootstrap_ci(y_true, probs, class_names: list[str], n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05, y_pred=None) -> dict:
    """Stratified percentile-bootstrap confidence intervals.

    Each resample draws, within every true class, as many samples as the class has (with
    replacement), so class supports stay fixed and every class stays present. Resamples are
    vectorised as (B, n) multiplicity weights; accuracy / F1 / recall come from weighted
    confusion counts and AUC from a weighted rank (Mann-Whitney) formula.

    The percentile interval may exclude the point estimate when the bootstrap distribution is
    very skewed or discrete (few samples, ties, AUC near 1); it is then widened to include the
    estimate, so that a reported interval never contradicts the reported value.

    Args:
        y_true: (n,) true class indices.
        probs: (n, C) class probabilities.
        class_names: the C class names.
        n_resamples: number of bootstrap resamples B.
        seed: random seed (results are deterministic for a seed).
        alpha: 1 - confidence level (0.05 gives 95% intervals).
        y_pred: (n,) predictions (default argmax), e.g. thresholded ones.

    Returns:
        {"accuracy": [lo, hi], "macro_f1": [...], "auc_macro": [...] or None,
         "recall_<CLASS>": [...] or None (class absent)}.
    """
    if not 0 < alpha < 1 or n_resamples < 1:
        raise CxrlabError(f"need 0 < alpha < 1 and n_resamples >= 1, got {alpha}, {n_resamples}")
    C = len(class_names)
    y, p, yp = _check(y_true, probs, C, y_pred)
    yp = p.argmax(axis=1) if yp is None else yp
    point = compute_metrics(y, p, class_names, yp)
    rng = np.random.default_rng(seed)
    chunk = max(1, int(4e6 // y.size))  # bound the (chunk, n) weight matrix to ~32 MB
    parts = [_resample_stats(y, yp, p, _stratified_counts(y, min(chunk, n_resamples - i), rng))
             for i in range(0, n_resamples, chunk)]
    stats = {k: np.concatenate([s[k] for s in parts]) for k in parts[0]}
    out = {k: _interval(stats[k], point[k], alpha) for k in ("accuracy", "macro_f1", "auc_macro")}
    for c, name in enumerate(class_names):
        rec = point["per_class"][name]["recall"] if point["per_class"][name]["support"] else None
        out[f"recall_{name}"] = _interval(stats["recall"][:, c], rec, alpha)
    return out


# ---------------------------------------------------------------- operating points


def choose_threshold(y_true, probs, class_index: int, target_recall: float) -> dict:
    """The largest threshold on P(class) whose recall on these data is >= target_recall.

    The largest such threshold gives the fewest false positives, i.e. the highest specificity
    at the requested sensitivity. Fit it on validation data, then report it on test data.

    Args:
        y_true: (n,) true class indices.
        probs: (n, C) class probabilities.
        class_index: the class to screen for.
        target_recall: required recall (sensitivity) in (0, 1].

    Returns:
        {class, threshold, recall, specificity, target_recall}; recall / specificity are
        those reached on these data (specificity None if there are no negatives).
    """
    y, p, _ = _check(y_true, probs)
    if not 0 < target_recall <= 1:
        raise CxrlabError(f"target_recall must be in (0, 1], got {target_recall}")
    if not 0 <= class_index < p.shape[1]:
        raise CxrlabError(f"class_index must be in 0..{p.shape[1] - 1}, got {class_index}")
    pos = y == class_index
    if not pos.any():
        raise CxrlabError(f"class {class_index} has no samples: cannot choose a threshold")
    s = p[:, class_index]
    ranked = np.sort(s[pos])[::-1]
    k = min(ranked.size, max(1, math.ceil(target_recall * ranked.size - 1e-9)))
    thr = float(ranked[k - 1])
    neg = ~pos
    return {"class": int(class_index), "threshold": thr,
            "recall": float(np.mean(s[pos] >= thr)),
            "specificity": float(np.mean(s[neg] < thr)) if neg.any() else None,
            "target_recall": float(target_recall)}


def predict_with_thresholds(probs, thresholds: dict[int, float]) -> np.ndarray:
    """Predictions with per-class decision thresholds.

    A class with a threshold is predicted when its probability reaches the threshold; when
    several do, the one with the largest prob / threshold ratio wins. Otherwise the argmax over
    the classes without a threshold is predicted (if every class has one, the largest ratio).

    Args:
        probs: (n, C) class probabilities.
        thresholds: {class_index: threshold}.

    Returns:
        (n,) int64 predicted class indices.
    """
    p = np.asarray(probs, dtype=np.float64)
    C = p.shape[1]
    if any(not 0 <= int(c) < C for c in thresholds):
        raise CxrlabError(f"threshold classes must be in 0..{C - 1}, got {sorted(thresholds)}")
    t = np.full(C, np.nan)
    for c, v in thresholds.items():
        t[int(c)] = max(float(v), 1e-12)
    has = ~np.isnan(t)
    ratio = np.where(has, p / np.where(has, t, 1.0), -np.inf)
    fired = (ratio >= 1.0).any(axis=1)
    rest = np.where(has, -np.inf, p)
    fallback = rest.argmax(axis=1) if (~has).any() else ratio.argmax(axis=1)
    return np.where(fired, ratio.argmax(axis=1), fallback).astype(np.int64)


# ---------------------------------------------------------------- JSON output


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types, tuples and Paths to JSON types; NaN/inf become None.

    Args:
        obj: nested dicts / lists / numpy arrays and scalars.

    Returns:
        an object `json.dumps(..., allow_nan=False)` accepts.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_metrics(out_dir, metrics: dict, report_text: str | None = None) -> list[Path]:
    """Write metrics.json (atomically) and, if given, classification_report.txt.

    Args:
        out_dir: output folder (created if missing).
        metrics: the metrics dict (converted with `to_jsonable`).
        report_text: text from `classification_report_text`.

    Returns:
        the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    written = [path]
    if report_text is not None:
        (out / "classification_report.txt").write_text(report_text)
        written.append(out / "classification_report.txt")
    return written
