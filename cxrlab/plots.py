"""Report plots, drawn from arrays read out of a run folder (see `cxrlab.report`).

Every function draws one PNG with matplotlib's object API (`matplotlib.figure.Figure` saved
through the Agg renderer): no pyplot, so importing or calling this module never changes the
user's backend and no figure stays registered in a global manager after it is saved.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

GREEN, RED, GREY = "#1a7f37", "#cf222e", "#6e7781"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    fig.savefig(out, format="png", dpi=100, facecolor="white")
    fig.clear()
    return out


def _finite(values) -> bool:
    return values is not None and len(values) > 0 and bool(np.isfinite(values).any())


def plot_history(history: dict[str, np.ndarray], out: str | Path) -> Path:
    """Loss, accuracy, AUC (train vs val where recorded) and learning rate per epoch, 2x2.

    Args:
        history: columns of history.csv as float arrays (missing values NaN); needs `epoch`.
        out: the PNG to write.

    Returns:
        `out`.
    """
    from matplotlib.ticker import MaxNLocator

    epoch = history["epoch"]
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2).ravel()
    panels = [("Loss", "loss"), ("Accuracy", "acc"), ("AUC", "auc")]
    for ax, (title, key) in zip(axes, panels):
        for split, style, color in (("train", "-o", "tab:blue"), ("val", "-s", "tab:orange")):
            y = history.get(f"{split}_{key}")
            if _finite(y):  # joined across epochs without a value (--val-every)
                ok = np.isfinite(y)
                ax.plot(epoch[ok], y[ok], style, ms=3, color=color, label=split)
        _finish_panel(ax, title, MaxNLocator, epoch)
    ax = axes[3]
    lr = history.get("lr")
    if _finite(lr):
        ax.plot(epoch, lr, "-o", ms=3, color="tab:purple", label="lr")
        if np.nanmin(lr) > 0:
            ax.set_yscale("log")
    _finish_panel(ax, "Learning rate", MaxNLocator, epoch)
    return _save(fig, out)


def _finish_panel(ax, title: str, locator, epoch: np.ndarray) -> None:
    ax.set_title(title)
    if _finite(epoch):
        pad = 0.05 * max(np.nanmax(epoch) - np.nanmin(epoch), 1)
        ax.set_xlim(np.nanmin(epoch) - pad, np.nanmax(epoch) + pad)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(locator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", color=GREY, transform=ax.transAxes)


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], out: str | Path) -> Path:
    """Confusion matrix as counts and row-normalised (recall per true class), side by side.

    Args:
        cm: (C, C) counts, rows true, columns predicted.
        class_names: C names.
        out: the PNG to write.

    Returns:
        `out`.
    """
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    side = max(4.5, 0.9 * len(class_names) + 2.5)
    fig = _figure(2 * side + 1, side)
    for ax, data, title, fmt in zip(fig.subplots(1, 2), (cm, norm), ("Counts", "Row-normalised"), ("{:.0f}", "{:.2f}")):
        vmax = max(np.nanmax(data) if np.isfinite(data).any() else 1.0, 1e-9)
        im = ax.imshow(np.nan_to_num(data), cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, shrink=0.8)
        for (i, j), v in np.ndenumerate(data):
            text = "–" if np.isnan(v) else fmt.format(v)
            color = "white" if np.isfinite(v) and v > vmax / 2 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color)
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=30, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    return _save(fig, out)


def one_vs_rest(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]):
    """(class index, name, binary targets, scores) per curve: the positive class when binary."""
    indices = [1] if len(class_names) == 2 else range(len(class_names))
    return [(k, class_names[k], (y_true == k).astype(int), probs[:, k]) for k in indices]


def _curve_ax(fig, title: str, xlabel: str, ylabel: str):
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    ax.grid(alpha=0.3)
    return ax


def plot_roc(y_true, probs, class_names, out, operating_points: list[dict] | dict | None = None) -> Path:
    """One-vs-rest ROC curves with AUC in the legend; the operating point marked if given.

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) probabilities.
        class_names: C names.
        out: the PNG to write.
        operating_points: optional {class, threshold, sensitivity, specificity}, or a list of them.

    Returns:
        `out`.
    """
    from sklearn.metrics import auc, roc_curve

    fig = _figure(7, 6)
    ax = _curve_ax(fig, "ROC (one-vs-rest)", "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
    ax.plot([0, 1], [0, 1], "--", color=GREY, lw=1)
    colors = {}
    for _, name, target, score in one_vs_rest(y_true, probs, class_names):
        if target.min() == target.max():
            ax.plot([], [], " ", label=f"{name}: no {'negatives' if target.min() else 'samples'}")
            continue
        fpr, tpr, _ = roc_curve(target, score)
        colors[name] = ax.plot(fpr, tpr, lw=2, label=f"{name} (AUC {auc(fpr, tpr):.3f})")[0].get_color()
    for op in [operating_points] if isinstance(operating_points, dict) else operating_points or []:
        _mark_operating_point(ax, op, class_names, colors)
    ax.legend(loc="lower right")
    return _save(fig, out)


def _mark_operating_point(ax, op: dict, class_names: Sequence[str], colors: dict) -> None:
    """A dot at (1 - specificity, sensitivity); `recall` is accepted for sensitivity and
    `class` may be a name or an index (as `metrics.choose_threshold` writes it)."""
    try:
        sens, spec = float(op.get("sensitivity", op.get("recall"))), float(op["specificity"])
    except (KeyError, TypeError, ValueError):
        log.warning("operating_point in metrics.json lacks sensitivity/specificity: %r", op)
        return
    name = op.get("class", "")
    if isinstance(name, int) and 0 <= name < len(class_names):
        name = class_names[name]
    thr = op.get("threshold")
    thr_text = f" @ {float(thr):.3f}" if isinstance(thr, (int, float)) else ""
    label = f"operating point {name}{thr_text}\nsens {sens:.3f}, spec {spec:.3f}"
    ax.plot([1 - spec], [sens], "o", ms=9, mec="black", color=colors.get(name, "black"), label=label, zorder=5)
    ax.annotate(f"sens {sens:.2f} / spec {spec:.2f}", (1 - spec, sens), xytext=(12, -14), textcoords="offset points")


def plot_pr(y_true, probs, class_names, out) -> Path:
    """One-vs-rest precision-recall curves with average precision in the legend.

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) probabilities.
        class_names: C names.
        out: the PNG to write.

    Returns:
        `out`.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = _figure(7, 6)
    ax = _curve_ax(fig, "Precision-recall (one-vs-rest)", "recall", "precision")
    for _, name, target, score in one_vs_rest(y_true, probs, class_names):
        if target.max() == 0:
            ax.plot([], [], " ", label=f"{name}: no samples")
            continue
        precision, recall, _ = precision_recall_curve(target, score)
        ap = average_precision_score(target, score)
        line = ax.step(recall, precision, where="post", lw=2, label=f"{name} (AP {ap:.3f})")[0]
        ax.axhline(target.mean(), ls=":", lw=1, color=line.get_color())
    ax.legend(loc="lower left")
    return _save(fig, out)


