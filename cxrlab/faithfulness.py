"""Is the explanation on the lesion? Pointing game and energy in the mask against known lesion masks.

The synthetic phantoms (`cxrlab synth`) come with a lesion mask for every abnormal image
(`DIR/masks/<split>/<CLASS>/<stem>.png`), so the Grad-CAM of the true class can be scored:

* pointing game (Zhang et al. 2016): a hit when the heatmap's maximum lies inside the mask,
  dilated by a tolerance: 15 px at 224 px as in the original protocol, i.e. 15/224 (6.7%) of the
  side, which is also about one cell of a stride-8 or stride-16 CAM grid;
* energy in mask: the fraction of the heatmap's mass that falls inside the mask.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

TOLERANCE_FRACTION = 15 / 224  # Zhang et al. 2016: 15 pixels on 224-pixel inputs


def default_tolerance(side: int) -> int:
    """Pointing-game tolerance in pixels for a square heatmap of `side` pixels."""
    return max(1, int(round(TOLERANCE_FRACTION * side)))


def resize_mask(mask: np.ndarray, shape: tuple[int, int], crop_border: float = 0.0) -> np.ndarray:
    """A mask brought to the heatmap's geometry: the preset's border crop, then nearest-neighbour resize.

    Args:
        mask: 2-D mask (nonzero = lesion), at the original image size.
        shape: (H, W) of the heatmap.
        crop_border: the preprocessing preset's `crop_border` (the image was cropped the same way).

    Returns:
        bool array of `shape`.
    """
    im = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    if crop_border > 0:
        w, h = im.size
        dx, dy = int(w * crop_border), int(h * crop_border)
        im = im.crop((dx, dy, w - dx, h - dy))
    if im.size != (shape[1], shape[0]):
        im = im.resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(im) > 127


def _aligned(heatmap: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    mask = np.asarray(mask)
    if mask.shape != heatmap.shape:
        mask = resize_mask(mask, heatmap.shape)
    return heatmap, mask > 0


def pointing_game(heatmap: np.ndarray, mask: np.ndarray, tolerance_px: int | None = None) -> bool:
    """True when the heatmap's maximum is inside the mask or within `tolerance_px` of it.

    Args:
        heatmap: 2-D array (any scale).
        mask: 2-D mask, nonzero inside the lesion; resized (nearest) to the heatmap when it differs.
        tolerance_px: allowed distance in heatmap pixels (default `default_tolerance(side)`).

    Returns:
        The hit. An empty mask or a flat (all equal) heatmap is a miss.
    """
    heatmap, mask = _aligned(heatmap, mask)
    if not mask.any() or np.ptp(heatmap) <= 0:
        return False
    tol = default_tolerance(max(heatmap.shape)) if tolerance_px is None else max(0, int(tolerance_px))
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    rows, cols = np.nonzero(mask[max(0, r - tol) : r + tol + 1, max(0, c - tol) : c + tol + 1])
    dist2 = (rows + max(0, r - tol) - r) ** 2 + (cols + max(0, c - tol) - c) ** 2
    return bool(dist2.size and dist2.min() <= tol * tol)


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the heatmap's mass inside the mask (0 for an all-zero heatmap).

    Args:
        heatmap: 2-D non-negative array (negative values are clipped to 0).
        mask: 2-D mask, nonzero inside the lesion; resized (nearest) to the heatmap when it differs.
    """
    heatmap, mask = _aligned(heatmap, mask)
    h = np.clip(heatmap, 0, None)
    total = float(h.sum())
    return float(h[mask].sum() / total) if total > 0 else 0.0


