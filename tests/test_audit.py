"""cxrlab.audit: planted leaks, near copies, label conflicts and broken files are all found."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxrlab.audit import DEFAULT_NEAR_THRESHOLD, audit, fast_leak_check, format_summary, near_pairs

pytest.importorskip("imagehash")


@dataclass(frozen=True)
class Sample:  # the interface of cxrlab.data.dataset.Sample; kept local so these tests stand alone
    path: Path
    label: str
    split: str
    group: str | None = None
    source: str | None = None


def tiny_scan(root: Path) -> list[Sample]:
    return [Sample(p, p.parent.name, p.parent.parent.name) for p in sorted(root.glob("*/*/*")) if p.is_file()]


def smooth_noise(seed: int, size: int = 64) -> Image.Image:
    """Random structure at 8x8 scale, smoothly upsampled: distinct pHashes, stable under resizing."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def make_clean(root: Path, layout=(("train", "A", 4), ("train", "B", 3), ("val", "A", 1), ("val", "B", 1),
                                   ("test", "A", 2), ("test", "B", 1))) -> Path:
    seed = 0
    for split, label, n in layout:
        (root / split / label).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            smooth_noise(seed).save(root / split / label / f"img{seed}.png")
            seed += 1
    return root


@pytest.fixture()
def planted(tmp_path) -> Path:
    root = make_clean(tmp_path / "data")
    shutil.copy(root / "train/A/img0.png", root / "test/A/copy.png")  # exact cross-split leak
    buf = io.BytesIO()
    Image.open(root / "train/A/img1.png").resize((96, 96), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=70)
    (root / "val/A/reencoded.jpg").write_bytes(buf.getvalue())  # near cross-split leak
    shutil.copy(root / "train/A/img2.png", root / "train/B/conflict.png")  # same image, two labels
    (root / "train/B/broken.png").write_text("not an image\n")
    return root


def _names(cluster: dict) -> set[str]:
    return {Path(f["path"]).name for f in cluster["files"]}


def test_audit_finds_planted_problems(planted):
    report = audit(tiny_scan(planted), workers=1)
    json.dumps(report)  # serialisable
    assert report["counts"] == {"test": {"A": 3, "B": 1}, "train": {"A": 4, "B": 5}, "val": {"A": 2, "B": 1}}
    assert report["imbalance"]["test"]["ratio"] == 3.0
    assert [(Path(u["path"]).name, "text" in u["reason"]) for u in report["unreadable"]] == [("broken.png", True)]

    cross = {frozenset(_names(c)): c for c in report["cross_split"]}
    exact = cross[frozenset({"img0.png", "copy.png"})]
    assert exact["kind"] == "exact" and exact["splits"] == ["test", "train"]
    near = cross[frozenset({"img1.png", "reencoded.jpg"})]
    assert near["kind"] == "near" and near["distance"] <= DEFAULT_NEAR_THRESHOLD and near["splits"] == ["train", "val"]
    assert {(p["a"], p["b"]) for p in report["leakage"]} == {
        (str(planted / "train/A/img0.png"), str(planted / "test/A/copy.png")),
        (str(planted / "train/A/img1.png"), str(planted / "val/A/reencoded.jpg"))}

    [conflict] = report["label_conflicts"]
    assert _names(conflict) == {"img2.png", "conflict.png"} and conflict["labels"] == ["A", "B"]
    assert len(report["exact_duplicates"]) == 2 and len(report["near_duplicates"]) == 1
    assert set(report["intensity"]["label"]) == {"A", "B"} and report["intensity"]["folder"]
    summary = "\n".join(format_summary(report))
    assert "copy.png" in summary and "broken.png" in summary


def test_clean_set_has_no_findings(tmp_path):
    samples = tiny_scan(make_clean(tmp_path))
    report = audit(samples, workers=1)
    for key in ("unreadable", "exact_duplicates", "near_duplicates", "cross_split", "label_conflicts", "leakage"):
        assert report[key] == [], key
    assert fast_leak_check(samples) == []


def test_fast_leak_check_finds_exact_copy_only(planted):
    pairs = fast_leak_check(tiny_scan(planted))
    assert pairs == [{"a": str(planted / "train/A/img0.png"), "a_split": "train",
                      "b": str(planted / "test/A/copy.png"), "b_split": "test", "kind": "exact"}]


