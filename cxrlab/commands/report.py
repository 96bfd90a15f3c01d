"""`cxrlab report RUN_DIR`: redraw the plots and report.html of a run or evaluation folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cxrlab report`."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (cxrlab train --out) or evaluation folder (cxrlab evaluate --out)")
    parser.add_argument("--title", default=None, help="page title (default: 'cxrlab report: <folder name>')")


def run(args: argparse.Namespace) -> int:
    """Draw the plots the folder's files allow and write RUN_DIR/report.html."""
    from cxrlab.report import build_report

    path = build_report(args.run_dir, title=args.title)
    print(f"report: {path}")
    return 0
