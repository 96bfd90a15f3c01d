"""`cxrlab demo`: the whole job on built-in data in a few minutes on a laptop CPU.

synth phantoms -> train a small CNN -> evaluate on the test split -> predict a few images ->
Grad-CAM overlays and the pointing-game score against the known lesion masks -> report.html.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_DEFAULTS = {"per_class": 300, "size": 96, "model": "small_cnn", "epochs": 30, "batch_size": 32, "lr": 3e-3}


def run_demo(out: str | Path = "demo_run", *, per_class: int = DEMO_DEFAULTS["per_class"], size: int = DEMO_DEFAULTS["size"],
             model: str = DEMO_DEFAULTS["model"], epochs: int = DEMO_DEFAULTS["epochs"], seed: int = 0,
             progress: bool = True) -> dict:
    """Run the demo pipeline end to end.

    Args:
        out: demo folder (data in `out/data`, run in `out/run`, predictions and CAMs beside).
        per_class: phantoms per class.
        size: image size in pixels.
        model: registered model to train.
        epochs: training epochs.
        seed: seed for data and training.
        progress: progress bars.

    Returns:
        Paths and headline numbers.
    """
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit, guard_run_folder

    t0, out = time.perf_counter(), Path(out)
    data = out / "data"
    generate(data, per_class=per_class, size=size, seed=seed, overwrite=True)
    log.info("[1/4] synthetic phantoms: %s", data)
    cfg = TrainConfig(data=str(data), out=str(out / "run"), model=model, img_size=size, epochs=epochs,
                      batch_size=DEMO_DEFAULTS["batch_size"], lr=DEMO_DEFAULTS["lr"], seed=seed, early_stop=0,
                      scheduler="cosine", cam_every=max(1, epochs // 3), cam_images=6, monitor="val_loss")
    guard_run_folder(out / "run", resume=False, overwrite=True)  # the demo's own folder: a rerun replaces it
    log.info("[2/4] training %s for %d epochs at %d px", model, epochs, size)
    result = fit(cfg, progress=progress)
    best = out / "run" / "best.pt"
    summary = {"data": str(data), "run_dir": cfg.out, "checkpoint": str(best), **result.get("test", {})}
    summary.update(_predict_some(best, data, out))
    summary.update(_explain_some(best, data, out))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _predict_some(best: Path, data: Path, out: Path) -> dict:
    from cxrlab.inference import load_model_bundle
    from cxrlab.predict import predict_paths, write_rows

    files = sorted((data / "test").rglob("*.png"))
    files = files[:: max(1, len(files) // 6)][:6]  # spread over the classes
    bundle = load_model_bundle(best)
    rows = predict_paths(bundle, [str(f) for f in files])
    write_rows(rows, str(out / "predictions_demo.csv"), bundle.class_names)
    log.info("[3/4] predicted %d test images -> %s", len(rows), out / "predictions_demo.csv")
    for r in rows:
        log.info("   %-40s -> %-13s p=%.3f", Path(r["path"]).name, r["predicted"], r["probabilities"][r["predicted"]])
    return {"predictions": str(out / "predictions_demo.csv")}


def _explain_some(best: Path, data: Path, out: Path) -> dict:
    try:
        from cxrlab.explain import score_faithfulness
    except ImportError:
        return {}
    res = score_faithfulness(best, data, data / "masks", split="test", out=out / "explain")
    log.info("[4/4] Grad-CAM on abnormal test phantoms: pointing game %.2f, energy in lesion %.2f -> %s",
             res["pointing_game"], res["energy_in_mask"], out / "explain")
    return {"pointing_game": res["pointing_game"], "energy_in_mask": res["energy_in_mask"]}
