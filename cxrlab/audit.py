"""Dataset audit: what to know about a data set before trusting a model trained on it.

Finds unreadable files, exact duplicates (sha256 of the bytes), near duplicates (perceptual hash
of the decoded grayscale image: survives resizing and JPEG re-encoding), duplicates across splits
(leakage), the same image under two labels, patients (groups) in several splits, class
imbalance, and intensity / size differences between classes, folders and sources that a model
could use as a shortcut instead of the lungs.

Near duplicates are proposed by comparing 64-bit pHashes as packed integers in numpy blocks
(XOR + popcount), so 15k images take a second, not a Python loop over 10^8 pairs, and confirmed
by the rank correlation of 32x32 thumbnails. The pHash alone cannot tell radiographs apart:
chest films share their low-frequency layout, and on the Kermany set 11 pairs of different
patients measured 2 bits, 184 measured 4 and 1660 measured 6 (single-linkage then chained 699
films into one "duplicate"); their thumbnails correlate at most 0.962, while resized,
re-encoded, brightened, gamma-changed, equalised or shifted copies correlate 0.99 or more
(docs/BENCHMARKS.md, "Near duplicates on radiographs").
Nearly constant images are left out of the near-duplicate search (their hashes are meaningless).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from cxrlab.errors import ImageReadError

log = logging.getLogger(__name__)

DEFAULT_NEAR_THRESHOLD = 8  # pHash bits of 64 that propose a pair: copies measure 0-2 (gamma/equalised up to 10-18)
NEAR_MIN_CORRELATION = 0.99  # rank correlation of 32x32 thumbnails that confirms it (other patients: <= 0.966)
THUMB_SIZE = 32
BORDER_FRACTION = 0.05  # width of the border band, as a fraction of each side
_STATS = ("mean", "std", "border_dark", "border_bright", "sharpness", "width", "height")
SHARPNESS_SIZE = 224  # sharpness is measured at the scale a model sees
_MAX_PAIRS_PER_CLUSTER = 100


@dataclass
class FileRecord:
    """What the audit learned about one file."""

    path: str
    split: str
    label: str
    group: str | None = None
    source: str | None = None
    sha256: str | None = None
    error: str | None = None
    header: dict | None = None
    phash: int | None = None
    thumb: np.ndarray | None = None  # rank-normalised thumbnail (`rank_thumbnail`), confirms near duplicates
    stats: dict | None = None
    warning: str | None = None

    def ref(self) -> dict:
        return {"path": self.path, "split": self.split, "label": self.label, "source": self.source}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fast_leak_check(samples: Iterable) -> list[dict]:
    """Byte-identical files shared by ``train`` and ``val``/``test`` (no decoding).

    Only files whose size matches a file of the other side are hashed, so a clean data set
    costs one ``stat`` per file.

    Args:
        samples: objects with ``path`` and ``split`` (e.g. `cxrlab.data.dataset.Sample`).

    Returns:
        One ``{"a", "a_split", "b", "b_split", "kind": "exact"}`` per leaked pair
        (``a`` in train, ``b`` in val/test; paths as given).
    """
    train = [s for s in samples if s.split == "train"]
    held = [s for s in samples if s.split in ("val", "test")]
    sizes_train, sizes_held = _sizes(train), _sizes(held)
    common = set(sizes_train.values()) & set(sizes_held.values())
    by_hash: dict[str, list] = defaultdict(list)
    for s in train:
        if sizes_train.get(id(s)) in common:
            by_hash[_safe_sha(s.path)].append(s)
    by_hash.pop(None, None)  # unreadable files: the audit reports them
    pairs = []
    for s in held:
        if sizes_held.get(id(s)) in common:
            for t in by_hash.get(_safe_sha(s.path), []):
                pairs.append({"a": str(t.path), "a_split": t.split, "b": str(s.path), "b_split": s.split, "kind": "exact"})
    return pairs


def _sizes(samples) -> dict[int, int]:
    out = {}
    for s in samples:
        try:
            out[id(s)] = os.stat(s.path).st_size
        except OSError:
            pass
    return out


def _safe_sha(path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


# ----------------------------------------------------------------------------- per file


def inspect_file(sample) -> FileRecord:
    """Hash, header, decode, pHash and intensity statistics of one sample (never raises)."""
    import imagehash
    from PIL import Image

    from cxrlab.data.io import read_gray, read_header, sniff_intensity_warning

    rec = FileRecord(str(sample.path), sample.split, sample.label, sample.group, sample.source)
    try:
        rec.sha256 = file_sha256(sample.path)
        rec.header = read_header(sample.path)
        gray = read_gray(sample.path)
    except ImageReadError as exc:
        rec.error = exc.reason
        return rec
    except FileNotFoundError:
        rec.error = "file not found"
        return rec
    except OSError as exc:
        rec.error = f"cannot read file ({exc.strerror or exc})"
        return rec
    rec.stats = intensity_stats(gray)
    rec.warning = sniff_intensity_warning(gray)
    if rec.stats["std"] >= 2.0:
        im = Image.fromarray(gray)
        if max(im.size) > 256:
            im.thumbnail((256, 256), Image.Resampling.BOX)  # same hash, a fraction of the time
        rec.phash = int(str(imagehash.phash(im)), 16)
        rec.thumb = rank_thumbnail(im)
    return rec


def rank_thumbnail(im, size: int = THUMB_SIZE) -> np.ndarray:
    """The image shrunk to size x size, its pixels replaced by their ranks, centred and scaled to unit length
    (float16): the dot product of two is their rank correlation, unchanged by brightness, contrast, gamma or
    histogram equalisation."""
    from PIL import Image
    from scipy.stats import rankdata

    a = np.asarray(im.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float32).ravel()
    r = rankdata(a).astype(np.float32)
    r -= r.mean()
    norm = float(np.linalg.norm(r))
    return (r / norm if norm else r).astype(np.float16)


def sharpness(gray: np.ndarray, size: int = SHARPNESS_SIZE) -> float:
    """Mean absolute difference between neighbouring pixels once the image is scaled to size x size.

    At the model's input scale an image scaled down from a large original is sharper than one scaled
    up (or down less) from a small original: when classes come from different originals (in the
    Kermany set the normals are larger files than the pneumonias), sharpness alone tells them apart.
    """
    from PIL import Image

    a = np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def intensity_stats(gray: np.ndarray) -> dict:
    """Mean, std, border dark/bright fractions (pixels < 16 / > 239 in the outer 5%), sharpness, size."""
    h, w = gray.shape
    a = gray[:: max(1, h // 512), :: max(1, w // 512)]
    bh, bw = max(1, round(a.shape[0] * BORDER_FRACTION)), max(1, round(a.shape[1] * BORDER_FRACTION))
    border = np.concatenate([a[:bh].ravel(), a[-bh:].ravel(), a[:, :bw].ravel(), a[:, -bw:].ravel()])
    return {"mean": float(a.mean()), "std": float(a.std()), "border_dark": float(np.mean(border < 16)),
            "border_bright": float(np.mean(border > 239)), "sharpness": sharpness(gray), "width": w, "height": h}


# ----------------------------------------------------------------------------- the audit


def audit(samples: list, *, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
          near_correlation: float = NEAR_MIN_CORRELATION, workers: int | None = None, progress: bool = False) -> dict:
    """Audit a list of samples.

    Args:
        samples: objects with ``path``, ``label``, ``split``, ``group``, ``source``
            (`cxrlab.data.dataset.scan` gives them).
        near_threshold: largest pHash Hamming distance (of 64 bits) that proposes a near duplicate.
        near_correlation: smallest thumbnail rank correlation that confirms it (0: the pHash alone decides).
        workers: decoding threads (default: up to 4, bounded by the CPU count).
        progress: show a progress bar.

    Returns:
        The report (JSON-serialisable); every finding names its files with the paths as given.
    """
    from tqdm import tqdm

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        records = list(tqdm(pool.map(inspect_file, samples), total=len(samples), desc="audit",
                            unit="img", disable=not progress))
    ok = [r for r in records if r.error is None]
    clusters = _exact_clusters(ok) + _near_clusters(ok, near_threshold, near_correlation)
    cross = [c for c in clusters if len(set(c["splits"]) - {"all"}) > 1]
    return {
        "n_files": len(records), "n_readable": len(ok),
        "settings": {"near_threshold": near_threshold, "hash": "imagehash.phash 64-bit",
                     "near_correlation": near_correlation,
                     "confirmation": f"rank correlation of {THUMB_SIZE}x{THUMB_SIZE} thumbnails",
                     "border_fraction": BORDER_FRACTION},
        "counts": (counts := _counts(records)), "imbalance": _imbalance(counts),
        "images": _histograms(ok),
        "unreadable": [{**r.ref(), "reason": r.error} for r in records if r.error],
        "exact_duplicates": [c for c in clusters if c["kind"] == "exact"],
        "near_duplicates": [c for c in clusters if c["kind"] == "near"],
        "cross_split": cross, "leakage": _leak_pairs(cross),
        "label_conflicts": [c for c in clusters if len({lab.lower() for lab in c["labels"]}) > 1],
        "group_leakage": _group_leakage(records),
        "intensity": {k: _group_stats(ok, k) for k in ("label", "split", "folder", "source")},
        "intensity_warnings": [{**r.ref(), "warning": r.warning} for r in ok if r.warning],
        "shortcut_hints": _shortcut_hints(ok),
    }


def _counts(records) -> dict:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        out[r.split][r.label] += 1
    return {sp: dict(sorted(c.items())) for sp, c in sorted(out.items())}


def _imbalance(counts: dict) -> dict:
    labels = sorted({lab for c in counts.values() for lab in c})
    out = {}
    for sp, c in counts.items():
        hi, lo = max(c, key=c.get), min(c, key=c.get)
        out[sp] = {"ratio": round(c[hi] / c[lo], 3), "largest": hi, "smallest": lo,
                   "missing_classes": [lab for lab in labels if lab not in c]}
    return out


def _histograms(records) -> dict:
    sizes = Counter(f"{r.header['width']}x{r.header['height']}" for r in records)
    edges = [0, 256, 512, 1024, 2048, 4096]
    names = ["<256", "256-511", "512-1023", "1024-2047", "2048-4095", ">=4096"]
    short = Counter(names[np.searchsorted(edges, min(r.header["width"], r.header["height"]), "right") - 1]
                    for r in records)
    return {"formats": dict(Counter(r.header["format"] for r in records)),
            "modes": dict(Counter(r.header["mode"] for r in records)),
            "bits": {str(k): v for k, v in Counter(r.header["bits"] for r in records).items()},
            "short_side": {k: short[k] for k in names if short[k]}, "top_sizes": dict(sizes.most_common(10)),
            "n_sizes": len(sizes)}


# ----------------------------------------------------------------------------- duplicates


def _cluster(members: list[FileRecord], kind: str, distance: int) -> dict:
    members = sorted(members, key=lambda r: (r.split, r.path))
    return {"kind": kind, "distance": distance, "files": [m.ref() for m in members],
            "splits": sorted({m.split for m in members}), "labels": sorted({m.label for m in members})}


def _by_sha(records) -> dict[str, list[FileRecord]]:
    out: dict[str, list[FileRecord]] = defaultdict(list)
    for r in records:
        out[r.sha256].append(r)
    return out


def _exact_clusters(records) -> list[dict]:
    return [_cluster(m, "exact", 0) for m in _by_sha(records).values() if len(m) > 1]


def _near_clusters(records, threshold: int, min_correlation: float = NEAR_MIN_CORRELATION) -> list[dict]:
    """Clusters of files whose pHashes are within ``threshold`` and whose thumbnails correlate at least
    ``min_correlation``, but whose bytes differ."""
    groups = [m for m in _by_sha(records).values() if m[0].phash is not None]
    if len(groups) < 2 or threshold < 0:
        return []
    hashes = np.array([m[0].phash for m in groups], dtype=np.uint64)
    i, j, d = near_pairs(hashes, threshold)
    if min_correlation > 0 and len(i):
        thumbs = np.stack([m[0].thumb for m in groups])
        corr = np.concatenate([thumbnail_correlation(thumbs[i[k:k + 1024]], thumbs[j[k:k + 1024]])
                               for k in range(0, len(i), 1024)])
        keep = corr >= min_correlation
        log.debug("near duplicates: %d of %d pHash candidate pairs confirmed", int(keep.sum()), len(i))
        i, j, d = i[keep], j[keep], d[keep]
    parent = list(range(len(groups)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = defaultdict(list)
    for k in range(len(groups)):
        members[find(k)].append(k)
    worst: dict[int, int] = defaultdict(int)
    for a, dist in zip(i.tolist(), d.tolist()):
        worst[find(a)] = max(worst[find(a)], dist)
    return [_cluster([r for k in ks for r in groups[k]], "near", worst[root])
            for root, ks in members.items() if len(ks) > 1]


def thumbnail_correlation(a: np.ndarray, b: np.ndarray, shift: int = 2) -> np.ndarray:
    """Rank correlation of pairs of `rank_thumbnail`s (rows of `a` and `b`), the best of the whole thumbnails and
    of `a`'s centre against `b`'s windows moved up to `shift` pixels (of 32: 6% of the side) in each direction, so
    that a copy cropped or padded off-centre still correlates (cxr3 holds such copies across splits)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    best = np.einsum("ij,ij->i", a, b)
    size = THUMB_SIZE - 2 * shift
    a_img, b_img = a.reshape(-1, THUMB_SIZE, THUMB_SIZE), b.reshape(-1, THUMB_SIZE, THUMB_SIZE)

    def unit(w: np.ndarray) -> np.ndarray:
        w = w.reshape(len(w), -1)
        w = w - w.mean(1, keepdims=True)
        return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-9)

    centre = unit(a_img[:, shift:shift + size, shift:shift + size])
    for dy in range(2 * shift + 1):
        for dx in range(2 * shift + 1):
            best = np.maximum(best, np.einsum("ij,ij->i", centre, unit(b_img[:, dy:dy + size, dx:dx + size])))
    return best


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1, dtype=np.uint8)


