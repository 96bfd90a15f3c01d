"""Where does a model look on real radiographs, where no lung masks exist? Grad-CAM mass by region of the
film, and what the model decides from the edges of the film alone.

The shortcuts that make chest X-ray models fail at other hospitals sit at the edges of the film: text
markers ("R", "PORTABLE", kV) in the corners, collimation borders, rulers, labels burnt into the image
(Zech et al. 2018; DeGrave et al. 2021). The thorax fills the middle. Without a lung segmentation
model (none can be fetched offline, and classical thresholding fails on a good share of films), this
module measures what can be measured on any radiograph, for every image of a labelled split:

* `frame_energy`: the share of the Grad-CAM mass (of the predicted class) in the outer band of the
  image (`frame`, default 10% of each side, which is 36% of the area), `corner_energy` in the four
  corner squares (`corner`, 15% of each side: 9% of the area), `peak_in_frame`: the heatmap's
  maximum lies in the band. `frame_lift` = frame energy / frame area: 1 is what a heatmap spread
  evenly over the film would give; a model that reads the thorax stays well below 1.
* `frame_hidden`: the decisions again with the band painted black (another site's framing): how many
  change, and the accuracy.
* `frame_only`: the decisions with everything but the band painted black. If the edges carry no
  label, these decisions are unrelated to the truth: AUC 0.5 and accuracy at `frame_only_chance`
  (the accuracy of decisions made at the same rates but independently of the label). Well above
  that, the borders and markers alone give the class away, and the model has learnt to read them.

Results are reported overall, per class, and per group (e.g. the manifest's `source` column), with a
montage of overlays per group and class to look at.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

FRAME = 0.10  # band width, fraction of each side
CORNER = 0.15  # corner square side, fraction of each side


def check_frame(frame: float) -> None:
    """A clear error unless the band width is a fraction of the side in (0, 0.5)."""
    if not 0 < frame < 0.5:
        raise CxrlabError(f"--frame must be a fraction of the side between 0 and 0.5 (e.g. 0.1), got {frame}")


def region_masks(side: int, frame: float = FRAME, corner: float = CORNER) -> dict[str, np.ndarray]:
    """Boolean (side, side) masks: `frame` (the outer band), `corners` (four corner squares), `inside`.

    Args:
        side: image side in pixels.
        frame: band width as a fraction of the side, in (0, 0.5).
        corner: corner square side as a fraction of the side, in (0, 0.5].
    """
    check_frame(frame)
    if not 0 < corner <= 0.5:
        raise CxrlabError(f"corner must be a fraction of the side between 0 and 0.5, got {corner}")
    b, c = max(1, round(frame * side)), max(1, round(corner * side))
    inside = np.zeros((side, side), bool)
    inside[b:side - b, b:side - b] = True
    edge = np.zeros(side, bool)
    edge[:c] = edge[side - c:] = True
    return {"frame": ~inside, "corners": edge[:, None] & edge[None, :], "inside": inside}


def region_energy(heatmap: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """Share of a heatmap's mass in the frame and the corners, and whether its maximum is in the frame.

    A heatmap with no mass (all zeros) gives NaN shares and no peak.
    """
    h = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    total = h.sum()
    if total <= 0:
        return {"frame_energy": float("nan"), "corner_energy": float("nan"), "peak_in_frame": False}
    peak = np.unravel_index(int(np.argmax(h)), h.shape)
    return {"frame_energy": float(h[masks["frame"]].sum() / total),
            "corner_energy": float(h[masks["corners"]].sum() / total),
            "peak_in_frame": bool(masks["frame"][peak])}


def paint_black(images: np.ndarray, where: np.ndarray) -> np.ndarray:
    """A copy of uint8 images (N, S, S) with the pixels of a (S, S) mask set to 0."""
    out = np.array(images, dtype=np.uint8)
    out[:, where] = 0
    return out


def chance_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Accuracy of decisions made at `pred`'s class rates but independently of the labels `y`."""
    py = np.bincount(y, minlength=n_classes) / len(y)
    pp = np.bincount(pred, minlength=n_classes) / len(pred)
    return float(py @ pp)


def _auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Macro one-vs-rest AUC over the classes present (None with fewer than two)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(np.mean([roc_auc_score(y == k, probs[:, k]) for k in present]))


