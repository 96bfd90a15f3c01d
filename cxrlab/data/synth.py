"""Procedural chest-radiograph phantoms with lesion masks (`cxrlab synth`).

Source: generated here, no patient data, free to use. Each image is a frontal chest radiograph
phantom: thorax soft tissue, two lung fields with vessels, mediastinum, heart, aortic knob,
trachea, spine, ribs, clavicles, diaphragm domes and gastric bubble, rendered through a random
exposure curve with detector blur and noise. Anatomy, exposure and noise vary per image.

Labels: NORMAL (no lesion), PNEUMONIA (lobar or patchy consolidation, middle/lower zones),
TUBERCULOSIS (upper-zone nodules, cavities, fibrotic streaks). The lesion is the only thing that
differs between classes, so a classifier must look at it; its mask (DIR/masks/...) lets Grad-CAM
explanations be scored with the pointing game.

Leakage risks, built in on purpose to exercise the tools: some synthetic patients (`group`) have
two images (kept in one split); three synthetic sites (`source`) differ slightly in exposure and
are spread evenly over the classes, so the site does not predict the label.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import shutil
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA", "TUBERCULOSIS")
SPLITS = ("train", "val", "test")
MARKER = "synth.json"
# site -> (black level shift, contrast factor, gamma factor, noise factor): slight differences only
SITES = {"site_a": (0.0, 1.0, 1.0, 1.0), "site_b": (0.03, 0.94, 1.08, 1.3), "site_c": (-0.02, 1.05, 0.93, 0.8)}
_OWNED = (*SPLITS, "masks", "manifest.csv", MARKER)


@dataclass(frozen=True)
class Phantom:
    """One rendered phantom: `image` uint8 (H, W), lesion `mask` and `lungs` bool (H, W)."""

    image: np.ndarray
    mask: np.ndarray
    lungs: np.ndarray


@dataclass(frozen=True)
class Anatomy:
    """Patient geometry in image units (x, y in [0, 1]); pairs are (image left, image right)."""

    cx: float
    apex: float
    base: tuple[float, float]
    dome: tuple[float, float]
    medi: float
    width: tuple[float, float]
    heart: tuple[float, float, float, float, float]  # x, y, rx, ry, tilt
    body: float
    ribs: tuple[float, float, float]  # gap, curvature, thickness
    lung_dark: float


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a random but plausible thorax.

    Args:
        rng: random generator (consumed).

    Returns:
        The anatomy; cardiothoracic ratio about 0.4-0.5, right hemidiaphragm higher.
    """
    u = rng.uniform
    cx, apex, base = 0.5 + u(-0.02, 0.02), u(0.1, 0.16), u(0.74, 0.83)
    medi = u(0.055, 0.075)
    heart = (cx + u(0.03, 0.06), base - u(0.09, 0.13), u(0.13, 0.17), u(0.1, 0.13), u(-0.5, -0.25))
    return Anatomy(cx=cx, apex=apex, base=(base - u(0.01, 0.04), base), dome=(u(0.05, 0.09), u(0.04, 0.08)),
                   medi=medi, width=(u(0.27, 0.33), u(0.26, 0.32)), heart=heart, body=u(0.43, 0.49),
                   ribs=(u(0.068, 0.08), u(1.6, 2.4), u(0.012, 0.016)), lung_dark=u(0.33, 0.42))


def _grid(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] after a small random rotation and shift (positioning)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    y, x = np.meshgrid(t, t, indexing="ij")
    a, dx, dy = rng.uniform(-0.05, 0.05), rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02)
    c, s = np.float32(np.cos(a)), np.float32(np.sin(a))
    return c * x - s * y + 0.5 + dx, s * x + c * y + 0.5 + dy


