"""`cxrlab compare`: train several architectures on one data set under the same settings, evaluate
each on the test split and write a leaderboard (CSV + Markdown) and one combined ROC plot.

Each model gets its own run folder `OUT/<model>` written by `cxrlab.train.fit` (calibration,
operating points and the test evaluation included). A model that fails (missing pretrained
weights, out of memory, ...) gets its error in its leaderboard row; the others still run.

Speeds: `train_images_per_s` = training images x epochs run / the summed epoch seconds of
history.csv (an epoch's seconds include its validation pass, if it had one (`--val-every`), so this slightly
understates pure training throughput); `inference_images_per_s` times one pass of `logits_for_arrays` over the
decoded test images (after a small warm-up), so decoding is not counted.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["accuracy", "macro_f1", "auc_macro"]
TAIL_COLUMNS = ["ece", "parameters", "train_images_per_s", "inference_images_per_s", "wall_time_s", "epochs", "error"]


def leaderboard_columns(class_names: list[str]) -> list[str]:
    """model, accuracy, macro_f1, auc_macro, recall_<CLASS>..., ece, parameters, speeds, wall time, epochs, error."""
    return ["model", *METRIC_COLUMNS, *[f"recall_{c}" for c in class_names], *TAIL_COLUMNS]


def compare_models(data: str | Path, models: list[str], out: str | Path, *, budget_min: float | None = None,
                   epochs: int | None = None, img_size: int | None = None, batch_size: int | None = None,
                   base: dict | None = None, overwrite: bool = False,
                   progress: bool = True) -> list[dict]:
    """Train and evaluate each model, then write the leaderboard and the ROC comparison.

    Args:
        data: data folder (or manifest) with train and test splits (val is carved when absent).
        models: registered model names.
        out: output folder; each model trains into `out/<model>`.
        budget_min: training time budget per model in minutes (None: no budget).
        epochs: maximum epochs per model (None: the recipe's, else 10).
        img_size: input size for every model (None: the recipe's, else each model's own default).
        batch_size: training batch size (None: the recipe's, else 32).
        base: further `TrainConfig` keys applied to every model (e.g. {"pretrained": True, "lr": 3e-4}), with a
            `recipe` beneath them (e.g. {"recipe": "recommended"}; the model is each of `models`);
            `pretrained` is only passed to models that have pretrained weights.
        overwrite: replace earlier runs in `out/<model>` (without it a folder holding a run is refused before any
            model trains, as `cxrlab train` refuses one).
        progress: progress bars while training.

    Returns:
        The leaderboard rows, best macro-F1 first (failed models last).
    """
    from cxrlab.data.dataset import build_index
    from cxrlab.models import model_spec
    from cxrlab.train import guard_run_folder

    if not models:
        raise CxrlabError("--models is empty; name at least one model (see `cxrlab train --list-models`)")
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise CxrlabError(f"--models names {', '.join(twice)} more than once; each model trains into OUT/<model>, so "
                          f"name each once (compare two settings of one model with two --out folders)")
    for name in models:
        model_spec(name)  # unknown names fail now, listing the valid ones
    base = dict(base or {})
    index = build_index(data, base.get("manifest"), val_fraction=0, require=("train",))
    if "test" not in index.splits:
        raise CxrlabError(f"'{data}' has no test split; compare ranks models on test data: add {data}/test/<CLASS>/*")
    out = Path(out)
    for name in models:  # every model's folder is checked before the first one trains
        guard_run_folder(out / name, resume=False, overwrite=overwrite, remove=False)
    out.mkdir(parents=True, exist_ok=True)
    test_paths = [s.path for s in index.splits["test"]]
    rows = []
    for i, name in enumerate(models, 1):
        log.info("compare: model %d/%d: %s", i, len(models), name)
        guard_run_folder(out / name, resume=False, overwrite=overwrite)  # --overwrite: the earlier run goes now
        rows.append(_run_one(name, data, out, test_paths, budget_min, epochs, img_size, batch_size, base, progress))
    rows.sort(key=lambda r: (bool(r.get("error")), -_num(r.get("macro_f1")), -_num(r.get("auc_macro"))))
    write_leaderboard(rows, out, index.class_names)
    runs = {r["model"]: out / r["model"] for r in rows if not r.get("error")}
    if runs:
        plot_roc_compare(runs, out / "roc_compare.png", index.class_names)
    return rows


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("-inf")
    return f if np.isfinite(f) else float("-inf")


def _train_config(name, data, out, budget_min, epochs, img_size, batch_size, base):
    from cxrlab.config import TrainConfig
    from cxrlab.models import model_spec
    from cxrlab.recipes import with_recipe

    given = {"epochs": epochs, "img_size": img_size, "batch_size": batch_size, "time_budget_min": budget_min}
    d = with_recipe({**base, "data": str(data), "out": str(out / name), "model": name,
                     **{k: v for k, v in given.items() if v is not None}})
    d = {"epochs": 10, "batch_size": 32, **d}
    if d.get("pretrained") and not model_spec(name).pretrained_tag:
        log.info("compare: %s has no pretrained weights; training it from scratch", name)
        d["pretrained"] = False
    return TrainConfig.from_dict(d).validate()


def _run_one(name, data, out, test_paths, budget_min, epochs, img_size, batch_size, base, progress) -> dict:
    from cxrlab.train import fit

    t0 = time.perf_counter()
    row: dict = {"model": name}
    try:
        cfg = _train_config(name, data, out, budget_min, epochs, img_size, batch_size, base)
        fit(cfg, progress=progress)
        row.update(summarise_run(out / name, test_paths, cfg.device))
    except Exception as exc:  # noqa: BLE001 - one failing model must not end the comparison
        log.warning("compare: %s failed: %s: %s", name, type(exc).__name__, exc)
        row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    row["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return row


def summarise_run(run_dir: Path, test_paths: list, device: str = "auto") -> dict:
    """Leaderboard fields of a finished run folder (metrics.json, history.csv, data_summary.json, best.pt).

    Args:
        run_dir: the run folder.
        test_paths: test image files, for timing inference.
        device: device for the timing.

    Returns:
        Metrics, ECE after calibration, parameter count, epochs, train and inference images/s.
    """
    from cxrlab.report import read_json

    m = read_json(run_dir / "metrics.json")
    if not m:
        raise CxrlabError(f"{run_dir}: no metrics.json (the run wrote no test evaluation)")
    row = {k: m.get(k) for k in METRIC_COLUMNS}
    row.update({f"recall_{c}": v.get("recall") for c, v in m.get("per_class", {}).items()})
    row["ece"] = (m.get("calibration") or {}).get("ece_after")
    row.update(_train_speed(run_dir))
    row.update(_inference_speed(run_dir / "best.pt", test_paths, device))
    return row


def _train_speed(run_dir: Path) -> dict:
    from cxrlab.report import read_json

    with open(run_dir / "history.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    seconds = sum(_num(r.get("seconds")) for r in hist if _num(r.get("seconds")) > 0)
    counts = (read_json(run_dir / "data_summary.json") or {}).get("train", {})
    n_train = sum(int(v) for v in counts.values())
    speed = n_train * len(hist) / seconds if seconds > 0 else None
    return {"epochs": len(hist), "train_images_per_s": None if speed is None else round(speed, 1)}


def _inference_speed(checkpoint: Path, test_paths: list, device: str) -> dict:
    from cxrlab.data.cache import load_arrays
    from cxrlab.inference import load_model_bundle

    bundle = load_model_bundle(checkpoint, device=device)
    params = sum(p.numel() for p in bundle.model.parameters())
    arrays, ok, _ = load_arrays(test_paths, bundle.pre, cache_dir=False, workers=0)
    if not ok:
        return {"parameters": params, "inference_images_per_s": None}
    bundle.logits_for_arrays(arrays[: min(8, len(ok))])  # warm-up (allocator, cuDNN autotune)
    t0 = time.perf_counter()
    bundle.logits_for_arrays(arrays)
    dt = time.perf_counter() - t0
    return {"parameters": params, "inference_images_per_s": round(len(ok) / dt, 1) if dt > 0 else None}


# ---------------------------------------------------------------- outputs


def write_leaderboard(rows: list[dict], out: Path, class_names: list[str]) -> tuple[Path, Path]:
    """Write `leaderboard.csv` (raw values) and `leaderboard.md` (rounded) in `out`; returns both paths."""
    cols = leaderboard_columns(class_names)
    csv_path, md_path = out / "leaderboard.csv", out / "leaderboard.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows([{c: ("" if r.get(c) is None else r.get(c)) for c in cols} for r in rows])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    note = ("Test split, sorted by macro-F1. ece: expected calibration error after temperature scaling. "
            "train_images_per_s includes the validation passes; inference_images_per_s excludes decoding.")
    md_path.write_text("# Model comparison\n\n" + note + "\n\n" + "\n".join(lines) + "\n")
    log.info("leaderboard: %s", md_path)
    return csv_path, md_path


def _md_cell(col: str, v) -> str:
    if v is None or v == "":
        return "-" if col != "error" else ""
    if col == "parameters":
        return f"{int(v) / 1e6:.2f}M"
    if isinstance(v, float):
        return f"{v:.1f}" if col.endswith(("_per_s", "_s")) else f"{v:.4f}"
    return str(v).replace("|", "/")


def _macro_roc(y: np.ndarray, probs: np.ndarray, class_names: list[str]):
    """(fpr grid, mean tpr, mean AUC) over the one-vs-rest curves (the positive class when binary)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from cxrlab.plots import one_vs_rest

    grid = np.linspace(0, 1, 201)
    tprs, aucs = [], []
    for _, _, target, score in one_vs_rest(y, probs, class_names):
        if target.min() == target.max():
            continue
        fpr, tpr, _ = roc_curve(target, score)
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(roc_auc_score(target, score))
    if not tprs:
        return None
    return grid, np.mean(tprs, axis=0), float(np.mean(aucs))


def plot_roc_compare(runs: dict[str, Path], out: Path, class_names: list[str]) -> Path | None:
    """One ROC curve per run from its predictions.csv (macro one-vs-rest; binary: the positive class).

    Args:
        runs: {label: run folder with predictions.csv}.
        out: PNG to write.
        class_names: class order.

    Returns:
        `out`, or None when no run had usable predictions.
    """
    from matplotlib.figure import Figure

    from cxrlab.report import read_predictions

    fig = Figure(figsize=(7, 6), dpi=100, layout="constrained")
    ax = fig.subplots()
    what = f"{class_names[1]} vs rest" if len(class_names) == 2 else "macro one-vs-rest"
    ax.set(title=f"ROC on the test split ({what})", xlabel="false positive rate (1 - specificity)",
           ylabel="true positive rate (sensitivity)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    ax.grid(alpha=0.3)
    ax.plot([0, 1], [0, 1], "--", color="#6e7781", lw=1)
    drawn = 0
    for label, folder in runs.items():
        pred = read_predictions(folder / "predictions.csv", list(class_names))
        curve = _macro_roc(pred.y_true, pred.probs, list(class_names)) if pred else None
        if curve is None:
            continue
        ax.plot(curve[0], curve[1], lw=2, label=f"{label} (AUC {curve[2]:.3f})")
        drawn += 1
    if not drawn:
        return None
    ax.legend(loc="lower right")
    fig.savefig(out, format="png", dpi=100, facecolor="white")
    return out


def read_leaderboard(path: str | Path) -> list[dict]:
    """Rows of a leaderboard.csv (strings), e.g. for reports."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))