def select_samples(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, n: int = 16) -> list[int]:
    """A deterministic mix of up to `n` rows: about half wrong (most confident first), the rest
    correct, taken in turn from each class.

    Returns:
        Row indices, correct ones first.
    """
    idx = np.arange(len(y_true))
    wrong = sorted(idx[y_true != y_pred], key=lambda i: (-probs[i, y_pred[i]], i))
    per_class = [list(idx[(y_true == y_pred) & (y_true == k)]) for k in range(probs.shape[1])]
    correct = [c[r] for r in range(max(map(len, per_class), default=0)) for c in per_class if r < len(c)]
    n_wrong = min(len(wrong), n // 2)
    n_correct = min(len(correct), n - n_wrong)
    n_wrong = min(len(wrong), n - n_correct)
    return [int(i) for i in correct[:n_correct] + wrong[:n_wrong]]


def load_thumbnail(path: str, base_dirs: Sequence[Path] = (), size: int = 192) -> np.ndarray | None:
    """A grayscale thumbnail of an image, trying `path` as given and then under each base dir.

    Returns:
        (h, w) uint8 array, or None when the file cannot be found or read.
    """
    from PIL import Image

    p = Path(path)
    candidates = [p] if p.is_absolute() else [p, *(Path(b) / p for b in base_dirs)]
    for c in candidates:
        if not c.is_file():
            continue
        try:
            with Image.open(c) as im:
                im = im.convert("L")
                im.thumbnail((size, size))
                return np.asarray(im)
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a placeholder
            log.debug("cannot read %s: %s", c, exc)
    return None


def plot_samples(paths, y_true, y_pred, probs, class_names, out, base_dirs: Sequence[Path] = (), n: int = 16) -> Path:
    """A grid of sample predictions: green title when correct, red when wrong.

    Args:
        paths: N image paths (as in predictions.csv).
        y_true, y_pred: (N,) class indices.
        probs: (N, C) probabilities.
        class_names: C names.
        out: the PNG to write.
        base_dirs: folders against which relative paths are resolved.
        n: at most this many samples.

    Returns:
        `out`.
    """
    chosen = select_samples(y_true, y_pred, probs, n)
    cols = 4
    rows = max(1, math.ceil(len(chosen) / cols))
    fig = _figure(cols * 3, rows * 3.1)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, chosen):
        img = load_thumbnail(paths[i], base_dirs)
        if img is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", color=GREY, transform=ax.transAxes)
        else:
            ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ok = y_true[i] == y_pred[i]
        title = f"true: {class_names[y_true[i]]}\npred: {class_names[y_pred[i]]} ({probs[i, y_pred[i]]:.2f})"
        ax.set_title(title, color=GREEN if ok else RED, fontsize=10)
    if not chosen:
        axes[0].text(0.5, 0.5, "no predictions", ha="center", va="center", transform=axes[0].transAxes)
    return _save(fig, out)


