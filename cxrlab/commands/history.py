"""`cxrlab history`: list recent predictions from the service's SQLite log."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-db", default=None, help="SQLite prediction log (default ./cxrlab_predictions.sqlite)")
    p.add_argument("--limit", type=int, default=20, help="newest entries to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import json

    from cxrlab.errors import CxrlabError
    from cxrlab.serve.predlog import DEFAULT_LOG_DB, open_existing

    if args.limit < 1:
        raise CxrlabError(f"--limit must be at least 1, got {args.limit}")
    plog = open_existing(args.log_db or DEFAULT_LOG_DB)
    rows = plog.recent(args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no predictions logged in {plog.path}")
        return 0
    print(f"{'time (UTC)':<29} {'endpoint':<8} {'sha256':<12} {'model':<28} {'predicted':<14} p")
    for r in rows:
        p = r["probabilities"].get(r["predicted"], float("nan"))
        print(f"{r['time']:<29} {r['endpoint']:<8} {r['sha256'][:12]:<12} {r['model'][:28]:<28} {r['predicted'][:14]:<14} {p:.3f}")
    print(f"({len(rows)} of {plog.count()} entries in {plog.path})")
    return 0