def near_pairs(hashes: np.ndarray, threshold: int, block: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs ``i < j`` of 64-bit hashes with Hamming distance <= ``threshold``.

    Args:
        hashes: ``uint64`` array (n,).
        threshold: largest distance kept.
        block: rows compared at once (memory ~ block * n * 9 bytes).

    Returns:
        ``(i, j, distance)`` arrays.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    out_i, out_j, out_d = [], [], []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block]
        dist = _popcount(rows[:, None] ^ hashes[None, start:])
        ii, jj = np.nonzero(dist <= threshold)
        keep = jj > ii  # columns start at `start`: jj > ii means j > i globally, each pair once
        out_i.append(ii[keep] + start)
        out_j.append(jj[keep] + start)
        out_d.append(dist[ii[keep], jj[keep]].astype(np.int64))
    if not out_i:
        return (np.empty(0, np.int64),) * 3
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


def _leak_pairs(cross: list[dict]) -> list[dict]:
    """train x (val|test) pairs of the cross-split clusters, as `fast_leak_check` reports them."""
    pairs = []
    for c in cross:
        train = [f for f in c["files"] if f["split"] == "train"]
        held = [f for f in c["files"] if f["split"] in ("val", "test")]
        both = [(a, b) for a in train for b in held] or [(a, b) for a in c["files"] for b in c["files"]
                                                         if a["split"] < b["split"]]
        for a, b in both[:_MAX_PAIRS_PER_CLUSTER]:
            pairs.append({"a": a["path"], "a_split": a["split"], "a_label": a["label"], "b": b["path"],
                          "b_split": b["split"], "b_label": b["label"], "kind": c["kind"], "distance": c["distance"]})
    return pairs


