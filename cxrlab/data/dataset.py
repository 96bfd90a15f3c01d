"""Find the images of a data set: folder layouts and CSV manifests. Nothing here decodes images.

Supported layouts:

* ``ROOT/{train,val,test}/<CLASS>/*`` (any subset of splits that includes ``train`` or ``test``);
* ``ROOT/<CLASS>/*``: one flat set (split ``all``), e.g. another hospital's images to evaluate;
* a CSV manifest ``path,label[,split][,group][,source]`` (paths relative to the CSV's folder).

Class names come from the folder names (or manifest labels), matched case-insensitively across
splits (``NORMAL`` == ``normal``; the first spelling seen, in sorted order, is kept) and sorted.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrlab.data.io import is_image_file
from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image file (not decoded)."""

    path: Path
    label: str
    split: str
    group: str | None = None
    source: str | None = None


@dataclass
class DataIndex:
    """The samples of a data set, by split, with the sorted class names.

    Attributes:
        class_names: sorted class names.
        splits: split name -> list of samples.
        root: where the data came from (folder or manifest).
    """

    class_names: list[str]
    splits: dict[str, list[Sample]]
    root: Path
    notes: list[str] = field(default_factory=list)

    def labels(self, split: str) -> np.ndarray:
        """Integer labels of a split, in `class_names` order."""
        lookup = {c: i for i, c in enumerate(self.class_names)}
        return np.array([lookup[s.label] for s in self.splits[split]], dtype=np.int64)

    def summary(self) -> dict[str, dict[str, int]]:
        """Counts per split and class: ``{split: {class: n}}``."""
        return {sp: {c: sum(s.label == c for s in ss) for c in self.class_names} for sp, ss in self.splits.items()}


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_class_folders(folder: Path, split: str) -> list[Sample]:
    samples = []
    for cdir in _class_dirs(folder):
        samples += [Sample(p, cdir.name, split) for p in _list_images(cdir)]
    return samples


def scan(data: str | Path, manifest: str | Path | None = None) -> list[Sample]:
    """List every image of a data set with its label and split (``all`` when there are no splits).

    Args:
        data: a folder (split or flat class layout) or a CSV manifest file.
        manifest: an explicit manifest (overrides the folder layout).

    Returns:
        The samples, labels as spelled on disk (see `build_index` for canonical names).
    """
    data = Path(data)
    if manifest is not None or (data.is_file() and data.suffix.lower() == ".csv"):
        return read_manifest(Path(manifest) if manifest is not None else data)
    if not data.is_dir():
        raise CxrlabError(f"data folder '{data}' does not exist. Pass --data with a folder holding "
                          "train/, val/, test/ (each with one folder per class) or class folders directly, or a CSV manifest.")
    _hint_manifest(data)
    split_dirs = {p.name.lower(): p for p in data.iterdir() if p.is_dir() and p.name.lower() in SPLITS}
    if split_dirs:
        return [s for sp in SPLITS if sp in split_dirs for s in _scan_class_folders(split_dirs[sp], sp)]
    return _scan_class_folders(data, "all")


_HINTED: set[str] = set()