@functools.lru_cache(maxsize=64)
def _kernel(n: int, sigma: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float32)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (g / g.sum(1, keepdims=True)).astype(np.float32)


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a square float image, `sigma` in pixels (separable, edges renormalised)."""
    if sigma < 0.3:
        return x
    g = _kernel(x.shape[0], round(float(sigma), 2))
    return g @ x.astype(np.float32) @ g.T


def _seg_dist(x, y, p0, p1):
    """Squared distance from every pixel to each segment p0[k]->p1[k] (K, 2), and position t on it."""
    d = p1 - p0
    px, py = x[None] - p0[:, 0, None, None], y[None] - p0[:, 1, None, None]
    t = np.clip((px * d[:, 0, None, None] + py * d[:, 1, None, None]) / (d ** 2).sum(1)[:, None, None], 0, 1)
    return (px - t * d[:, 0, None, None]) ** 2 + (py - t * d[:, 1, None, None]) ** 2, t


def lung_margin(a: Anatomy, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Signed inside-ness of one lung field (> 0 inside), side 0 = image left, 1 = image right."""
    s = 1 if side else -1
    d = s * (x - a.cx)
    top, base, w = a.apex, a.base[side], a.width[side]
    t = np.clip((y - top) / (base - top), 0, 1)
    outer = a.medi + w * (0.6 + 0.4 * np.sin(np.pi / 2 * np.minimum(t / 0.75, 1)))
    dc, hw = (a.medi + outer) / 2, (outer - a.medi) / 2
    mid = top + 0.3 * (base - top)
    e = (np.abs(d - dc) / hw) ** 2.5 + (np.clip(mid - y, 0, None) / (mid - top)) ** 2
    dome = base - a.dome[side] * np.clip(1 - ((d - a.medi - 0.3 * w) / (0.75 * w)) ** 2, 0, 1)
    hx, hy, rx, ry, tilt = a.heart
    c, sn = np.cos(tilt), np.sin(tilt)
    heart = (((x - hx) * c + (y - hy) * sn) / rx) ** 2 + ((-(x - hx) * sn + (y - hy) * c) / ry) ** 2
    knob = ((x - a.cx - a.medi + 0.012) / 0.035) ** 2 + ((y - top - 0.15) / 0.035) ** 2
    return np.minimum.reduce([1 - e, (dome - y) / 0.08, heart - 1, knob - 1])


def _body(a: Anatomy, x, y, lungs, rng) -> np.ndarray:
    """Soft tissue, mediastinum, heart, abdomen and trachea (attenuation, before bones)."""
    d = np.abs(x - a.cx)
    bw = a.body * (0.32 + 0.68 / (1 + np.exp(-(y - 0.09) / 0.025)))
    tissue = 0.62 * np.sqrt(np.clip(1 - (d / bw) ** 2, 0, 1))
    dome = np.where(x < a.cx, a.base[0], a.base[1]) - 0.04
    abdomen = 0.06 / (1 + np.exp(-(y - dome) / 0.02)) * (d < bw)
    hx, hy = a.heart[:2]
    heart = 0.08 * np.exp(-(((x - hx) / 0.15) ** 2 + ((y - hy) / 0.12) ** 2) ** 2)
    trachea = 0.08 * np.exp(-((x - a.cx) / 0.014) ** 4) * (y < a.apex + 0.17)
    bubble = 0.0
    if rng.random() < 0.6:
        bx, by = a.cx + rng.uniform(0.1, 0.2), a.base[1] + rng.uniform(0.03, 0.07)
        bubble = 0.15 * np.exp(-(((x - bx) / 0.06) ** 2 + ((y - by) / 0.03) ** 2) ** 2)
    return tissue + abdomen + heart - trachea - bubble - a.lung_dark * lungs * (0.9 + 0.15 * y)


def _bones(a: Anatomy, x, y, lungs, rng) -> np.ndarray:
    """Spine with vertebrae, posterior and anterior ribs, clavicles (attenuation)."""
    d = np.abs(x - a.cx)
    gap, curve, th = a.ribs
    period = gap * 0.55
    plates = 1 - 0.4 * np.exp(-((np.mod(y - a.apex, period) / period - 0.5) / 0.09) ** 2)
    spine = 0.16 * np.exp(-(d / 0.042) ** 6) * plates
    k = np.arange(10, dtype=np.float32)[:, None, None]
    centre = a.apex - 0.07 + k * gap + curve * ((d - 0.12) ** 2 - 0.0144) + 0.004 * rng.standard_normal((10, 1, 1))
    post = np.clip(1.7 * np.exp(-((y - centre) / th) ** 2), 0, 1).max(0)
    ant_c = a.apex + 0.03 + k * gap * 1.15 + 0.45 * np.clip(a.body - 0.04 - d, 0, None)
    ant = 0.5 * np.exp(-((y - ant_c) / (th * 0.8)) ** 2).max(0) * (d > 0.15)
    chest = (d > 0.035) * (d < a.body - 0.02) / (1 + np.exp((y - a.base[1] - 0.02) / 0.02))
    p0 = np.array([[a.cx - 0.03, a.apex + 0.06], [a.cx + 0.03, a.apex + 0.06]], np.float32)
    p1 = np.array([[a.cx - 0.33, a.apex - 0.04], [a.cx + 0.33, a.apex - 0.04]], np.float32)
    dist, _ = _seg_dist(x, y, p0, p1)
    clav = np.clip(1.6 * np.exp(-dist / 0.018**2), 0, 1).max(0)
    return spine + 0.06 * (post + ant) * chest + 0.1 * clav


