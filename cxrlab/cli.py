"""Command line: `cxrlab <command> ...`. Each command lives in `cxrlab/commands/<name>.py`.

The CLI only parses arguments, sets up logging and turns `CxrlabError` into a clean message.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

COMMANDS = {
    "synth": "generate a synthetic chest-radiograph phantom data set",
    "demo": "synth -> train -> evaluate -> predict in a few minutes",
    "train": "train a classifier on a folder or manifest data set",
    "evaluate": "evaluate a checkpoint on a data split or folder",
    "predict": "predict classes for images and folders",
    "explain": "Grad-CAM heatmaps for images, scored against lesion masks or by region of the film",
    "report": "redraw the plots and report.html of a run or evaluation folder",
    "audit": "audit a data set: duplicates, leakage, unreadable files, shortcuts",
    "export": "export a checkpoint to ONNX and check parity",
    "calibrate": "re-fit a checkpoint's temperature and operating points on a labelled split",
    "adapt": "re-estimate BatchNorm statistics on a new site's unlabelled images",
    "stress": "stress-test a model under framing, exposure, blur and noise changes",
    "serve": "web service and page for a checkpoint",
    "history": "list recent predictions from the service log",
    "ensemble": "build a probability-averaging ensemble checkpoint",
    "compare": "train and evaluate several models, write a leaderboard",
    "doctor": "what this machine means for training speed: precision, allocator, threads, GPUs, packages; "
              "--measure times it",
}

_ALLOC_VARS = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
_HEAVY = {"train", "calibrate", "adapt", "stress", "evaluate", "predict", "explain", "export", "serve", "demo", "compare", "doctor"}


def _maybe_reexec_with_allocator(argv: list[str]) -> None:
    """Re-execute once with glibc malloc thresholds raised (see docs/PERFORMANCE.md).

    glibc returns PyTorch's large per-batch buffers to the kernel after every batch; raising the
    mmap/trim thresholds keeps them, which made CPU inference ~3x and training ~1.5x faster here.
    The variables only act at process start, hence the re-exec. Opt out: CXRLAB_NO_REEXEC=1.
    """
    if not sys.platform.startswith("linux") or os.environ.get("CXRLAB_NO_REEXEC"):
        return
    if not argv or argv[0] not in _HEAVY or all(k in os.environ for k in _ALLOC_VARS):
        return
    env = dict(os.environ, **{k: os.environ.get(k, v) for k, v in _ALLOC_VARS.items()})
    env["CXRLAB_NO_REEXEC"] = "1"
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "cxrlab", *argv], env)
    except OSError:  # cannot re-exec (odd launcher): run as we are
        return


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    from cxrlab import __version__

    parser = argparse.ArgumentParser(prog="cxrlab", description="Chest X-ray classifiers: train, evaluate, explain, serve.")
    parser.add_argument("--version", action="version", version=f"cxrlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"cxrlab.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cxrlab.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", help="show full tracebacks")
        p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
        p.set_defaults(_run=module.run)
    return parser


def setup_logging(quiet: bool = False, debug: bool = False) -> None:
    """Console logging for the CLI (the library itself never adds handlers)."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    root = logging.getLogger("cxrlab")
    root.handlers[:] = [handler]
    root.setLevel(min(level, logging.INFO))  # run-folder log files still get INFO under --quiet


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cxrlab` command. Returns the exit code."""
    if argv is None:  # a real command line (not a call from Python code, which must not be replaced)
        argv = sys.argv[1:]
        _maybe_reexec_with_allocator(argv)
    argv = list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    setup_logging(args.quiet, args.debug)
    created = _not_yet_there(args)
    rc = 1  # what an exception re-raised under --debug leaves
    try:
        rc = _dispatch(args)
        return rc
    finally:
        if rc != 0:
            _remove_empty(created)


def _dispatch(args) -> int:
    """Run the command; a CxrlabError is exit 2 with its message, anything else exit 1 (both raised with --debug)."""
    from cxrlab.errors import CxrlabError

    try:
        return int(args._run(args) or 0)
    except CxrlabError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence of the CLI
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 1


def _not_yet_there(args) -> list[Path]:
    """The output folders a command was given (--out, --output) that do not exist yet, with their missing parents
    (leaf first): a failed command removes those it created and left empty."""
    missing = []
    for key in ("out", "output"):
        value = getattr(args, key, None)
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        path = Path(value).absolute()
        while not path.exists() and path != path.parent:
            missing.append(path)
            path = path.parent
    return missing


def _remove_empty(paths: list[Path]) -> None:
    for path in paths:
        try:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        except OSError:
            pass
