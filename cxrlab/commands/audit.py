"""`cxrlab audit --data DIR`: duplicates, leakage, label conflicts, unreadable files, shortcuts.

Exit code 0 even when there are findings (it is an audit); 2 for unusable input.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cxrlab audit`."""
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="data folder (ROOT/{train,val,test}/<CLASS>/* or ROOT/<CLASS>/*) or a CSV manifest")
    parser.add_argument("--manifest", default=None, metavar="CSV", help="CSV manifest path,label[,split][,group][,source]")
    parser.add_argument("--out", default="audit.json", metavar="JSON", help="full report (default: audit.json)")
    parser.add_argument("--near-threshold", type=int, default=None, metavar="N",
                        help="largest pHash Hamming distance (0-64) that proposes a near duplicate (default: 8; -1 "
                             "disables the near-duplicate search)")
    parser.add_argument("--near-correlation", type=float, default=None, metavar="R",
                        help="smallest rank correlation of 32x32 thumbnails that confirms a proposed near duplicate "
                             "(default: 0.99; 0: the pHash alone decides, which on radiographs pairs different patients)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="decoding threads (default: up to 4)")


def run(args: argparse.Namespace) -> int:
    """Scan the data, audit it, print a summary and write the JSON report."""
    import json
    from pathlib import Path

    from cxrlab.audit import DEFAULT_NEAR_THRESHOLD, NEAR_MIN_CORRELATION, audit, format_summary
    from cxrlab.data.dataset import scan
    from cxrlab.errors import CxrlabError
    from cxrlab.outputs import check_output_file

    threshold = DEFAULT_NEAR_THRESHOLD if args.near_threshold is None else args.near_threshold
    if not -1 <= threshold <= 64:
        raise CxrlabError(f"--near-threshold {threshold}: use a Hamming distance between 0 and 64 (-1 disables)")
    correlation = NEAR_MIN_CORRELATION if args.near_correlation is None else args.near_correlation
    if not 0 <= correlation <= 1:
        raise CxrlabError(f"--near-correlation {correlation:g}: use a correlation between 0 and 1 (0: pHash only)")
    if args.manifest is None and not Path(args.data).exists():
        raise CxrlabError(f"--data '{args.data}' does not exist; pass the data folder or a CSV manifest")
    out = check_output_file(args.out)
    samples = scan(args.data, args.manifest)
    if not samples:
        raise CxrlabError(f"no images found under '{args.data}' (expected ROOT/train/<CLASS>/*.png, ROOT/<CLASS>/*.png "
                          "or a CSV manifest)")
    report = audit(samples, near_threshold=threshold, near_correlation=correlation, workers=args.workers,
                   progress=not args.quiet)
    report["data"] = str(args.data)
    out.write_text(json.dumps(report, indent=1))
    print("\n".join(format_summary(report)))
    print(f"full report: {out}")
    return 0
