"""Plots and a self-contained report.html for a run or evaluation folder, drawn from its files.

Reads (whichever exist): history.csv, metrics.json, predictions.csv, config.yaml,
data_summary.json, cam/*.png and explain/*_cam.png (file contracts: docs/ARCHITECTURE.md).
Never called inside the training loop.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from cxrlab.camnames import parse_cam_name
from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

INPUTS = ("history.csv", "metrics.json", "predictions.csv")
PLOTS = ("history.png", "confusion.png", "roc.png", "pr.png", "reliability.png", "samples.png", "per_class.png")
PER_CLASS_COLUMNS = ("precision", "recall", "f1", "accuracy", "auc", "support")
OVERALL_KEYS = ("accuracy", "macro_f1", "weighted_f1", "auc_macro", "n")
GALLERY_MAX = 24


@dataclass
class Predictions:
    """Rows of predictions.csv that hold a prediction (rows with an `error` are skipped)."""

    paths: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    class_names: list[str]
    skipped: int = 0


def read_history(path: str | Path) -> dict[str, np.ndarray] | None:
    """history.csv as {column: float array} (blank cells NaN); None when absent or empty."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "epoch" not in rows[0]:
        log.warning("%s has no rows or no 'epoch' column; no history plot", path)
        return None
    return {col: np.array([_to_float(r.get(col)) for r in rows]) for col in rows[0]}


def _to_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_json(path: str | Path) -> dict | None:
    """A JSON object file, None when absent; a CxrlabError when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrlabError(f"{path}: not valid JSON ({exc}); regenerate it with cxrlab evaluate") from exc
    if not isinstance(data, dict):
        raise CxrlabError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_predictions(path: str | Path, class_names: list[str] | None = None) -> Predictions | None:
    """predictions.csv (path,true,pred,prob_<CLASS>...; rows with an `error` skipped).

    Args:
        path: the CSV.
        class_names: class order (from metrics.json); default: the order of the prob_ columns.

    Returns:
        Predictions, or None when the file is absent or has no usable row.
    """
    path = Path(path)
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames or []
    prob_cols = [c[5:] for c in fields if c.startswith("prob_")]
    if not class_names or any(c not in prob_cols for c in class_names):
        class_names = prob_cols
    if "true" not in fields:
        log.info("%s has no 'true' column (unlabelled images): no curves or samples", path)
        return None
    if not class_names or not {"path", "pred"} <= set(fields):
        raise CxrlabError(f"{path}: expected columns path,true,pred,prob_<CLASS>...; got {','.join(fields)}")
    index = {c: k for k, c in enumerate(class_names)}
    kept, skipped = [], 0
    for r in rows:
        if (r.get("error") or "").strip() or r["true"] not in index or r["pred"] not in index:
            skipped += 1
            continue
        kept.append(r)
    if skipped:
        log.info("%s: skipped %d rows with an error or an unknown label", path, skipped)
    if not kept:
        return None
    probs = np.array([[_to_float(r[f"prob_{c}"]) for c in class_names] for r in kept])
    return Predictions(
        paths=[r["path"] for r in kept],
        y_true=np.array([index[r["true"]] for r in kept]),
        y_pred=np.array([index[r["pred"]] for r in kept]),
        probs=np.nan_to_num(probs),
        class_names=list(class_names),
        skipped=skipped,
    )


@dataclass
class RunFiles:
    """Everything the report reads from a folder."""

    folder: Path
    history: dict | None
    metrics: dict | None
    predictions: Predictions | None
    data_summary: dict | None
    config_text: str | None


def load_folder(folder: str | Path) -> RunFiles:
    """Read a run or evaluation folder.

    Raises:
        CxrlabError: the folder does not exist or holds none of history.csv, metrics.json,
            predictions.csv.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CxrlabError(f"{folder}: not a folder; pass a run folder (cxrlab train --out) or an evaluation folder (cxrlab evaluate --out)")
    if not any((folder / name).is_file() for name in INPUTS):
        raise CxrlabError(f"{folder}: none of {', '.join(INPUTS)} found; is this a run or evaluation folder?")
    metrics = read_json(folder / "metrics.json")
    names = metrics.get("class_names") if metrics else None
    config = folder / "config.yaml"
    return RunFiles(
        folder=folder,
        history=read_history(folder / "history.csv"),
        metrics=metrics,
        predictions=read_predictions(folder / "predictions.csv", names),
        data_summary=read_json(folder / "data_summary.json"),
        config_text=config.read_text(encoding="utf-8", errors="replace") if config.is_file() else None,
    )