def test_shortcut_hint_for_brightness_by_class(tmp_path):
    for k in range(4):
        for label, offset in (("A", 0), ("B", 120)):
            (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
            arr = np.asarray(smooth_noise(10 + k * 2 + (label == "B")), dtype=np.float32) * 0.5 + offset
            Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "train" / label / f"{k}.png")
    hints = audit(tiny_scan(tmp_path), workers=1)["shortcut_hints"]
    assert any(h.startswith("mean differs between classes") for h in hints)


def test_shortcut_hint_for_sharpness_by_class(tmp_path):
    """Same content and exposure; one class scaled down from large originals, the other up from small ones."""
    for k in range(6):
        grain = np.random.default_rng(k).normal(0, 20, (512, 512))  # fine texture only a large original keeps
        big = Image.fromarray(np.clip(np.asarray(smooth_noise(30 + k, size=512), np.float32) * 0.6 + 50 + grain, 0, 255)
                              .astype(np.uint8))
        for label, src in (("A", 512), ("B", 40)):
            (tmp_path / "train" / label).mkdir(parents=True, exist_ok=True)
            big.resize((src, src), Image.Resampling.BOX).resize((224, 224), Image.Resampling.BICUBIC) \
                .save(tmp_path / "train" / label / f"{k}.png")
    report = audit(tiny_scan(tmp_path), workers=1)
    by_label = report["intensity"]["label"]
    assert by_label["A"]["sharpness"] > 1.5 * by_label["B"]["sharpness"]
    assert abs(by_label["A"]["mean"] - by_label["B"]["mean"]) < 3
    hints = report["shortcut_hints"]
    assert any(h.startswith("sharpness differs between classes: A") and "--aug-blur" in h for h in hints), hints
    assert not any(h.startswith("mean differs") for h in hints)


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, (40, 3)).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips[:, 0] ^ flips[:, 1] ^ flips[:, 2]])
    i, j, d = near_pairs(hashes, 6, block=7)
    brute = {(a, b) for a in range(80) for b in range(a + 1, 80) if bin(int(hashes[a] ^ hashes[b])).count("1") <= 6}
    assert set(zip(i.tolist(), j.tolist())) == brute and len(brute) >= 40
    assert (d <= 6).all()


def test_cli_audit(planted, tmp_path, capsys):
    from cxrlab.cli import main

    out = tmp_path / "audit.json"
    assert main(["audit", "--data", str(planted), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    report = json.loads(out.read_text())
    assert any(_names(c) == {"img0.png", "copy.png"} for c in report["cross_split"])
    assert "duplicates ACROSS splits (leakage): 2" in capsys.readouterr().out
    assert main(["audit", "--data", str(tmp_path / "nope"), "--out", str(out), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _on_base(base: np.ndarray, seed: int, sd: float = 40) -> Image.Image:
    """`base` plus fine noise of its own: the same low-frequency layout (as chest films share), another image."""
    noise = np.random.default_rng(seed).normal(0, sd, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_same_layout_is_not_a_duplicate_but_photometric_copies_are(tmp_path):
    """Two images that share only their coarse layout have the same pHash (distance 0 here, as different patients'
    radiographs measure 2-6) and are not reported; copies with another gamma or histogram equalisation are."""
    base = np.asarray(smooth_noise(0, 128), dtype=np.float32)
    a, b = _on_base(base, 1), _on_base(base, 2)
    (tmp_path / "train" / "A").mkdir(parents=True)
    (tmp_path / "test" / "B").mkdir(parents=True)
    a.save(tmp_path / "train" / "A" / "a.png")
    b.save(tmp_path / "test" / "B" / "other_patient.png")
    report = audit(tiny_scan(tmp_path), workers=1)
    assert report["near_duplicates"] == [] and report["label_conflicts"] == [] and report["leakage"] == []
    pairs = audit(tiny_scan(tmp_path), workers=1, near_correlation=0)["near_duplicates"]
    assert len(pairs) == 1 and pairs[0]["distance"] <= 2  # what the pHash alone would have reported

    a.point(lambda v: int(255 * (v / 255) ** 0.6)).save(tmp_path / "test" / "B" / "gamma.png")
    ImageOps.equalize(a).save(tmp_path / "test" / "B" / "equalised.png")
    report = audit(tiny_scan(tmp_path), workers=1)
    [cluster] = report["near_duplicates"]
    assert _names(cluster) == {"a.png", "gamma.png", "equalised.png"}
    assert report["settings"]["near_correlation"] == 0.99 and len(report["leakage"]) == 2
