"""Decode and resize each image once: a persistent cache of uint8 arrays at the training size.

Entries are keyed by the file's content (BLAKE2 hash of its bytes) and the preprocessing settings,
so a changed file or a changed setting is a different key: nothing stale is ever read back, and
every epoch, run and split carving reuses the same decoded pixels. Unreadable files are cached
as their error message, so a bad file is reported (not re-decoded) on later runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from cxrlab.data.preprocess import Preprocess, load_array
from cxrlab.errors import CxrlabError, ImageReadError

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$CXRLAB_CACHE`, else `$XDG_CACHE_HOME/cxrlab`, else `~/.cache/cxrlab`."""
    if os.environ.get("CXRLAB_CACHE"):
        return Path(os.environ["CXRLAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrlab"


def settings_key(pre: Preprocess) -> str:
    """Short hash of the preprocessing settings."""
    return hashlib.sha1(json.dumps(pre.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _entry(cache: Path | None, data: bytes) -> Path | None:
    if cache is None:
        return None
    h = hashlib.blake2b(data, digest_size=16).hexdigest()
    return cache / h[:2] / h


def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _load_one(args: tuple[str, Preprocess, str | None]) -> np.ndarray | str:
    """Worker: return the uint8 array of one file, or its error message."""
    path, pre, cache = args
    n = pre.img_size * pre.img_size
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return "file not found"  # as read_gray and predict word it
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    entry = _entry(Path(cache) if cache else None, data)
    if entry is not None:
        if entry.with_suffix(".u8").is_file():
            arr = np.fromfile(entry.with_suffix(".u8"), dtype=np.uint8)
            if arr.size == n:
                return arr.reshape(pre.img_size, pre.img_size)
        if entry.with_suffix(".err").is_file():
            return entry.with_suffix(".err").read_text()
    try:
        arr = load_array(path, pre)
    except ImageReadError as exc:
        if entry is not None:
            _write_atomic(entry.with_suffix(".err"), exc.reason.encode())
        return exc.reason
    if entry is not None:
        _write_atomic(entry.with_suffix(".u8"), np.ascontiguousarray(arr).tobytes())
    return arr


def load_arrays(paths: list, pre: Preprocess, *, cache_dir: Path | None | bool = None, workers: int = 0,
                progress: bool = False, desc: str = "decode") -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Decode (or read from the cache) many images into one uint8 array.

    Args:
        paths: image files.
        pre: preprocessing preset.
        cache_dir: cache root (None: the default one; False: no cache).
        workers: decoding processes (0: in this process).
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        (arrays of shape (n_ok, S, S), indices into `paths` of the readable files,
        {path: reason} for the unreadable ones).
    """
    cache = None if cache_dir is False else Path(cache_dir or default_cache_dir()) / settings_key(pre)
    jobs = [(str(p), pre, str(cache) if cache else None) for p in paths]
    results = _run_jobs(jobs, workers, progress, desc)
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    errors = {str(paths[i]): r for i, r in enumerate(results) if isinstance(r, str)}
    out = np.empty((len(ok), pre.img_size, pre.img_size), dtype=np.uint8)
    for j, i in enumerate(ok):
        out[j] = results[i]
    return out, ok, errors


def _run_jobs(jobs: list, workers: int, progress: bool, desc: str) -> list:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc=desc, disable=None if (progress and len(jobs) >= 200) else True, leave=False, unit="img")
    try:
        if workers <= 1 or len(jobs) < 64:
            results = []
            for j in jobs:
                results.append(_load_one(j))
                bar.update()
            return results
        with ProcessPoolExecutor(workers) as pool:
            results = []
            for r in pool.map(_load_one, jobs, chunksize=32):
                results.append(r)
                bar.update()
            return results
    except OSError as exc:
        raise CxrlabError(f"cannot use the image cache ({exc}); pass --no-cache or set CXRLAB_CACHE to a writable folder") from exc
    finally:
        bar.close()