def _class_names(run: RunFiles) -> list[str]:
    if run.metrics and run.metrics.get("class_names"):
        return [str(c) for c in run.metrics["class_names"]]
    return run.predictions.class_names if run.predictions else []


def _confusion(run: RunFiles, names: list[str]) -> np.ndarray | None:
    cm = (run.metrics or {}).get("confusion_matrix")
    if cm is not None and np.shape(cm) == (len(names), len(names)):
        return np.asarray(cm)
    p = run.predictions
    if p is None or p.class_names != names:
        return None
    out = np.zeros((len(names), len(names)), dtype=int)
    np.add.at(out, (p.y_true, p.y_pred), 1)
    return out


def per_class_rows(metrics: dict, names: list[str]) -> list[list[str]]:
    """Formatted per-class rows in PER_CLASS_COLUMNS order (missing values as '–')."""
    per_class = metrics.get("per_class") or {}
    return [[_fmt((per_class.get(c) or {}).get(k)) for k in PER_CLASS_COLUMNS] for c in names]


def _fmt(value) -> str:
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _plan(run: RunFiles) -> dict:
    """{plot file name: zero-argument drawing function} for the plots the inputs allow."""
    from cxrlab import plots

    folder, names, p, m = run.folder, _class_names(run), run.predictions, run.metrics or {}
    todo = {}
    if run.history is not None:
        todo["history.png"] = lambda: plots.plot_history(run.history, folder / "history.png")
    cm = _confusion(run, names)
    if cm is not None:
        todo["confusion.png"] = lambda: plots.plot_confusion(cm, names, folder / "confusion.png")
    if p is not None:
        args = (p.y_true, p.probs, p.class_names)
        todo["roc.png"] = lambda: plots.plot_roc(*args, folder / "roc.png", _operating_points(m))
        todo["pr.png"] = lambda: plots.plot_pr(*args, folder / "pr.png")
        todo["samples.png"] = lambda: plots.plot_samples(
            p.paths, p.y_true, p.y_pred, p.probs, p.class_names, folder / "samples.png", base_dirs=[folder, Path.cwd()]
        )
        if m.get("calibration"):
            todo["reliability.png"] = lambda: plots.plot_reliability(p.y_true, p.probs, folder / "reliability.png", calibration=m["calibration"])
    if m.get("per_class") and names:
        rows = per_class_rows(m, names)
        todo["per_class.png"] = lambda: plots.plot_table(PER_CLASS_COLUMNS, rows, names, folder / "per_class.png", "Per-class metrics")
    return todo


def _operating_points(m: dict) -> list[dict]:
    """`operating_points` {class: {threshold, sensitivity, specificity}}, else `operating_point`."""
    ops = m.get("operating_points")
    if isinstance(ops, dict) and ops:
        return [{"class": c, **v} for c, v in ops.items() if isinstance(v, dict)]  # the class first, as in tables
    return [m["operating_point"]] if isinstance(m.get("operating_point"), dict) else []


def draw_all(folder: str | Path) -> list[Path]:
    """Draw every plot that the folder's files allow.

    Args:
        folder: a run folder or an evaluation folder.

    Returns:
        The PNG files written (a plot that fails is logged and left out).

    Raises:
        CxrlabError: the folder holds none of history.csv, metrics.json, predictions.csv.
    """
    written = []
    for name, draw in _plan(load_folder(folder)).items():
        try:
            written.append(draw())
        except Exception as exc:  # noqa: BLE001 - one broken plot must not cost the others
            log.warning("could not draw %s: %s: %s", name, type(exc).__name__, exc)
    return written


def build_report(folder: str | Path, title: str | None = None) -> Path:
    """draw_all, then write_html_report.

    Returns:
        The path of report.html.
    """
    draw_all(folder)
    return write_html_report(folder, title)