def _vessels(a: Anatomy, x, y, lungs, rng) -> np.ndarray:
    """Branching pulmonary vessels from each hilum, tapering towards the periphery."""
    p0, p1 = [], []
    for s in (-1, 1):
        hil = np.array([a.cx + s * (a.medi + 0.035), a.apex + 0.42 * (a.base[1] - a.apex)])
        ang = rng.uniform(-1.2, 1.3, 7) + np.linspace(-0.5, 0.5, 7)
        ln = rng.uniform(0.12, 0.24, 7)
        ends = hil + np.stack([s * np.cos(ang), -np.sin(ang)], 1) * ln[:, None]
        mids = hil + (ends - hil) * rng.uniform(0.4, 0.7, (7, 1))
        twig = mids + np.stack([s * np.cos(ang + rng.uniform(-0.8, 0.8, 7)), -np.sin(ang)], 1) * 0.08
        p0 += [np.repeat(hil[None], 7, 0), mids]
        p1 += [ends, twig]
    dist, t = _seg_dist(x, y, np.concatenate(p0).astype(np.float32), np.concatenate(p1).astype(np.float32))
    width = 0.007 * (1.3 - 0.8 * t)
    ves = (np.exp(-dist / width**2) * (1 - 0.6 * t)).max(0)
    return 0.09 * ves * lungs


def _blob_field(rng, x, y, centres, radii, size, rough=0.35) -> np.ndarray:
    """Union of soft irregular blobs (smooth-noise modulated), values in [0, 1]."""
    r = np.min(np.hypot(x[None] - centres[:, 0, None, None], y[None] - centres[:, 1, None, None])
               / radii[:, None, None], axis=0)
    noise = blur(rng.standard_normal((size, size)).astype(np.float32), size * 0.025)
    noise /= noise.std() + 1e-6
    return np.clip((1.0 - r + rough * 0.25 * noise) / 0.4, 0, 1)


def _lesion_site(a: Anatomy, rng, zone: tuple[float, float]) -> tuple[np.ndarray, int]:
    """A point well inside a random lung whose vertical fraction of lung height lies in `zone`."""
    for _ in range(200):
        side = int(rng.integers(2))
        p = np.array([a.cx + (1 if side else -1) * (a.medi + a.width[side] * rng.uniform(0.25, 0.8)),
                      a.apex + rng.uniform(*zone) * (a.base[side] - a.apex)], np.float32)
        if lung_margin(a, p[:1], p[1:], side)[0] > 0.25:
            return p, side
    return np.array([a.cx + 0.2, a.apex + np.mean(zone) * (a.base[1] - a.apex)], np.float32), 1


def pneumonia_lesion(a: Anatomy, x, y, rng) -> np.ndarray:
    """Lobar (one large) or patchy (several small) consolidation in the middle/lower zones."""
    size = x.shape[0]
    centre, _ = _lesion_site(a, rng, (0.55, 0.82))
    if rng.random() < 0.5:  # lobar
        centres, radii = centre[None] + rng.normal(0, 0.02, (2, 2)), rng.uniform(0.06, 0.1, 2)
    else:  # patchy
        n = int(rng.integers(3, 7))
        centres, radii = centre[None] + rng.normal(0, 0.045, (n, 2)), rng.uniform(0.03, 0.05, n)
    field = _blob_field(rng, x, y, centres.astype(np.float32), radii, size, rough=rng.uniform(0.5, 1.0))
    return blur(field, size * rng.uniform(0.01, 0.025)) * rng.uniform(0.28, 0.45)


def tuberculosis_lesion(a: Anatomy, x, y, rng) -> np.ndarray:
    """Upper-zone cluster of nodules, often with a thick-walled cavity and fibrotic streaks."""
    centre, side = _lesion_site(a, rng, (0.08, 0.3))
    n = int(rng.integers(4, 10))
    cen = (centre[None] + rng.normal(0, 0.035, (n, 2))).astype(np.float32)
    field = _blob_field(rng, x, y, cen, rng.uniform(0.018, 0.03, n), x.shape[0], rough=0.3)
    if rng.random() < 0.6:  # cavity: bright ring, lucent centre
        r = np.hypot(x - centre[0], y - centre[1])
        rad = rng.uniform(0.028, 0.045)
        field = np.maximum(field, np.exp(-((r - rad) / 0.011) ** 2)) - 0.6 * (r < rad * 0.75)
    if rng.random() < 0.7:  # streaks towards the hilum
        k = int(rng.integers(2, 5))
        hil = np.array([a.cx + (1 if side else -1) * (a.medi + 0.04), a.apex + 0.4 * (a.base[1] - a.apex)])
        p1 = centre + (hil - centre) * rng.uniform(0.35, 0.6, (k, 1)) + rng.normal(0, 0.02, (k, 2))
        dist, t = _seg_dist(x, y, np.repeat(centre[None], k, 0), p1.astype(np.float32))
        field = np.maximum(field, 0.8 * (np.exp(-dist / 0.006**2) * (1 - 0.5 * t)).max(0))
    return field * rng.uniform(0.24, 0.4)