def _group_leakage(records) -> list[dict]:
    splits: dict[str, set] = defaultdict(set)
    for r in records:
        if r.group:
            splits[r.group].add(r.split)
    return [{"group": g, "splits": sorted(s)} for g, s in sorted(splits.items()) if len(s - {"all"}) > 1]


# ----------------------------------------------------------------------------- shortcuts


def _key(r: FileRecord, key: str) -> str | None:
    return str(Path(r.path).parent) if key == "folder" else getattr(r, key)


def _group_stats(records, key: str) -> dict:
    groups: dict[str, list] = defaultdict(list)
    for r in records:
        if _key(r, key) is not None:
            groups[_key(r, key)].append(r.stats)
    return {g: {"n": len(st), **{k: round(float(np.mean([s[k] for s in st])), 4) for k in _STATS}}
            for g, st in sorted(groups.items())}


def _shortcut_hints(records, min_effect: float = 1.0) -> list[str]:
    """Statistics that differ between classes by more than ``min_effect`` pooled standard deviations."""
    by_label: dict[str, list] = defaultdict(list)
    for r in records:
        by_label[r.label].append(r.stats)
    if len(by_label) < 2:
        return []
    hints = []
    for k in _STATS:
        means = {lab: float(np.mean([s[k] for s in st])) for lab, st in by_label.items()}
        spread = float(np.std([r.stats[k] for r in records])) or 1e-9
        hi, lo = max(means, key=means.get), min(means, key=means.get)
        effect = (means[hi] - means[lo]) / spread
        if effect > min_effect:
            hints.append(f"{k} differs between classes: {hi} {means[hi]:.3g} vs {lo} {means[lo]:.3g} "
                         f"({effect:.1f} std); a model could tell the classes apart by this alone"
                         + (" (images resized from different original sizes?): train with --aug-blur 1.5"
                            if k == "sharpness" else ""))
    return hints