def find_masked_images(data: str | Path, masks: str | Path, split: str, class_names: list[str]) -> list[tuple[Path, Path, str]]:
    """(image, mask, class) for every image of `data/split/<CLASS>/` that has `masks/split/<CLASS>/<stem>.png`."""
    from cxrlab.data.io import is_image_file

    data, masks = Path(data), Path(masks)
    if not masks.is_dir():
        raise CxrlabError(f"mask folder '{masks}' does not exist. Pass --masks DIR with one mask PNG per image, named "
                          f"like it: DIR/{split}/<CLASS>/<stem>.png for {data}/{split}/<CLASS>/<stem>.* "
                          f"(default DIR: {data}/masks, as `cxrlab synth --out DIR` writes)")
    if not (data / split).is_dir():
        what = f"'{data}' has no {split}/ folder" if data.is_dir() else f"data folder '{data}' does not exist"
        raise CxrlabError(f"{what}; --score reads images from {data}/{split}/<CLASS>/ (pass --split, or --data with that layout)")
    found = []
    for cls in class_names:
        mdir = masks / split / cls
        if not mdir.is_dir():
            continue
        for f in sorted((data / split / cls).glob("*")):
            m = mdir / f"{f.stem}.png"
            if f.is_file() and is_image_file(f) and m.is_file():
                found.append((f, m, cls))
    if not found:
        raise CxrlabError(f"no images with lesion masks under {data / split}/<CLASS>/ and {masks / split}/<CLASS>/<stem>.png "
                          f"for classes {', '.join(class_names)} (make a data set with masks: cxrlab synth --out DIR)")
    return found


def score_faithfulness(checkpoint, data: str | Path, masks: str | Path | None = None, split: str = "test",
                       method: str = "gradcam", out: str | Path | None = None, tolerance_px: int | None = None,
                       n_examples: int = 4, batch_size: int = 32) -> dict:
    """Grad-CAM of the true class for every masked (abnormal) image of a split, scored against its mask.

    Args:
        checkpoint: checkpoint path or a torch `ModelBundle`.
        data: data folder (`data/<split>/<CLASS>/*.png`).
        masks: mask folder (default `data/masks`).
        split: which split.
        method: CAM method (`cxrlab.explain.METHODS`).
        out: folder for `faithfulness.json` and example overlays of hits and misses (None: nothing written).
        tolerance_px: pointing-game tolerance (default 15/224 of the side, the published protocol).
        n_examples: overlays saved per outcome (hit / miss).
        batch_size: images explained at a time.

    Returns:
        {method, split, n, tolerance_px, pointing_game (hit rate), energy_in_mask (mean), per_class, per_image}.
    """
    from cxrlab.data.preprocess import load_array
    from cxrlab.explain import cam_class, explain_arrays
    from cxrlab.inference import as_bundle

    cam_class(method)
    bundle = as_bundle(checkpoint)
    names = bundle.class_names
    items = find_masked_images(data, Path(masks) if masks else Path(data) / "masks", split, names)
    rows, saved = [], {True: 0, False: 0}
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        images = np.stack([load_array(f, bundle.pre) for f, _, _ in part])
        for (f, m, cls), res in zip(part, explain_arrays(bundle, images, [cls for _, _, cls in part], method)):
            mask = resize_mask(np.asarray(Image.open(m).convert("L")), res.heatmap.shape, bundle.pre.crop_border)
            tol = default_tolerance(res.heatmap.shape[0]) if tolerance_px is None else tolerance_px
            hit = pointing_game(res.heatmap, mask, tol)
            rows.append({"path": str(f), "class": cls, "predicted": res.predicted, "hit": hit,
                         "energy_in_mask": round(energy_in_mask(res.heatmap, mask), 4),
                         "mask_fraction": round(float(mask.mean()), 4)})
            if out is not None and saved[hit] < n_examples:
                saved[hit] += 1
                _save_example(res, mask, f, cls, hit, Path(out))
    summary = _summarise(rows, method, split, tolerance_px if tolerance_px is not None else default_tolerance(bundle.pre.img_size))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "faithfulness.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save_example(res, mask: np.ndarray, f: Path, cls: str, hit: bool, out: Path) -> None:
    from cxrlab.camnames import cam_name
    from cxrlab.explain import save_explanation

    outcome = "hit" if hit else "miss"
    title = f"{f.name}: {outcome} | true {cls} | pred {res.predicted} (p={res.probs[res.predicted]:.2f})"
    save_explanation(res, out / cam_name(None, cls, res.predicted, f"{f.stem}_{outcome}_cam"), title, mask=mask)


def _summarise(rows: list[dict], method: str, split: str, tol: int) -> dict:
    def stats(rs):
        return {"n": len(rs), "pointing_game": round(float(np.mean([r["hit"] for r in rs])), 4) if rs else None,
                "energy_in_mask": round(float(np.mean([r["energy_in_mask"] for r in rs])), 4) if rs else None}

    classes = sorted({r["class"] for r in rows})
    return {"method": method, "split": split, "tolerance_px": tol, **stats(rows),
            "per_class": {c: stats([r for r in rows if r["class"] == c]) for c in classes}, "per_image": rows}
