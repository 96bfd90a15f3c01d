"""How much each preprocessing preset leaves of the sharpness shortcut and of the train/test shift.

For a data folder with train/ and test/ splits of two classes, decodes a sample of each split and class
with every preset (none, histogram equalisation, CLAHE at a few clip limits), computes `cxrlab audit`'s
sharpness statistic on the arrays the model would see, and reports AUCs: how well sharpness alone tells
the classes apart in train and in test, and how well it tells the first class's training images from its
test images (0.5: no shift). Lower is better on all three. No training; about 20 s for 400 images per group.

    python bench/preprocess_shift.py --data ../shared/data/pneumonia --per-group 400 --json shift.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import image_files, machine_info  # noqa: E402

PRESETS = {"none": {}, "equalize": {"equalize": True}, "clahe2": {"clahe": 2.0}, "clahe4": {"clahe": 4.0}}


def _auc(pos, neg) -> float:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from cxrlab.audit import sharpness
    from cxrlab.data.preprocess import Preprocess, load_array

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder with train/<CLASS>/ and test/<CLASS>/ (two classes)")
    p.add_argument("--per-group", type=int, default=400, help="images sampled per split and class")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    root = Path(a.data)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if len(classes) != 2 or not (root / "test").is_dir():
        raise SystemExit(f"{root}: expected train/ and test/ with two class folders each, found {classes}")
    rng = np.random.default_rng(0)
    groups = {}
    for split in ("train", "test"):
        for c in classes:
            files = image_files(root / split / c)
            groups[(split, c)] = [files[i] for i in sorted(rng.choice(len(files), min(a.per_group, len(files)),
                                                                      replace=False))]
    a_cls, b_cls = classes  # e.g. NORMAL, PNEUMONIA: the first class is expected to be the sharper one
    results = {}
    for name, kw in PRESETS.items():
        pre = Preprocess(img_size=a.img_size, **kw)
        s = {k: np.array([sharpness(load_array(f, pre)) for f in v]) for k, v in groups.items()}
        results[name] = {
            "classes_train_auc": _auc(s[("train", a_cls)], s[("train", b_cls)]),
            "classes_test_auc": _auc(s[("test", a_cls)], s[("test", b_cls)]),
            f"{a_cls}_train_vs_test_auc": _auc(s[("train", a_cls)], s[("test", a_cls)]),
        }
        r = results[name]
        print(f"{name:9s} sharpness {a_cls} vs {b_cls}: train {r['classes_train_auc']:.3f} test "
              f"{r['classes_test_auc']:.3f} | {a_cls} train vs test {r[f'{a_cls}_train_vs_test_auc']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"data": str(root), "per_group": a.per_group, "img_size": a.img_size,
                                            "presets": PRESETS, "results": results, "machine": machine_info()},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
