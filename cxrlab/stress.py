"""Stress test: how a model's decisions move under the changes another site's radiographs bring.

Each perturbation is a fixed, deterministic change of the model's own input (the preprocessed uint8
image): framing (zoom in, zoom out onto a black frame), rotation, exposure (brightness, contrast,
gamma), sharpness (blur), noise, JPEG compression and a horizontal flip. For each one the stress test
reports how many decisions flip and how far probabilities move (no labels needed, so it runs on a new
site's unlabelled images) and, with labels, accuracy, macro-F1, AUC and per-class recall beside the
clean numbers. A model that is right for the right reasons barely moves under a 10% zoom; one that
learned a site's framing or sharpness does. Each fragile perturbation names the training option
that covers it. Below `MIN_IMAGES_TO_JUDGE` images nothing is called fragile: the sample is too small to judge.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

FRAGILE_FLIP_RATE = 0.05  # a perturbation that flips more decisions than this is reported as fragile
# below this many images a flip rate is too coarse to call anything fragile (1 image: 0% or 100%; at 30 one flip
# is 3.3%, under the threshold); the numbers are still reported
MIN_IMAGES_TO_JUDGE = 30


@dataclass(frozen=True)
class Perturbation:
    """One named change of the model input; `fix` is the training option that teaches invariance to it."""

    name: str
    describe: str
    apply: Callable[[torch.Tensor], torch.Tensor]  # float (N, 1, S, S) on 0..255 -> same
    fix: str


def _warp(x: torch.Tensor, zoom: float = 1.0, degrees: float = 0.0) -> torch.Tensor:
    """Centre zoom (> 1 enlarges, < 1 shrinks onto black) and rotation of float images (N, 1, S, S)."""
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a) / zoom, -math.sin(a) / zoom, 0.0],
                          [math.sin(a) / zoom, math.cos(a) / zoom, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def _noise(x: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return x + 255.0 * std * torch.randn(x.shape, generator=g, dtype=x.dtype)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = []
    for im in x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy():
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")))
    return torch.from_numpy(np.stack(out)).to(x.dtype).unsqueeze(1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from cxrlab.data.augment import gaussian_blur_batch

    return gaussian_blur_batch(x, torch.full((len(x),), sigma))


ZOOM_FIX = "--aug-crop-scale-min (zoom in) / --aug-crop-scale-max (zoom out)"
PERTURBATIONS: dict[str, Perturbation] = {p.name: p for p in [
    Perturbation("zoom_in_1.1", "centre 10% zoom in (tighter framing)", lambda x: _warp(x, zoom=1.1), ZOOM_FIX),
    Perturbation("zoom_in_1.2", "centre 20% zoom in", lambda x: _warp(x, zoom=1.2), ZOOM_FIX),
    Perturbation("zoom_out_0.9", "shrunk to 90% on a black frame (wider framing)", lambda x: _warp(x, zoom=0.9), ZOOM_FIX),
    Perturbation("zoom_out_0.8", "shrunk to 80% on a black frame", lambda x: _warp(x, zoom=0.8), ZOOM_FIX),
    Perturbation("rotate_10", "rotated 10 degrees", lambda x: _warp(x, degrees=10.0), "--aug-rotation"),
    Perturbation("hflip", "mirrored left-right", lambda x: x.flip(-1), "--aug-flip"),
    Perturbation("brighter_1.2", "intensities x 1.2", lambda x: x * 1.2, "--aug-brightness"),
    Perturbation("darker_0.8", "intensities x 0.8", lambda x: x * 0.8, "--aug-brightness"),
    Perturbation("contrast_0.7", "contrast x 0.7 around the mean", lambda x: _contrast(x, 0.7), "--aug-contrast"),
    Perturbation("gamma_0.7", "gamma 0.7 (brighter mid-tones)", lambda x: 255.0 * (x / 255.0).pow(0.7), "--aug-gamma"),
    Perturbation("gamma_1.4", "gamma 1.4 (darker mid-tones)", lambda x: 255.0 * (x / 255.0).pow(1.4), "--aug-gamma"),
    Perturbation("blur_1.5", "Gaussian blur, sigma 1.5 px (softer detector or resize)", lambda x: _blur(x, 1.5), "--aug-blur"),
    Perturbation("noise_0.03", "Gaussian noise, std 3% of full scale", lambda x: _noise(x, 0.03), "--aug-noise"),
    Perturbation("jpeg_30", "JPEG re-compression at quality 30", lambda x: _jpeg(x, 30),
                 "JPEG-compressed copies of the training images (no cxrlab option does this)"),
]}


def perturb(images: np.ndarray, name: str) -> np.ndarray:
    """Apply one named perturbation to uint8 images (N, S, S); returns uint8 images of the same shape."""
    if name not in PERTURBATIONS:
        raise CxrlabError(f"unknown perturbation '{name}'; choose from: {', '.join(PERTURBATIONS)}")
    x = torch.as_tensor(images).float().unsqueeze(1)
    y = PERTURBATIONS[name].apply(x)
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def select(names: str | None) -> list[str]:
    """Comma-separated perturbation names (or families such as `zoom`), default all."""
    if not names:
        return list(PERTURBATIONS)
    out: list[str] = []
    for item in (s.strip() for s in names.split(",") if s.strip()):
        hits = [n for n in PERTURBATIONS if n.startswith(item)]
        if not hits:
            raise CxrlabError(f"--only: unknown perturbation '{item}'; choose from: {', '.join(PERTURBATIONS)}")
        out += [h for h in hits if h not in out]
    return out


def decisions(bundle, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from cxrlab.evaluate import decide

    probs = bundle.probs(bundle.logits_for_arrays(images, batch_size=batch_size))
    return probs, decide(probs, bundle.ckpt)


def _scores(probs: np.ndarray, pred: np.ndarray, y: np.ndarray | None, classes: list[str]) -> dict:
    from cxrlab.metrics import compute_metrics

    if y is None:
        return {}
    m = compute_metrics(y, probs, classes, y_pred=pred)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "auc_macro": m["auc_macro"],
            "recall": {c: m["per_class"][c]["recall"] for c in classes}}


def _share(pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {c: float(np.mean(pred == i)) for i, c in enumerate(classes)}


def stress_test(bundle, images: np.ndarray, y: np.ndarray | None = None, only: str | None = None,
                batch_size: int = 64) -> dict:
    """Decisions and metrics of a model under each perturbation, beside the clean ones.

    Args:
        bundle: an inference bundle (`cxrlab.inference.load_model_bundle`): checkpoint, ensemble or ONNX.
        images: uint8 (N, S, S) arrays preprocessed with the bundle's preset.
        y: (N,) true class indices, or None for unlabelled images.
        only: comma-separated perturbation names or families (`zoom,blur`); default all.
        batch_size: forward batch.

    Returns:
        {"n", "labelled", "class_names", "clean": {...}, "perturbations": [row, ...], "hints": [...],
        "too_few_to_judge": n < MIN_IMAGES_TO_JUDGE, "min_images": MIN_IMAGES_TO_JUDGE};
        each row has name, describe, fix, flip_rate (share of decisions that change), mean_abs_dprob
        (mean over images of the largest class-probability change), predicted_share, shift (the class
        whose predicted share grows most, and by how much), fragile (always False below
        `MIN_IMAGES_TO_JUDGE` images: no hints then), and with labels accuracy,
        macro_f1, auc_macro, recall per class and delta_accuracy.
    """
    if len(images) == 0:
        raise CxrlabError("stress test: no readable images")
    classes, too_few = bundle.class_names, len(images) < MIN_IMAGES_TO_JUDGE
    if too_few:
        log.warning("only %d image(s): too few to judge whether a perturbation is fragile (at least %d); the flip "
                    "rates are reported, but no perturbation is called fragile", len(images), MIN_IMAGES_TO_JUDGE)
    p0, d0 = decisions(bundle, images, batch_size)
    clean = {"predicted_share": _share(d0, classes), **_scores(p0, d0, y, classes)}
    rows = []
    for name in select(only):
        pert = PERTURBATIONS[name]
        p, d = decisions(bundle, perturb(images, name), batch_size)
        share = _share(d, classes)
        grow = max(classes, key=lambda c: share[c] - clean["predicted_share"][c])
        row = {"name": name, "describe": pert.describe, "fix": pert.fix, "flip_rate": float(np.mean(d != d0)),
               "mean_abs_dprob": float(np.abs(p - p0).max(axis=1).mean()), "predicted_share": share,
               "shift": {"to": grow, "by": share[grow] - clean["predicted_share"][grow]},
               **_scores(p, d, y, classes)}
        if y is not None:
            row["delta_accuracy"] = row["accuracy"] - clean["accuracy"]
        row["fragile"] = not too_few and row["flip_rate"] > FRAGILE_FLIP_RATE
        rows.append(row)
        log.info("%-14s flips %5.1f%%", name, 100 * row["flip_rate"])
    return {"n": int(len(images)), "labelled": y is not None, "class_names": classes, "clean": clean,
            "perturbations": rows, "fragile_threshold": FRAGILE_FLIP_RATE, "hints": _hints(rows),
            "too_few_to_judge": too_few, "min_images": MIN_IMAGES_TO_JUDGE}


def _hints(rows: list[dict]) -> list[str]:
    out = []
    for r in sorted((r for r in rows if r["fragile"]), key=lambda r: -r["flip_rate"]):
        moved = f", {100 * r['shift']['by']:.0f}% more called {r['shift']['to']}" if r["shift"]["by"] > 0 else ""
        out.append(f"{r['name']} ({r['describe']}): {100 * r['flip_rate']:.0f}% of decisions flip{moved}; "
                   f"train with {r['fix']}")
    return out


def format_table(result: dict) -> str:
    """The stress test as a plain-text table (one line per perturbation, worst first)."""
    lab = result["labelled"]
    head = f"{'perturbation':15s} {'flips':>6s} {'|dp|':>6s}" + (f" {'acc':>6s} {'d acc':>6s} {'AUC':>6s}" if lab else "")
    clean = result["clean"]
    lines = [head, f"{'clean':15s} {'':>6s} {'':>6s}" + (
        f" {clean['accuracy']:6.3f} {'':>6s} {_num(clean['auc_macro'])}" if lab else "")]
    for r in sorted(result["perturbations"], key=lambda r: -r["flip_rate"]):
        line = f"{r['name']:15s} {100 * r['flip_rate']:5.1f}% {r['mean_abs_dprob']:6.3f}"
        if lab:
            line += f" {r['accuracy']:6.3f} {r['delta_accuracy']:+6.3f} {_num(r['auc_macro'])}"
        lines.append(line + ("  fragile" if r["fragile"] else ""))
    return "\n".join(lines)


def _num(v) -> str:
    return f"{v:6.3f}" if v is not None else f"{'-':>6s}"


def stress_checkpoint(checkpoint, out, *, data=None, split: str = "test", manifest: str | None = None,
                      inputs: list[str] | None = None, only: str | None = None, n: int | None = 1000,
                      seed: int = 0, batch_size: int = 64, device: str = "auto") -> dict:
    """`cxrlab stress`: stress-test a checkpoint on a labelled split (`data`) or unlabelled files (`inputs`).

    Writes OUT/stress.json (the `stress_test` result plus where the images came from) and OUT/stress.csv
    (one row per perturbation). At most `n` images (a seeded random subset) keep it quick.
    """
    from cxrlab.inference import expand_inputs, load_model_bundle

    if (data is None) == (not inputs):
        given = "both" if data is not None else "neither"
        raise CxrlabError(f"cxrlab stress: got {given}; give either --data DIR (a labelled split) or image "
                          f"files/folders (unlabelled), one of the two")
    bundle = load_model_bundle(checkpoint, device=device)
    if data is not None:
        imgs = labelled_images(bundle, checkpoint, data, split, manifest, n, seed)
    else:
        imgs = _subset(bundle, None, expand_inputs(inputs), ", ".join(map(str, inputs)), n, seed)
    result = stress_test(bundle, imgs.arrays, imgs.y, only=only, batch_size=batch_size)
    result.update(checkpoint=str(checkpoint), images_from=imgs.source, unreadable=imgs.unreadable, subset=imgs.subset)
    write_result(Path(out), result)
    return result


@dataclass
class Images:
    """A seeded subset of a split, decoded and preprocessed for one model.

    Attributes:
        arrays: uint8 (N, S, S) images preprocessed with the bundle's preset.
        y: (N,) class indices in the bundle's class order, or None for unlabelled files.
        samples: the data index's samples of the readable images (None for unlabelled files).
        source: where the images came from, in words.
        subset: "all", or "K of N (seed S)".
        unreadable: files that could not be decoded (sorted).
    """

    arrays: np.ndarray
    y: np.ndarray | None
    samples: list | None
    source: str
    subset: str
    unreadable: list[str]


def labelled_images(bundle, checkpoint, data, split: str = "test", manifest: str | None = None, n: int | None = 1000,
                    seed: int = 0) -> Images:
    """At most `n` images (a seeded random subset; 0 or None: all) of a labelled split, decoded for `bundle`."""
    from cxrlab.evaluate import split_samples

    samples, split = split_samples(data, split, manifest, bundle.class_names, checkpoint)
    return _subset(bundle, samples, [s.path for s in samples], f"the {split} split of {data}", n, seed)


def _subset(bundle, samples: list | None, paths: list, source: str, n: int | None, seed: int) -> Images:
    from cxrlab.evaluate import label_indices

    chosen = np.arange(len(paths))
    if n and len(paths) > n:
        chosen = np.sort(np.random.default_rng(seed).choice(len(paths), n, replace=False))
    arrays, ok, errors = bundle.arrays_for_files([paths[i] for i in chosen])
    kept = [samples[chosen[i]] for i in ok] if samples is not None else None
    y = label_indices(kept, bundle.class_names) if kept is not None else None
    return Images(arrays, y, kept, source, f"{len(chosen)} of {len(paths)} (seed {seed})" if len(chosen) < len(paths)
                  else "all", sorted(map(str, errors)))


def write_result(out: Path, result: dict) -> None:
    """Write stress.json and stress.csv into out."""
    import csv
    import json

    from cxrlab.metrics import to_jsonable

    out.mkdir(parents=True, exist_ok=True)
    (out / "stress.json").write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    classes = result["class_names"]
    metrics = ["flip_rate", "mean_abs_dprob"]
    recalls: list[str] = []
    if result["labelled"]:
        metrics += ["accuracy", "delta_accuracy", "macro_f1", "auc_macro"]
        recalls = classes
    with open(out / "stress.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *metrics, *(f"share_{c}" for c in classes), *(f"recall_{c}" for c in recalls),
                    "fragile", "fix"])
        for r in result["perturbations"]:
            w.writerow([r["name"], *(r[k] for k in metrics), *(r["predicted_share"][c] for c in classes),
                        *(r["recall"][c] for c in recalls), r["fragile"], r["fix"]])