def plot_table(columns: Sequence[str], rows: Sequence[Sequence[str]], row_labels: Sequence[str], out, title: str = "") -> Path:
    """A table rendered as an image (used for the per-class metrics).

    Returns:
        `out`.
    """
    fig = _figure(max(8.0, 1.3 * (len(columns) + 1)), max(2.2, 0.4 * (len(rows) + 1) + 0.6))
    ax = fig.subplots()
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(columns), rowLabels=list(row_labels), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(11)
    table.scale(1, 1.6)
    for (r, c), cell in table.get_celld().items():
        if r == 0 or c == -1:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#eaeef2")
    return _save(fig, out)


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15):
    """Top-label confidence vs accuracy in equal-width bins.

    Returns:
        (edges (n_bins+1,), accuracy per bin, mean confidence per bin, count per bin, ECE);
        empty bins have NaN accuracy and confidence.
    """
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(which, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
    ece = float(np.nansum(np.abs(acc - mean_conf) * count) / max(len(conf), 1))
    return edges, acc, mean_conf, count, ece


def plot_reliability(y_true, probs, out, n_bins: int = 15, calibration: dict | None = None) -> Path:
    """Reliability diagram (top-label confidence vs accuracy) with the ECE in the title.

    Args:
        y_true: (N,) true class indices.
        probs: (N, C) probabilities as saved in predictions.csv.
        out: the PNG to write.
        n_bins: equal-width confidence bins.
        calibration: optional {temperature, ece_before, ece_after} from metrics.json, shown too.

    Returns:
        `out`.
    """
    edges, acc, conf, count, ece = reliability_bins(y_true, probs, n_bins)
    fig = _figure(7, 7)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = edges[1] - edges[0]
    edges, acc, conf, count = edges[:-1][count > 0], acc[count > 0], conf[count > 0], count[count > 0]
    ax.bar(edges, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(edges, conf - acc, bottom=acc, width=width, align="edge", facecolor="none", edgecolor=RED,
           hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color=GREY, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability ({n_bins} bins), ECE {ece:.3f}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    ax_n.bar(edges, count, width=width, align="edge", color=GREY)
    ax_n.set(xlabel="top-label confidence", ylabel="samples")
    if calibration:
        parts = [f"{k.replace('_', ' ')} {float(v):.3f}" for k, v in calibration.items() if isinstance(v, (int, float))]
        fig.suptitle("metrics.json: " + ", ".join(parts), fontsize=10, color=GREY)
    return _save(fig, out)
