"""The parts the fast pipeline rests on: the decode cache, batched augmentation, and one preprocessing
path shared by training and prediction. Functional checks only (timing lives in bench/throughput.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.data.augment import AugmentConfig, augment_batch
from cxrlab.data.cache import load_arrays, settings_key
from cxrlab.data.preprocess import Preprocess, load_array, prepare_array
from cxrlab.engine import InputSpec
from cxrlab.inference import ModelBundle

PRE = Preprocess(img_size=32)
OFF = AugmentConfig(flip=0.0, rotation=0.0, translate=0.0, crop_scale_min=1.0, brightness=0.0, contrast=0.0)


def write_images(folder: Path, n: int = 4, size: int = 48) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 8 * i), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def cache_entries(root: Path, suffix: str) -> list[Path]:
    return sorted(root.rglob(f"*{suffix}"))


def test_cache_round_trip_hits_the_cache(tmp_path):
    paths = write_images(tmp_path)
    cache = tmp_path / "cache"
    a1, ok1, err1 = load_arrays(paths, PRE, cache_dir=cache)
    entries = cache_entries(cache / settings_key(PRE), ".u8")
    assert len(entries) == len(paths) and not err1 and ok1 == list(range(len(paths)))
    mtimes = [e.stat().st_mtime_ns for e in entries]
    a2, ok2, _ = load_arrays(paths, PRE, cache_dir=cache)
    assert a1.dtype == np.uint8 and a1.shape == (len(paths), 32, 32)
    np.testing.assert_array_equal(a1, a2)
    assert ok2 == ok1 and [e.stat().st_mtime_ns for e in entries] == mtimes  # read back, not rewritten
    np.testing.assert_array_equal(a1[0], load_array(paths[0], PRE))  # same as decoding without a cache


def test_cache_served_entry_is_what_is_returned(tmp_path):
    """A second run reads the stored entry: tampering with it shows up in the result."""
    paths = write_images(tmp_path, n=1)
    cache = tmp_path / "cache"
    load_arrays(paths, PRE, cache_dir=cache)
    (entry,) = cache_entries(cache, ".u8")
    entry.write_bytes(np.full(32 * 32, 7, np.uint8).tobytes())
    arrays, _, _ = load_arrays(paths, PRE, cache_dir=cache)
    assert (arrays[0] == 7).all()


def test_changed_file_is_redecoded(tmp_path):
    paths = write_images(tmp_path, n=1)
    cache = tmp_path / "cache"
    before, _, _ = load_arrays(paths, PRE, cache_dir=cache)
    Image.fromarray(np.full((48, 48), 200, np.uint8)).save(paths[0])
    after, _, _ = load_arrays(paths, PRE, cache_dir=cache)
    assert (after[0] == 200).all() and not np.array_equal(before, after)
    assert len(cache_entries(cache, ".u8")) == 2  # a new content key, the old entry untouched


def test_changed_settings_use_another_entry(tmp_path):
    paths = write_images(tmp_path, n=2)
    cache = tmp_path / "cache"
    other = Preprocess(img_size=32, equalize=True)
    assert settings_key(other) != settings_key(PRE)
    a, _, _ = load_arrays(paths, PRE, cache_dir=cache)
    b, _, _ = load_arrays(paths, other, cache_dir=cache)
    assert len(cache_entries(cache / settings_key(PRE), ".u8")) == 2
    assert len(cache_entries(cache / settings_key(other), ".u8")) == 2
    np.testing.assert_array_equal(b[0], load_array(paths[0], other))
    assert not np.array_equal(a, b)


def test_unreadable_file_reported_and_error_cached(tmp_path):
    paths = write_images(tmp_path, n=2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    cache = tmp_path / "cache"
    arrays, ok, errors = load_arrays([paths[0], bad, paths[1]], PRE, cache_dir=cache)
    assert ok == [0, 2] and arrays.shape[0] == 2 and list(errors) == [str(bad)] and errors[str(bad)]
    (err_entry,) = cache_entries(cache, ".err")
    assert err_entry.read_text() == errors[str(bad)]
    _, ok2, errors2 = load_arrays([paths[0], bad, paths[1]], PRE, cache_dir=cache)
    assert ok2 == ok and errors2 == errors


def test_no_cache_writes_nothing(tmp_path):
    paths = write_images(tmp_path, n=2)
    arrays, ok, _ = load_arrays(paths, PRE, cache_dir=False)
    assert ok == [0, 1] and not list(tmp_path.rglob("*.u8"))
    np.testing.assert_array_equal(arrays[1], load_array(paths[1], PRE))


@pytest.mark.parametrize("shape", [(5, 40, 40), (5, 1, 40, 40)])
def test_augment_batch_deterministic_and_preserves_shape(shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    cfg = AugmentConfig(gamma=0.3, noise=0.02)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(3))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.shape == (5, 1, 40, 40) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 255.0


def test_augment_batch_with_zero_strengths_is_identity():
    x = torch.randint(0, 256, (4, 36, 36), dtype=torch.uint8)
    out = augment_batch(x, OFF, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x.float().unsqueeze(1), rtol=0, atol=1e-3)


class MeanModel(torch.nn.Module):
    """Logits = per-channel means: enough to tell different inputs apart."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _local_std(a: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> float:
    return float(a[y0:y1, x0:x1].astype(np.float64).std())