def _stats(rows: list[dict], probs: dict[str, np.ndarray], area: float, n_classes: int) -> dict:
    """Summary of per-image rows (and the matching rows of the clean / frame-hidden / frame-only probs)."""
    y = np.array([r["y"] for r in rows], dtype=int)
    d = {k: np.array([r[k] for r in rows], dtype=int) for k in ("pred", "pred_frame_hidden", "pred_frame_only")}
    fe = np.array([r["frame_energy"] for r in rows], dtype=float)
    ce = np.array([r["corner_energy"] for r in rows], dtype=float)
    has_mass = bool(np.isfinite(fe).any())  # all-zero heatmaps have no shares

    def r4(v: float | None) -> float | None:
        return round(v, 4) if v is not None else None

    return {"n": len(rows),
            "frame_energy": r4(float(np.nanmean(fe))) if has_mass else None,
            "frame_lift": round(float(np.nanmean(fe)) / area, 3) if has_mass else None,
            "corner_energy": r4(float(np.nanmean(ce))) if has_mass else None,
            "peak_in_frame": r4(float(np.mean([r["peak_in_frame"] for r in rows]))),
            "accuracy": r4(float(np.mean(d["pred"] == y))),
            "auc": r4(_auc(y, probs["clean"])),
            "frame_hidden_flip_rate": r4(float(np.mean(d["pred_frame_hidden"] != d["pred"]))),
            "frame_hidden_accuracy": r4(float(np.mean(d["pred_frame_hidden"] == y))),
            "frame_only_accuracy": r4(float(np.mean(d["pred_frame_only"] == y))),
            "frame_only_chance": r4(chance_accuracy(y, d["pred_frame_only"], n_classes)),
            "frame_only_auc": r4(_auc(y, probs["frame_only"]))}


def look_regions(checkpoint, data, out=None, *, split: str = "test", manifest: str | None = None,
                 group_by: str | None = None, n: int | None = 1000, seed: int = 0, frame: float = FRAME,
                 method: str = "gradcam", examples: int = 8, batch_size: int = 32, device: str = "auto",
                 checkpoint_name: str | Path | None = None) -> dict:
    """Grad-CAM mass by region and decisions from the frame alone, for a labelled split (see the module doc).

    Args:
        checkpoint: a cxrlab checkpoint path (or a torch `ModelBundle`).
        data: data folder or manifest (as for `cxrlab evaluate`).
        out: folder for regions.json, regions.csv and montages (None: nothing written).
        split: which split.
        manifest: manifest CSV (for `group_by`).
        group_by: also summarise per `source`, `group`, `split` or `folder`.
        n: at most this many images (a seeded random subset; 0 or None: all).
        seed: seed of the subset.
        frame: band width, fraction of each side.
        method: CAM method (`cxrlab.explain.METHODS`).
        examples: overlays per montage (group x class); 0 for none.
        batch_size: images explained at a time.
        device: auto, cpu, cuda.
        checkpoint_name: how messages name the checkpoint, e.g. its path when `checkpoint` is a loaded bundle
            (default: the path when `checkpoint` is one).

    Returns:
        {method, split, frame, frame_area, corner_area, n, subset, overall, per_class, per_group,
        per_group_class, montages}; each summary has n, frame_energy, frame_lift, corner_energy,
        peak_in_frame, accuracy, auc, frame_hidden_flip_rate, frame_hidden_accuracy,
        frame_only_accuracy, frame_only_chance, frame_only_auc.
    """
    from cxrlab.evaluate import sample_groups
    from cxrlab.explain import cam_class, explain_arrays
    from cxrlab.inference import as_bundle
    from cxrlab.stress import decisions, labelled_images

    cam_class(method)
    bundle = as_bundle(checkpoint, device)
    names = bundle.class_names
    side = bundle.pre.img_size
    masks = region_masks(side, frame)
    where = checkpoint_name or (checkpoint if isinstance(checkpoint, (str, Path)) else None)
    imgs = labelled_images(bundle, where, data, split, manifest, n, seed)
    if len(imgs.arrays) == 0:
        raise CxrlabError(f"no readable images in the {split} split of '{data}'")
    groups = sample_groups(imgs.samples, group_by) or ["all"] * len(imgs.arrays)
    probs, decided = {}, {}
    for key, hidden in (("clean", None), ("frame_hidden", masks["frame"]), ("frame_only", masks["inside"])):
        arrays = imgs.arrays if hidden is None else paint_black(imgs.arrays, hidden)
        probs[key], decided[key] = decisions(bundle, arrays, batch_size)
    cells = {(g, c): [i for i in range(len(groups)) if groups[i] == g and names[int(imgs.y[i])] == c]
             for g in sorted(set(groups)) for c in names}
    cells = {k: v for k, v in cells.items() if v}
    shown = {k: [int(i) for i in np.random.default_rng(seed).permutation(v)[:examples]] for k, v in cells.items()} \
        if out is not None and examples > 0 else {}
    keep = {i for v in shown.values() for i in v}
    rows, kept = [], {}  # only the montages' explanations stay in memory
    for start in range(0, len(imgs.arrays), batch_size):
        part = slice(start, start + batch_size)
        for res in explain_arrays(bundle, imgs.arrays[part], None, method, probs=probs["clean"][part]):
            i = len(rows)
            rows.append({"path": str(imgs.samples[i].path), "group": groups[i], "class": names[int(imgs.y[i])],
                         "y": int(imgs.y[i]), "pred": int(decided["clean"][i]),
                         "pred_frame_hidden": int(decided["frame_hidden"][i]),
                         "pred_frame_only": int(decided["frame_only"][i]), **region_energy(res.heatmap, masks)})
            if i in keep:
                kept[i] = res
    area, corner_area = float(masks["frame"].mean()), float(masks["corners"].mean())

    def stats(idx: list[int]) -> dict:
        return _stats([rows[i] for i in idx], {k: v[idx] for k, v in probs.items()}, area, len(names))

    summary = {"method": method, "split": split, "frame": frame, "frame_area": round(area, 4),
               "corner_area": round(corner_area, 4), "n": len(rows), "subset": imgs.subset,
               "unreadable": imgs.unreadable, "group_by": group_by, "overall": stats(list(range(len(rows)))),
               "per_class": {}, "per_group": {}, "per_group_class": {}, "montages": []}
    for c in names:
        idx = [i for i, r in enumerate(rows) if r["class"] == c]
        if idx:
            summary["per_class"][c] = stats(idx)
    if group_by:
        for g in sorted(set(groups)):
            summary["per_group"][g] = stats([i for i, r in enumerate(rows) if r["group"] == g])
        summary["per_group_class"] = {f"{g}/{c}": stats(idx) for (g, c), idx in cells.items()}
    for (g, c), pick in shown.items():
        name = _safe(f"montage_{g}_{c}.png" if group_by else f"montage_{c}.png")
        _montage([kept[i] for i in pick], [rows[i] for i in pick], names, masks["frame"], Path(out) / name)
        summary["montages"].append(name)
    if out is not None:
        _write(Path(out), summary, rows, names)
    return summary


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _write(out: Path, summary: dict, rows: list[dict], names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "regions.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = ["path", "group", "class", "predicted", "predicted_frame_hidden", "predicted_frame_only", "frame_energy",
            "corner_energy", "peak_in_frame"]
    with open(out / "regions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["path"], r["group"], r["class"], names[r["pred"]], names[r["pred_frame_hidden"]],
                        names[r["pred_frame_only"]], f"{r['frame_energy']:.4f}", f"{r['corner_energy']:.4f}",
                        int(r["peak_in_frame"])])