def write_html_report(folder: str | Path, title: str | None = None) -> Path:
    """Write folder/report.html: one self-contained page (images as data URIs, inline CSS).

    Plots are taken from the PNGs already in the folder (see `draw_all`).

    Args:
        folder: a run folder or an evaluation folder.
        title: page title; default "cxrlab report: <folder name>".

    Returns:
        The path of report.html.
    """
    run = load_folder(folder)
    title = title or f"cxrlab report: {run.folder.resolve().name}"
    page = render_page(run, title, datetime.now().strftime("%Y-%m-%d %H:%M"))
    out = run.folder / "report.html"
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def data_uri(path: str | Path) -> str:
    """A PNG (or JPEG) file as a base64 data URI."""
    path = Path(path)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def collect_cams(run: RunFiles) -> list[dict]:
    """Grad-CAM overlays: cam/*.png (latest epoch per image) and explain/*_cam.png.

    Returns:
        dicts(path, source, epoch, true, pred, stem); true/pred None when unknown. Explain files
        whose names carry no labels are matched to predictions.csv by image stem.
    """
    latest: dict[str, dict] = {}
    for f in sorted((run.folder / "cam").glob("*.png")):
        try:
            info = parse_cam_name(f.name)
        except ValueError:
            continue
        if info["stem"] not in latest or (info["epoch"] or 0) >= (latest[info["stem"]]["epoch"] or 0):
            latest[info["stem"]] = dict(info, path=f, source="training")
    found = sorted(latest.values(), key=lambda d: d["stem"])
    by_stem = {}
    if run.predictions:
        p = run.predictions
        by_stem = {Path(x).stem: (p.class_names[t], p.class_names[q]) for x, t, q in zip(p.paths, p.y_true, p.y_pred)}
    for f in sorted((run.folder / "explain").glob("*_cam.png")):
        try:
            info = parse_cam_name(f.name)
        except ValueError:
            stem = f.name[: -len("_cam.png")]
            true, pred = by_stem.get(stem, (None, None))
            info = dict(epoch=None, true=true, pred=pred, stem=stem)
        found.append(dict(info, path=f, source="explain"))
    return found


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:1.5rem 2rem;color:#1f2328;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
.muted{color:#656d76}table{border-collapse:collapse;margin:.6rem 0 1rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.3rem .7rem;text-align:right}th{background:#f6f8fa}
td:first-child,th:first-child{text-align:left}
figure{margin:0 0 1.2rem}figure img{max-width:100%;border:1px solid #d0d7de}
figcaption{color:#656d76;font-size:.9rem}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8rem}
.gallery figure{margin:0}.gallery img{width:100%}.ok{color:#1a7f37}.bad{color:#cf222e}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:.8rem;overflow:auto;font-size:.85rem}
"""
PLOT_CAPTIONS = {
    "history.png": "Training history: loss, accuracy, AUC and learning rate per epoch.",
    "confusion.png": "Confusion matrix: counts and row-normalised (rows: true class).",
    "roc.png": "ROC curves, one-vs-rest.",
    "pr.png": "Precision-recall curves, one-vs-rest (dotted: prevalence).",
    "reliability.png": "Reliability diagram of the saved probabilities.",
    "samples.png": "Sample predictions (green: correct, red: wrong).",
    "per_class.png": "Per-class metrics.",
}


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(headers, rows) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(ci95: dict, key: str) -> str:
    v = ci95.get(key)
    return f"{_fmt(v[0])} – {_fmt(v[1])}" if isinstance(v, (list, tuple)) and len(v) == 2 else ""


def _data_summary_html(summary: dict | None) -> str:
    if not summary:
        return '<p class="muted">No data_summary.json.</p>'
    splits = [s for s in summary if isinstance(summary[s], dict)]
    classes = list(dict.fromkeys(c for s in splits for c in summary[s]))
    rows = [[c, *(summary[s].get(c, 0) for s in splits), sum(summary[s].get(c, 0) for s in splits)] for c in classes]
    rows.append(["total", *(sum(summary[s].values()) for s in splits), sum(r[-1] for r in rows)])
    return _table(["class", *splits, "total"], rows)


def _metrics_html(m: dict | None, names: list[str]) -> str:
    if not m:
        return '<p class="muted">No metrics.json.</p>'
    ci = m.get("ci95") or {}
    known = {*OVERALL_KEYS, "class_names", "confusion_matrix", "per_class", "calibration", "ci95", "groups", "operating_point", "operating_points"}
    extra = [k for k, v in m.items() if k not in known and isinstance(v, (str, int, float))]
    parts = [_table(["metric", "value", "95% CI"], [[k, _fmt(m.get(k)), _ci(ci, k)] for k in (*OVERALL_KEYS, *extra) if k in m])]
    if m.get("per_class"):
        rows = [[c, *vals, _ci(ci, f"recall_{c}")] for c, vals in zip(names, per_class_rows(m, names))]
        headers = ["class", *("accuracy (= recall)" if k == "accuracy" else k for k in PER_CLASS_COLUMNS), "recall 95% CI"]
        parts += ["<h3>Per class</h3>", _table(headers, rows)]
    if isinstance(m.get("calibration"), dict):
        parts += ["<h3>Calibration</h3>", _table(["", "value"], [[k, _fmt(v)] for k, v in m["calibration"].items()])]
    ops = _operating_points(m)
    if ops:
        cols = list(dict.fromkeys(k for op in ops for k in op))
        parts += ["<h3>Operating points</h3>", _table(cols, [[_fmt(op.get(k)) for k in cols] for op in ops])]
    if isinstance(m.get("groups"), dict) and m["groups"]:
        cols = [k for k in ("n", "accuracy", "macro_f1", "weighted_f1", "auc_macro")]
        rows = [[g, *(_fmt((gm or {}).get(k)) for k in cols)] for g, gm in m["groups"].items()]
        parts += ["<h3>Per group</h3>", _table(["group", *cols], rows)]
    return "\n".join(parts)


def _plots_html(folder: Path) -> str:
    figs = [
        f'<figure><img src="{data_uri(folder / n)}" alt="{_e(n)}"><figcaption>{_e(PLOT_CAPTIONS[n])}</figcaption></figure>'
        for n in PLOTS
        if (folder / n).is_file()
    ]
    return "\n".join(figs) or '<p class="muted">No plots; run cxrlab report to draw them.</p>'


def _gallery_html(cams: list[dict]) -> str:
    if not cams:
        return '<p class="muted">No Grad-CAM overlays (train with --cam-every, or run cxrlab explain).</p>'
    groups = {
        "Correct": [c for c in cams if c["true"] is not None and c["true"] == c["pred"]],
        "Wrong": [c for c in cams if c["true"] is not None and c["true"] != c["pred"]],
        "Unlabelled": [c for c in cams if c["true"] is None],
    }
    parts = []
    for heading, items in groups.items():
        if not items:
            continue
        shown = f"{min(len(items), GALLERY_MAX)} of {len(items)}"
        parts.append(f"<h3>{heading} <span class=\"muted\">({shown})</span></h3><div class=\"gallery\">")
        for c in items[:GALLERY_MAX]:
            epoch = f", epoch {c['epoch']}" if c["epoch"] is not None else ""
            label = f"true {c['true']}, pred {c['pred']}" if c["true"] is not None else "labels unknown"
            css = "ok" if heading == "Correct" else "bad" if heading == "Wrong" else "muted"
            parts.append(
                f'<figure><img src="{data_uri(c["path"])}" alt="{_e(c["stem"])}"><figcaption>'
                f'{_e(c["stem"])} <span class="{css}">{_e(label)}</span>{_e(epoch)} ({_e(c["source"])})</figcaption></figure>'
            )
        parts.append("</div>")
    return "\n".join(parts)


def render_page(run: RunFiles, title: str, date: str) -> str:
    """The report as one HTML string (everything escaped, images inline)."""
    names = _class_names(run)
    skipped = f" {run.predictions.skipped} unreadable or unlabelled rows of predictions.csv were skipped." if run.predictions and run.predictions.skipped else ""
    config = f"<pre>{_e(run.config_text)}</pre>" if run.config_text else '<p class="muted">No config.yaml.</p>'
    sections = [
        ("Data", _data_summary_html(run.data_summary)),
        ("Metrics", _metrics_html(run.metrics, names)),
        ("Plots", _plots_html(run.folder)),
        ("Grad-CAM", _gallery_html(collect_cams(run))),
        ("Configuration", config),
    ]
    body = "\n".join(f"<h2>{_e(h)}</h2>\n{content}" for h, content in sections)
    meta = f"{date} · {run.folder.resolve()} · classes: {', '.join(names) or '–'}.{skipped}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n<p class=\"muted\">{_e(meta)}</p>\n{body}\n</body></html>\n"
    )
