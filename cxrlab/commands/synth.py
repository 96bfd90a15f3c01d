"""`cxrlab synth`: write a synthetic chest-radiograph phantom data set (see cxrlab.data.synth)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cxrlab synth`.

    Args:
        parser: the subcommand parser to fill.
    """
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: DIR/{train,val,test}/<CLASS>/*.png, DIR/masks/, DIR/manifest.csv")
    parser.add_argument("--per-class", type=int, default=200, metavar="N",
                        help="total images per class, split 70/15/15 train/val/test (default: 200)")
    parser.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels (default: 128)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed; same seed, same bytes (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty DIR that is not a previous synth output (replaces its split "
                             "folders, masks/ and manifest.csv; other files are kept)")


def run(args: argparse.Namespace) -> int:
    """Generate the data set and log where it went and how many images per split and class.

    Args:
        args: parsed options from `add_arguments`.

    Returns:
        Exit code 0.
    """
    from cxrlab.data.synth import check_settings, generate
    from cxrlab.outputs import check_output_dir

    check_settings(args.per_class, args.size, args.seed)  # before --out is created
    check_output_dir(args.out)
    counts = generate(args.out, per_class=args.per_class, size=args.size, seed=args.seed, overwrite=args.overwrite)
    total = sum(sum(c.values()) for c in counts.values())
    log.info("wrote %d phantom images (%dx%d px, seed %d) to %s", total, args.size, args.size, args.seed, args.out)
    for split, per_class in counts.items():
        log.info("  %-5s %s", split, ", ".join(f"{name} {n}" for name, n in per_class.items()))
    return 0
