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
    p.add_argument("--target", metavar="CLASS",
                   help="class to explain, any letter case (default: each image's predicted class)")
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
    reg = p.add_argument_group("where the model looks on real radiographs, without masks (with --data)")
    reg.add_argument("--regions", action="store_true",
                     help="Grad-CAM mass in the film's outer band and corners (markers, borders) for every --split image, "
                          "and the decisions with the band hidden and from the band alone; writes regions.json, "
                          "regions.csv and a montage per class (and group)")
    reg.add_argument("--manifest", metavar="CSV", help="manifest CSV with a source/group column (for --group-by)")
    reg.add_argument("--group-by", choices=("source", "group", "split", "folder"), help="also summarise per group")
    reg.add_argument("--frame", type=float, default=0.1, metavar="F",
                     help="width of the outer band, as a fraction of each side (default: 0.1, 36%% of the area)")
    reg.add_argument("--n", type=int, default=1000, help="at most N images, a seeded random subset (0: all; default 1000)")
    reg.add_argument("--seed", type=int, default=0, help="seed of the subset and the montages (default 0)")
    reg.add_argument("--examples", type=int, default=8, help="overlays per montage (default 8; 0: none)")


# the analyses of a labelled --data split: (what --data must hold, which class the heatmaps explain)
DATA_ANALYSES = {"score": ("a folder with DIR/<split>/<CLASS>/ images and lesion masks", "the true class"),
                 "regions": ("a labelled split: DIR/<split>/<CLASS>/ or a manifest", "the predicted class")}


def _check(args) -> None:
    from cxrlab.errors import CxrlabError

    if args.score and args.regions:
        raise CxrlabError("--score and --regions are two different analyses; run them one at a time")
    analysis = "score" if args.score else "regions" if args.regions else None
    if analysis:
        holds, explains = DATA_ANALYSES[analysis]
        if not args.data:
            raise CxrlabError(f"--{analysis} needs --data DIR ({holds})")
        if args.inputs or args.target:
            raise CxrlabError(f"--{analysis} explains {explains} of the --data images; drop the PATH arguments and --target")
    elif not args.inputs:
        raise CxrlabError("give image files or folders to explain, --score --data DIR to score against lesion masks, "
                          "or --regions --data DIR to see where the model looks")
    if args.regions:
        from cxrlab.regions import check_frame

        check_frame(args.frame)  # a clear error before the model loads
    elif args.group_by or args.manifest:
        raise CxrlabError("--manifest and --group-by go with --regions")


def run(args) -> int:
    """Explain images (exit 0 when at least one succeeded) or score faithfulness."""
    from cxrlab.checkpoint import check_checkpoint_file
    from cxrlab.inference import check_inputs, inference_device, load_model_bundle
    from cxrlab.outputs import check_output_dir

    _check(args)
    if args.inputs:
        check_inputs(args.inputs)
    check_checkpoint_file(args.checkpoint, "cxrlab explain (Grad-CAM)")
    inference_device(args.device)
    out = check_output_dir(Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "explain")
    bundle = load_model_bundle(args.checkpoint, device=args.device)
    if args.score:
        return _score(args, bundle, out)
    if args.regions:
        return _regions(args, bundle, out)
    from cxrlab.explain import INDEX_NAME, explain_paths

    written, errors = explain_paths(bundle, args.inputs, out, target=args.target, method=args.method,
                                    save_raw=args.save_raw)
    print(f"{len(written)} image(s) explained with {args.method}, {len(errors)} failed -> {out}/<stem>_cam.png"
          + (" and <stem>_cam.npy" if args.save_raw else "") + f"; source -> output in {out / INDEX_NAME}")
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


def _regions(args, bundle, out: Path) -> int:
    from cxrlab.regions import format_summary, look_regions

    res = look_regions(bundle, args.data, out, split=args.split, manifest=args.manifest, group_by=args.group_by,
                       n=args.n, seed=args.seed, frame=args.frame, method=args.method, examples=args.examples,
                       checkpoint_name=args.checkpoint)
    print(format_summary(res))
    print(f"-> {out / 'regions.json'}, regions.csv" + (f" and {len(res['montages'])} montage(s)" if res["montages"] else ""))
    return 0
