"""Output paths of the commands, checked before any work so that a bad --out costs nothing.

Every command that writes calls `check_output_dir` (a folder of results) or `check_output_file` (one
file) first: missing parent folders are created, and a path that cannot be written fails with a
`CxrlabError` naming it and the option to change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cxrlab.errors import CxrlabError

RUN_FILES = ("best.pt", "last.pt", "history.csv", "members.json")  # what shows a `cxrlab train` run in a folder


def check_output_dir(path: str | Path, option: str = "--out", need_bytes: int = 0) -> Path:
    """Create the folder `path` (with its parents) and check that files can be written in it.

    Args:
        path: the output folder.
        option: the command-line option that named it, for the message.
        need_bytes: free space the work needs there (0: do not check).

    Returns:
        The folder as a Path.
    """
    path = Path(path)
    _writable_folder(path, path, option)
    if need_bytes:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise CxrlabError(f"only {free / 1e6:.0f} MB free in '{path}', this needs about {need_bytes / 1e6:.0f} MB; "
                              f"free space or choose another {option}")
    return path


def check_output_file(path: str | Path, option: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Check that the file `path` can be written (creating its folder), before the work that produces it.

    Args:
        path: the file to write (it may exist; it is replaced).
        option: the command-line option that named it.
        suffixes: allowed endings, e.g. (".csv", ".json"); empty: any.

    Returns:
        The file as a Path.
    """
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes[0] if suffixes else ""))
        raise CxrlabError(f"{option} '{path}' is a folder; give a file name inside it, e.g. {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise CxrlabError(f"{option} must end in {' or '.join(suffixes)}, got '{path}'")
    _writable_folder(path.parent, path, option)
    if path.exists() and not os.access(path, os.W_OK):
        raise CxrlabError(f"cannot write {option} '{path}': the file is read-only. Choose another {option}")
    return path


def check_new_checkpoint(path: str | Path, inputs: tuple = (), what: str = "the new checkpoint",
                         option: str = "--out") -> Path:
    """Check the file a command writes a derived checkpoint to (calibrate, adapt, ensemble) before any work.

    It must end in .pt (what predict, evaluate and serve load as a PyTorch checkpoint), must not be one of the
    command's own input checkpoints, and must not be a training run's best.pt / last.pt (replacing last.pt would
    also end `cxrlab train --resume`, whose state only the run's own last.pt holds).

    Args:
        path: the file to write.
        inputs: the checkpoints the command reads.
        what: what is written, for the message (e.g. "the calibrated copy").
        option: the command-line option that named it.

    Returns:
        The file as a Path.
    """
    path = check_output_file(path, option, suffixes=(".pt",))
    if path.exists():
        for src in inputs:
            if Path(src).exists() and path.resolve() == Path(src).resolve():
                raise CxrlabError(f"{option} '{path}' is a checkpoint this command reads; write {what} to a new file, "
                                  f"e.g. {path.with_name(path.stem + '_new.pt')}")
        if path.name in ("best.pt", "last.pt") and any((path.parent / n).is_file() for n in RUN_FILES if n != path.name):
            raise CxrlabError(f"{option} '{path}' is the {path.name} of the training run in '{path.parent}'; writing "
                              f"{what} there would replace the run's own checkpoint. Choose a new file, e.g. "
                              f"{path.parent / ('derived_' + path.name)}")
    return path


def check_not_run_folder(path: str | Path, option: str = "--out", instead: str = "eval") -> None:
    """Refuse an output folder that is a training run folder, whose own files the output would replace."""
    path = Path(path)
    held = [name for name in RUN_FILES if (path / name).is_file()]
    if held:
        raise CxrlabError(f"{option} '{path}' is a training run folder (it holds {', '.join(held)}); writing there would "
                          f"replace the run's own metrics.json, predictions.csv and report. Choose another {option}, "
                          f"e.g. {path / instead}")


def _writable_folder(folder: Path, path: Path, option: str) -> None:
    """Create `folder` and write a probe file in it; `path` is what the user gave, for the message."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CxrlabError(f"cannot write {option} '{path}': '{blocker}' is a file, not a folder. Choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".cxrlab-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise CxrlabError(f"cannot write {option} '{path}': the folder '{folder}' is not writable "
                          f"({exc.strerror or exc}). Choose another {option}") from exc
