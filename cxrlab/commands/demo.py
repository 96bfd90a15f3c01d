"""`cxrlab demo`: synth -> train -> evaluate -> predict -> explain on built-in phantoms."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from cxrlab.demo import DEMO_DEFAULTS

    p.add_argument("--out", default="demo_run", help="demo folder (default: ./demo_run)")
    p.add_argument("--per-class", type=int, default=DEMO_DEFAULTS["per_class"], help="phantoms per class")
    p.add_argument("--size", type=int, default=DEMO_DEFAULTS["size"], help="image size in pixels")
    p.add_argument("--model", default=DEMO_DEFAULTS["model"], help="model to train")
    p.add_argument("--epochs", type=int, default=DEMO_DEFAULTS["epochs"], help="training epochs")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from cxrlab.demo import run_demo
    from cxrlab.outputs import check_output_dir

    check_output_dir(args.out)
    s = run_demo(args.out, per_class=args.per_class, size=args.size, model=args.model, epochs=args.epochs,
                 seed=args.seed, progress=not args.quiet)
    print(f"\ncxrlab demo finished in {s['seconds']:.0f} s")
    if "accuracy" in s:
        print(f"  test accuracy {s['accuracy']:.3f}, macro-F1 {s['macro_f1']:.3f}, AUC {s['auc_macro']:.3f} (n={s['n']})")
    if "pointing_game" in s:
        print(f"  Grad-CAM pointing game on abnormal test images: {s['pointing_game']:.2f}")
    print(f"  data:        {s['data']}")
    print(f"  run folder:  {s['run_dir']}  (open report.html)")
    print(f"  checkpoint:  {s['checkpoint']}")
    print(f"  predictions: {s['predictions']}")
    print("next: cxrlab predict --checkpoint {0} IMAGE...   cxrlab serve --checkpoint {0}".format(s["checkpoint"]))
    return 0