def format_summary(report: dict, max_items: int = 10) -> list[str]:
    """Readable summary lines of an audit report."""
    lines = [f"{report['n_files']} files, {report['n_readable']} readable"]
    for sp, c in report["counts"].items():
        imb = report["imbalance"][sp]
        lines.append(f"  {sp}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                     + f"  (imbalance {imb['ratio']:.1f}x)" + (f", missing {imb['missing_classes']}" if imb["missing_classes"] else ""))
    im = report["images"]
    lines.append(f"formats {im.get('formats')}, modes {im.get('modes')}, bits {im.get('bits')}, short side {im.get('short_side')}")
    sections = [("unreadable", "unreadable files", lambda f: f"{f['path']}: {f['reason']}"),
                ("cross_split", "duplicates ACROSS splits (leakage)", _fmt_cluster),
                ("label_conflicts", "same image with different labels", _fmt_cluster),
                ("exact_duplicates", "exact duplicates", _fmt_cluster),
                ("near_duplicates", "near duplicates", _fmt_cluster),
                ("group_leakage", "groups (patients) in several splits", lambda g: f"{g['group']}: {g['splits']}"),
                ("intensity_warnings", "suspicious intensities", lambda f: f"{f['path']}: {f['warning']}"),
                ("shortcut_hints", "possible shortcuts", str)]
    for key, title, fmt in sections:
        items = report[key]
        lines.append(f"{title}: {len(items)}")
        lines += [f"  - {fmt(x)}" for x in items[:max_items]]
        if len(items) > max_items:
            lines.append(f"  ... {len(items) - max_items} more in the JSON report")
    return lines


def _fmt_cluster(c: dict) -> str:
    files = " <-> ".join(f"{f['path']} [{f['split']}/{f['label']}]" for f in c["files"][:4])
    more = f" (+{len(c['files']) - 4} more)" if len(c["files"]) > 4 else ""
    return f"{c['kind']} (distance {c['distance']}): {files}{more}"