def test_clahe_raises_local_contrast_within_its_clip_limit():
    """A faint texture (+-4 grey levels) in a dark corner of a bright film: CLAHE stretches it, more with a
    higher clip limit, but the limit bounds the stretch; global equalisation, one curve for the whole image,
    spreads that narrow histogram (noise included) over half the grey scale."""
    rng = np.random.default_rng(0)
    img = np.full((256, 256), 200, np.uint8)
    img[:128, :128] = 40 + rng.integers(-4, 5, (128, 128))
    img[128:, 128:] = 200 + rng.integers(-20, 21, (128, 128))
    corner = (8, 120, 8, 120)  # inside the textured quarter, away from its edges
    base = _local_std(img, *corner)
    stds = {c: _local_std(prepare_array(img, Preprocess(img_size=256, clahe=c)), *corner) for c in (1.0, 2.0, 4.0)}
    hist = _local_std(prepare_array(img, Preprocess(img_size=256, equalize=True)), *corner)
    assert base < stds[1.0] < stds[2.0] < stds[4.0]
    assert stds[4.0] < hist
    # the bright quarter keeps its order of grey levels: CLAHE maps monotonically within each tile
    out = prepare_array(img, Preprocess(img_size=256, clahe=2.0))
    assert np.corrcoef(out[136:248, 136:248].ravel(), img[136:248, 136:248].ravel())[0, 1] > 0.95


def test_clahe_preset_round_trips_and_leaves_other_cache_keys_alone():
    import hashlib
    import json

    pre = Preprocess(img_size=64, clahe=2.5, crop_border=0.05)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert settings_key(pre) != settings_key(Preprocess(img_size=64, clahe=3.0, crop_border=0.05))
    # presets without CLAHE hash exactly as before the option existed, so their caches stay valid
    old = {"img_size": 32, "equalize": False, "crop_border": 0.0, "version": 1}
    assert settings_key(PRE) == hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert Preprocess.from_dict(old) == PRE  # checkpoints written before it load with CLAHE off
    assert pre.same_pixels_at(Preprocess(img_size=128, clahe=2.5, crop_border=0.05))
    assert not pre.same_pixels_at(Preprocess(img_size=64, crop_border=0.05))


def test_clahe_and_equalize_together_are_refused():
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError

    with pytest.raises(CxrlabError, match="--equalize and --clahe both equalise contrast.*choose one"):
        TrainConfig(data="x", equalize=True, clahe=2.0).validate()
    with pytest.raises(CxrlabError, match="--clahe is a clip limit"):
        TrainConfig(data="x", clahe=-1.0).validate()


@pytest.mark.parametrize("pre", [Preprocess(img_size=32, equalize=True, crop_border=0.05),
                                 Preprocess(img_size=32, clahe=2.0, crop_border=0.05)], ids=["equalize", "clahe"])
def test_train_and_predict_see_identical_preprocessing(tmp_path, pre):
    paths = write_images(tmp_path, n=3, size=60)
    spec = InputSpec([0.5], [0.25], 1)
    bundle = ModelBundle({"class_names": ["A"]}, MeanModel(), pre, spec, torch.device("cpu"))
    seen = []
    original = bundle.logits_for_arrays
    bundle.logits_for_arrays = lambda images, **kw: (seen.append(np.asarray(images).copy()), original(images, **kw))[1]
    logits, ok, errors = bundle.logits_for_files(paths, cache=False)
    train_arrays, train_ok, _ = load_arrays(paths, pre, cache_dir=tmp_path / "cache")
    assert ok == train_ok and not errors
    assert seen[0].dtype == np.uint8
    np.testing.assert_array_equal(seen[0], train_arrays)
    np.testing.assert_allclose(logits, original(train_arrays), rtol=0, atol=0)


def test_a_missing_file_is_worded_as_everywhere_else(tmp_path):
    paths = write_images(tmp_path, n=2) + [tmp_path / "gone.png"]
    arrays, ok, errors = load_arrays(paths, PRE, cache_dir=False)
    assert ok == [0, 1] and len(arrays) == 2
    assert errors == {str(tmp_path / "gone.png"): "file not found"}