def _hint_manifest(folder: Path) -> None:
    """A folder read by its layout that also holds a manifest.csv with group or source columns: say once that those
    columns are used only with --manifest (per-source metrics, patient-grouped validation carves)."""
    path = folder / "manifest.csv"
    if str(path) in _HINTED or not path.is_file():
        return
    _HINTED.add(str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = [c.strip().lower() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return
    extra = [c for c in ("group", "source") if c in header]
    if extra:
        log.info("%s has %s column(s) that a folder read ignores: pass --manifest %s to use them (per-source "
                 "metrics, patient-grouped carves)", path, " and ".join(extra), path)


def read_manifest(path: Path) -> list[Sample]:
    """Read a ``path,label[,split][,group][,source]`` CSV. Paths may not leave the CSV's folder.

    Args:
        path: the CSV file.

    Returns:
        The samples (split ``all`` when the manifest has no split column).
    """
    if not path.is_file():
        raise CxrlabError(f"manifest '{path}' does not exist")
    base = path.parent.resolve()
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if not {"path", "label"} <= set(cols):
            raise CxrlabError(f"manifest '{path}' needs columns path,label[,split][,group][,source]; found: {', '.join(cols) or 'none'}")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    samples = []
    for i, r in enumerate(rows, start=2):
        samples.append(_manifest_sample(r, base, path, i))
    return samples


def _manifest_sample(row: dict, base: Path, path: Path, line: int) -> Sample:
    if not row.get("path") or not row.get("label"):
        raise CxrlabError(f"{path}:{line}: empty path or label")
    try:
        if "\x00" in row["path"]:
            raise ValueError("embedded null byte")
        full = (base / row["path"]).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CxrlabError(f"{path}:{line}: path {row['path']!r} is not a valid file path ({exc})") from exc
    if base not in full.parents:
        raise CxrlabError(f"{path}:{line}: path '{row['path']}' points outside the manifest's folder {base}; "
                          "use paths relative to the manifest, inside its folder")
    split = (row.get("split") or "all").lower()
    if split not in (*SPLITS, "all"):
        raise CxrlabError(f"{path}:{line}: split '{row['split']}' is not one of train, val, test")
    return Sample(full, row["label"], split, row.get("group") or None, row.get("source") or None)


def canonical_classes(samples: list[Sample]) -> dict[str, str]:
    """Map every label spelling to one canonical name (case-insensitive match, first sorted spelling)."""
    canon: dict[str, str] = {}
    for label in sorted({s.label for s in samples}):
        canon.setdefault(label.lower(), label)
    return {label: canon[label.lower()] for label in {s.label for s in samples}}


def build_index(data: str | Path, manifest: str | Path | None = None, *, val_fraction: float = 0.15,
                seed: int = 0, group_regex: str | None = None, require: tuple[str, ...] = ("train",),
                check: tuple[str, ...] | None = None) -> DataIndex:
    """Scan a data set, unify class names and make sure the splits are usable.

    Args:
        data: folder or manifest (see module doc).
        manifest: explicit manifest path.
        val_fraction: fraction of ``train`` carved out as validation when there is no ``val``.
        seed: seed of that split.
        group_regex: regex whose first group (or whole match) on the file name is the patient id;
            one patient never lands in two splits.
        require: splits that must exist (``("train",)`` for training, ``()`` to accept a flat set).
        check: the splits that will be used, whose classes are checked (default: every split). A class
            missing from train or val is an error when training (`require` holds train), else a warning.

    Returns:
        The `DataIndex`.
    """
    samples = scan(data, manifest)
    if not samples:
        raise CxrlabError(f"no images found under '{data}'. Expected ROOT/train/<CLASS>/*.png (or .jpg, .dcm, ...) "
                          "or ROOT/<CLASS>/*.png, or a CSV manifest")
    canon = canonical_classes(samples)
    samples = [Sample(s.path, canon[s.label], s.split, s.group or _group_of(s.path, group_regex), s.source) for s in samples]
    splits: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        splits[s.split].append(s)
    class_names = sorted(set(canon.values()))
    csv_file = _manifest_file(data, manifest)
    if len(class_names) < 2:
        raise CxrlabError(_one_class_message(Path(data), class_names[0], csv_file))
    index = DataIndex(class_names, dict(splits), Path(data))
    if "all" in index.splits and "train" in require:
        index.splits["train"] = index.splits.pop("all")
    _check_splits(index, require, index.splits if check is None else check, csv_file)
    if "train" in index.splits and "val" not in index.splits and val_fraction > 0:
        index.splits["train"], index.splits["val"] = carve_validation(index.splits["train"], val_fraction, seed)
        index.notes.append(f"no val/ split: carved {len(index.splits['val'])} validation images out of train "
                           f"({val_fraction:.0%}, seed {seed}, grouped by {'patient' if group_regex else 'file'})")
    return index


def _group_of(path: Path, regex: str | None) -> str | None:
    if not regex:
        return None
    m = re.search(regex, path.name)
    if not m:
        return path.stem
    return m.group(1) if m.groups() else m.group(0)


def _manifest_file(data: str | Path, manifest: str | Path | None) -> Path | None:
    """The CSV manifest the samples came from (None: a folder layout)."""
    if manifest is not None:
        return Path(manifest)
    return Path(data) if Path(data).suffix.lower() == ".csv" else None


def _one_class_message(data: Path, found: str, csv_file: Path | None) -> str:
    msg = f"'{data}' has only one class ({found}); a classifier needs at least two"
    if csv_file is not None:
        return f"{msg}: add rows with another label to manifest '{csv_file}'"
    empty = _empty_class_folders(data, {found.lower()})
    if empty:
        return (f"{msg}. Class folder(s) {', '.join(empty)} of '{data}' hold no images "
                f"(.png, .jpg, .dcm, ...): add images to them")
    return f"{msg}: add a folder of images per class"


def _empty_class_folders(data: Path, found: set[str]) -> list[str]:
    """Class folders (``CLASS`` or ``split/CLASS``) of a folder layout that hold no images of a class not `found`."""
    split_dirs = [p for p in _class_dirs(data) if p.name.lower() in SPLITS] or [data]
    return [str(c.relative_to(data)) for sd in split_dirs for c in _class_dirs(sd)
            if c.name.lower() not in found and not _list_images(c)]


def _check_splits(index: DataIndex, require: tuple[str, ...], check, csv_file: Path | None) -> None:
    for sp in require:
        if sp not in index.splits:
            where = (f"rows with split {sp} in manifest '{csv_file}'" if csv_file is not None
                     else f"{index.root}/{sp}/<CLASS>/*")
            raise CxrlabError(f"'{index.root}' has no {sp} split. Expected {where}")
    for sp in (sp for sp in check if sp in index.splits):
        counts = Counter(s.label for s in index.splits[sp])
        missing = [c for c in index.class_names if counts[c] == 0]
        if missing and sp in ("train", "val") and "train" in require:
            fix = (f"Add rows with split {sp} and that label to manifest '{csv_file}', or remove that label's rows"
                   if csv_file is not None else
                   f"Add images to {index.root}/{sp}/{missing[0] if len(missing) == 1 else '<CLASS>'}/, "
                   "or remove that class's folders from every split")
            raise CxrlabError(f"class {', '.join(missing)} has no images in the {sp} split of '{index.root}' "
                              f"(classes found elsewhere: {', '.join(index.class_names)}). {fix}.")
        if missing:
            log.warning("class %s has no images in the %s split", ", ".join(missing), sp)


def carve_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded train/validation split; samples sharing a group stay together.

    Args:
        samples: the training samples.
        fraction: share of each class that goes to validation (at least one group per class).
        seed: random seed.

    Returns:
        (train, val) lists.
    """
    if not 0 < fraction < 1:
        raise CxrlabError(f"validation fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group or str(s.path)].append(s)
    by_class: dict[str, list[str]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        by_class[Counter(m.label for m in members).most_common(1)[0][0]].append(g)
    val_groups: set[str] = set()
    for label in sorted(by_class):
        gs = by_class[label]
        order = rng.permutation(len(gs))
        target, taken = fraction * sum(len(groups[g]) for g in gs), 0
        for i in order:
            if taken >= target and taken > 0:
                break
            val_groups.add(gs[i])
            taken += len(groups[gs[i]])
    train = [s for s in samples if (s.group or str(s.path)) not in val_groups]
    val = [s for s in samples if (s.group or str(s.path)) in val_groups]
    return train, val