LESIONS = {"NORMAL": None, "PNEUMONIA": pneumonia_lesion, "TUBERCULOSIS": tuberculosis_lesion}


def _expose(att: np.ndarray, rng, site: str) -> np.ndarray:
    """Attenuation -> 8-bit radiograph: exposure window, gamma, heel effect, blur and noise."""
    shift, contrast, gamma, noise = SITES[site]
    size = att.shape[0]
    lo = rng.uniform(0.0, 0.08) + shift
    hi = lo + rng.uniform(0.72, 0.9) / contrast
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    img = (att * (1 + rng.uniform(-0.06, 0.06) * ramp[:, None]) - lo) / (hi - lo)
    img = (1 - np.exp(-2.0 * np.clip(img, 0, None))) / (1 - np.exp(-2.0))
    img = blur(np.clip(img, 0, 1) ** (rng.uniform(0.8, 1.25) * gamma), size / 256)
    sd = rng.uniform(0.006, 0.022) * noise
    grain = rng.standard_normal((size, size)).astype(np.float32)
    img = img + sd * (0.7 * grain + 1.5 * blur(grain, 1.0))
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def render_layers(size: int, label: str, anat_rng, lesion_rng, acq_rng, site: str = "site_a") -> Phantom:
    """Render one phantom from separate random streams (same anatomy rng = same patient).

    Args:
        size: image side in pixels.
        label: one of `CLASSES`.
        anat_rng, lesion_rng, acq_rng: generators for anatomy, lesion and acquisition (pose,
            exposure, noise).
        site: a key of `SITES` (slight exposure differences).

    Returns:
        The image with its lesion mask and lung-field mask.
    """
    if label not in LESIONS:
        raise CxrlabError(f"unknown phantom class {label!r}; allowed: {', '.join(LESIONS)}")
    a = sample_anatomy(anat_rng)
    x, y = _grid(size, acq_rng)
    margin = np.maximum(lung_margin(a, x, y, 0), lung_margin(a, x, y, 1))
    hard = margin > 0
    lungs = blur(np.sqrt(np.clip(margin / 0.4, 0, 1)), size / 200)
    att = _body(a, x, y, lungs, anat_rng) + _bones(a, x, y, lungs, anat_rng) + _vessels(a, x, y, lungs, anat_rng)
    att += 0.025 * lungs * blur(anat_rng.standard_normal((size, size)).astype(np.float32), size / 60)
    mask = np.zeros((size, size), bool)
    if LESIONS[label] is not None:
        lesion = blur(LESIONS[label](a, x, y, lesion_rng), size / 200) * lungs
        att += lesion
        mask = (lesion > 0.25 * lesion.max()) & hard
    return Phantom(image=_expose(att, acq_rng, site), mask=mask, lungs=hard)