def _montage(results: list, rows: list[dict], names: list[str], frame: np.ndarray, path: Path, per_row: int = 4,
             tile: int = 224) -> None:
    """Overlays side by side, the band's inner edge drawn in white, each captioned with file, truth, prediction."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    cap = 14
    n_rows = -(-len(results) // per_row)
    sheet = Image.new("RGB", (per_row * tile, n_rows * (tile + cap)), "black")
    edge = frame & ndimage.binary_dilation(~frame)  # the band's inner boundary
    for k, (res, r) in enumerate(zip(results, rows)):
        rgb = np.array(res.overlay, dtype=np.uint8)
        rgb[edge] = 255
        im = Image.fromarray(rgb).resize((tile, tile), Image.BILINEAR)
        x, y = (k % per_row) * tile, (k // per_row) * (tile + cap)
        sheet.paste(im, (x, y + cap))
        ImageDraw.Draw(sheet).text((x + 2, y + 1), f"{Path(r['path']).stem[:22]} {r['class'][:4]}>{names[r['pred']][:4]}",
                                   fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def format_summary(summary: dict) -> str:
    """Terminal table: one line per class and per group (x class)."""
    head = (f"{summary['method']} on {summary['n']} {summary['split']} image(s) ({summary['subset']}); frame = outer "
            f"{summary['frame']:.0%} of each side ({summary['frame_area']:.0%} of the area)")
    cols = f"{'':<34}{'n':>6}{'acc':>7}{'frame E':>9}{'lift':>6}{'corners':>9}{'hidden: flips':>15}{'acc':>7}" \
           f"{'frame only: acc':>17}{'chance':>8}{'AUC':>7}"
    lines = [head, cols]

    def line(name: str, s: dict) -> str:
        def f(v, w, p=3):
            return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"
        return (f"{name[:33]:<34}{s['n']:>6}{f(s['accuracy'], 7)}{f(s['frame_energy'], 9)}{f(s['frame_lift'], 6, 2)}"
                f"{f(s['corner_energy'], 9)}{f(s['frame_hidden_flip_rate'], 15)}{f(s['frame_hidden_accuracy'], 7)}"
                f"{f(s['frame_only_accuracy'], 17)}{f(s['frame_only_chance'], 8)}{f(s['frame_only_auc'], 7)}")

    lines.append(line("all", summary["overall"]))
    for key in ("per_class", "per_group", "per_group_class"):
        for name, s in summary[key].items():
            lines.append(line(name, s))
    return "\n".join(lines)
