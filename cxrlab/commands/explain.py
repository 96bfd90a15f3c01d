"""`cxrlab explain`: Grad-CAM heatmaps for images, or score them against lesion masks (pointing game)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam", "ablationcam")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cxrlab explain`."""
    p.add_argument("inputs", nargs="*", metavar="PATH", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint (.pt); ONNX files cannot be explained")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: explain/ beside the checkpoint, where the run report finds it)")
    p.add_argument("--target", metavar="CLASS", help="class to explain (default: each image's predicted class)")
    p.add_argument("--method", default="gradcam", choices=METHOD_NAMES, help="CAM method (default: gradcam)")
    p.add_argument("--save-raw", action="store_true", help="also write <stem>_cam.npy (float32 heatmap in [0, 1])")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    score = p.add_argument_group("faithfulness (pointing game against lesion masks)")
    score.add_argument("--score", action="store_true",
                       help="score the CAM of the true class of every masked image of --split; writes faithfulness.json")
    score.add_argument("--data", metavar="DIR", help="data folder DIR/<split>/<CLASS>/*.png (e.g. from cxrlab synth)")
    score.add_argument("--masks", metavar="DIR", help="mask folder DIR/<split>/<CLASS>/<stem>.png (default: DATA/masks)")
    score.add_argument("--split", default="test", help="split to score (default: test)")
    score.add_argument("--tolerance", type=int, default=None, metavar="PX",
                       help="pointing-game tolerance in pixels (default: 15/224 of the input size, as in Zhang et al. 2016)")


def _check(args) -> None:
    from cxrlab.errors import CxrlabError

    if args.score:
        if not args.data:
            raise CxrlabError("--score needs --data DIR (a folder with DIR/<split>/<CLASS>/ images and lesion masks)")
        if args.inputs or args.target:
            raise CxrlabError("--score explains the true class of the --data images; drop the PATH arguments and --target")
    elif not args.inputs:
        raise CxrlabError("give image files or folders to explain, or --score --data DIR to score against masks")


def run(args) -> int:
    """Explain images (exit 0 when at least one succeeded) or score faithfulness."""
    from cxrlab.inference import load_model_bundle

    _check(args)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "explain"
    bundle = load_model_bundle(args.checkpoint, device=args.device)
    if args.score:
        return _score(args, bundle, out)
    from cxrlab.explain import explain_paths

    written, errors = explain_paths(bundle, args.inputs, out, target=args.target, method=args.method,
                                    save_raw=args.save_raw)
    print(f"{len(written)} image(s) explained with {args.method}, {len(errors)} failed -> {out}/<stem>_cam.png"
          + (" and <stem>_cam.npy" if args.save_raw else ""))
    return 0 if written else 1


def _score(args, bundle, out: Path) -> int:
    from cxrlab.faithfulness import score_faithfulness

    res = score_faithfulness(bundle, args.data, args.masks, split=args.split, method=args.method, out=out,
                             tolerance_px=args.tolerance)
    print(f"{res['method']} on {res['n']} masked {res['split']} image(s): pointing game {res['pointing_game']:.3f}, "
          f"energy in mask {res['energy_in_mask']:.3f} (tolerance {res['tolerance_px']} px)")
    for cls, s in res["per_class"].items():
        print(f"  {cls:<14} n={s['n']:<4} pointing game {s['pointing_game']:.3f}  energy in mask {s['energy_in_mask']:.3f}")
    print(f"-> {out / 'faithfulness.json'} (and example overlays of hits and misses)")
    return 0