def render_phantom(rng: np.random.Generator, size: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Render one random chest-radiograph phantom.

    Args:
        rng: random generator; the result is a function of its state.
        size: image side in pixels (square image).
        label: one of `CLASSES`.

    Returns:
        (image uint8 (size, size), lesion mask bool (size, size); all False for NORMAL).
    """
    seeds = rng.integers(0, 2**63, size=3)
    p = render_layers(size, label, *(np.random.default_rng(int(s)) for s in seeds))
    return p.image, p.mask


def _split_counts(n: int) -> dict[str, int]:
    """Images per split for `n` images of a class: 70/15/15, at least one each."""
    if n < 3:
        raise CxrlabError(f"--per-class {n} is too small: each class needs at least 3 images (train/val/test)")
    val = test = max(1, round(0.15 * n))
    return {"train": n - val - test, "val": val, "test": test}


def _plan(label: str, per_class: int, seed: int) -> list[dict]:
    """Patients of one class: split, group id, site and image count (1 or 2), deterministic."""
    key = zlib.crc32(label.encode())
    rng = np.random.default_rng([seed, key])
    plan, offset = [], int(rng.integers(len(SITES)))
    for split, n in _split_counts(per_class).items():
        while n > 0:
            k = 2 if n >= 2 and rng.random() < 0.25 else 1
            site = list(SITES)[(offset + len(plan)) % len(SITES)]
            plan.append({"split": split, "group": f"{label.lower()}_p{len(plan):04d}", "site": site, "n": k})
            n -= k
    return plan


def _one_thread():
    """Limit BLAS to one thread: the blurs are tiny matrix products that threads only slow down."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (comes with scikit-learn)
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def _prepare(out: Path, overwrite: bool) -> None:
    """Check that `out` may be written (empty, previous synth output, or overwrite) and clear it."""
    if out.exists() and not out.is_dir():
        raise CxrlabError(f"--out {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise CxrlabError(f"--out {out} is not empty and is not a previous `cxrlab synth` output "
                          f"(no {MARKER}); choose a new or empty folder, or pass --overwrite to replace "
                          f"its {'/, '.join(_OWNED[:-2])}/ and manifest.csv")
    for name in _OWNED:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path, format="PNG", optimize=False)


def _write_patient(out: Path, label: str, patient: dict, size: int, seed: int) -> list[dict]:
    """Render and save the images (and masks) of one patient; return their manifest rows."""
    key, pid = zlib.crc32(label.encode()), int(patient["group"].rsplit("_p", 1)[1])
    anat_seed, lesion_seed = ([seed, key, pid, j] for j in (0, 1))
    rows = []
    for i in range(patient["n"]):
        rngs = (np.random.default_rng(s) for s in (anat_seed, lesion_seed, [seed, key, pid, 2 + i]))
        p = render_layers(size, label, *rngs, site=patient["site"])
        rel = f"{patient['split']}/{label}/{patient['group']}_{i}.png"
        _save(out / rel, p.image)
        if LESIONS[label] is not None:
            _save(out / "masks" / rel, p.mask.astype(np.uint8) * 255)
        rows.append({"path": rel, "label": label, "split": patient["split"], "group": patient["group"],
                     "source": patient["site"]})
    return rows


def check_settings(per_class: int, size: int, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> dict:
    """Validate `generate`'s settings before any folder is touched.

    Returns:
        The patients of each class (`{class: plan}`), which `generate` writes.
    """
    bad = [c for c in classes if c not in LESIONS]
    if bad or not classes:
        raise CxrlabError(f"unknown classes {bad}; allowed: {', '.join(CLASSES)}")
    if size < 32:
        raise CxrlabError(f"--size {size} is too small; use at least 32 pixels")
    return {c: _plan(c, per_class, seed) for c in classes}  # _plan validates per_class


def generate(out_dir: str | Path, per_class: int = 200, size: int = 128, seed: int = 0,
             classes: tuple[str, ...] = CLASSES, *, overwrite: bool = False) -> dict:
    """Write a phantom folder data set with train/val/test splits, lesion masks and a manifest.

    Layout: `DIR/{split}/{CLASS}/{stem}.png`, `DIR/masks/{split}/{CLASS}/{stem}.png` (abnormal
    classes), `DIR/manifest.csv` (path,label,split,group,source) and `DIR/synth.json` (settings).
    The files are byte-identical for the same arguments.

    Args:
        out_dir: output folder; must be new, empty or a previous synth output (replaced).
        per_class: total images per class, split 70/15/15 (at least 1 per split; >= 3).
        size: image side in pixels (>= 32).
        seed: random seed.
        classes: class names, a subset of `CLASSES`.
        overwrite: allow a non-empty folder that is not a synth output; only the synth-owned
            entries (split folders, masks/, manifest.csv, synth.json) are replaced.

    Returns:
        Image counts `{split: {class: n}}`.
    """
    plans = check_settings(per_class, size, seed, classes)  # before anything is deleted
    out = Path(out_dir)
    _prepare(out, overwrite)
    rows, counts = [], {s: {c: 0 for c in classes} for s in SPLITS}
    with _one_thread():
        for label, plan in plans.items():
            for patient in plan:
                rows += _write_patient(out, label, patient, size, seed)
                counts[patient["split"]][label] += patient["n"]
            log.debug("synth: %s done (%d images)", label, per_class)
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "group", "source"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    settings = {"generator": "cxrlab synth", "per_class": per_class, "size": size, "seed": seed,
                "classes": list(classes), "counts": counts}
    (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return counts
