"""After the last epoch: calibrate `best.pt` on validation, choose operating points, evaluate it on
the test split and draw the report (all from `best.pt`, so the run folder is self-consistent)."""

from __future__ import annotations

import logging

import numpy as np

from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)


def calibrate_checkpoint(ckpt: dict, val_logits: np.ndarray, val_y: np.ndarray, target_recall: dict[str, float],
                         calibrate: bool = True) -> dict:
    """Fit the temperature and the operating-point thresholds on validation, into the checkpoint.

    Args:
        ckpt: checkpoint dict (changed in place and returned).
        val_logits, val_y: validation logits and labels.
        target_recall: {CLASS: recall} to reach on validation, e.g. {"TUBERCULOSIS": 0.95}.
        calibrate: fit temperature scaling (else T stays 1).

    Returns:
        The checkpoint.
    """
    from cxrlab.config import target_recall_classes
    from cxrlab.metrics import apply_temperature, choose_threshold, fit_temperature

    names = list(ckpt["class_names"])
    if calibrate:
        temp = float(fit_temperature(val_logits, val_y))
        if temp < 1 and (val_logits.argmax(1) == val_y).all():
            # With no validation error the NLL keeps falling as T -> 0: there is no evidence to sharpen.
            log.info("validation has no errors: temperature left at 1 (the fit would sharpen to %.3f without evidence)", temp)
            temp = 1.0
        for warning in temperature_warnings(temp, val_y, names):
            log.warning("temperature %.3f: %s", temp, warning)
        ckpt["temperature"] = temp
        ckpt["calibration_fitted_on"] = f"validation ({len(val_y)} images)"
    probs = apply_temperature(val_logits, float(ckpt.get("temperature", 1.0)))
    thresholds, ops = {}, {}
    for cls, recall in target_recall_classes(target_recall, names).items():
        if not (val_y == names.index(cls)).any():
            raise CxrlabError(f"--target-recall {cls}: the calibration data have no {cls} images, so no "
                              f"threshold can reach a recall on them; calibrate on a split that has some")
        res = choose_threshold(val_y, probs, names.index(cls), recall)
        thresholds[cls] = float(res["threshold"])
        ops[cls] = res
    if thresholds:
        ckpt["thresholds"] = thresholds
        ckpt["operating_points_val"] = ops
    return ckpt


# Fewer calibration images than this make a fitted temperature mostly noise (a warning says so).
MIN_CALIBRATION_IMAGES = 30


def temperature_warnings(temp: float, y: np.ndarray, names: list[str]) -> list[str]:
    """What makes a fitted temperature untrustworthy: the search's bound reached, too few images, missing classes.

    Args:
        temp: the fitted temperature.
        y: the calibration labels (class indices).
        names: the checkpoint's class names.

    Returns:
        One sentence per problem (empty when none).
    """
    from cxrlab.metrics import T_MAX, T_MIN

    out = []
    if temp >= T_MAX * 0.999:
        out.append(f"the fit hit its upper bound {T_MAX:g}: the model is mostly wrong on these images, so every "
                   f"probability is flattened towards 1/{len(names)}; check that they are labelled with the classes "
                   f"the model was trained on, or keep the model's own temperature")
    elif temp <= T_MIN * 1.001:
        out.append(f"the fit hit its lower bound {T_MIN:g}: every probability would be pushed to 0 or 1")
    if len(y) < MIN_CALIBRATION_IMAGES:
        out.append(f"fitted on only {len(y)} images (at least {MIN_CALIBRATION_IMAGES} recommended): it is mostly noise")
    missing = [c for i, c in enumerate(names) if not (np.asarray(y) == i).any()]
    if missing:
        out.append(f"the calibration images have no {', '.join(missing)}: the temperature says nothing about "
                   f"{'that class' if len(missing) == 1 else 'those classes'}")
    return out


def calibrate_on_split(ckpt: dict, data, split: str = "val", manifest: str | None = None,
                       target_recall: dict[str, float] | None = None, device: str = "auto") -> dict:
    """Fit a checkpoint's (or ensemble's) temperature and operating-point thresholds on a labelled split.

    Args:
        ckpt: the checkpoint dict (changed in place and returned).
        data: data folder or manifest with the split.
        split: the split to fit on (validation; never the test split you report).
        manifest: optional manifest CSV.
        target_recall: {CLASS: recall} to reach on that split.
        device: auto, cpu, cuda.

    Returns:
        The checkpoint with `temperature`, `calibration_fitted_on` and optional `thresholds`.
    """
    from cxrlab.data.dataset import build_index
    from cxrlab.evaluate import label_indices
    from cxrlab.inference import bundle_for

    index = build_index(data, manifest, require=(), val_fraction=0, check=(split,))
    if split not in index.splits:
        raise CxrlabError(f"'{data}' has no '{split}' split to calibrate on (it has: {', '.join(index.splits)}); "
                          f"pass --split, or a manifest whose split column marks the validation images")
    names = list(ckpt["class_names"])
    samples = _known_samples(index.splits[split], names, f"the {split} split of '{data}'")
    logits, ok, _ = bundle_for(ckpt, device).logits_for_files([s.path for s in samples])
    if not ok:
        raise CxrlabError(f"the {split} split of '{data}' has no readable images of the classes {', '.join(names)}")
    y = label_indices([samples[i] for i in ok], names)
    ckpt.pop("operating_points_val", None)  # chosen under the old temperature, like the thresholds
    if ckpt.pop("thresholds", None) is not None:
        log.info("previous operating-point thresholds dropped (they belonged to the old temperature)")
    ckpt = calibrate_checkpoint(ckpt, logits, y, target_recall or {}, calibrate=True)
    ckpt["calibration_fitted_on"] = f"{split} split of {data} ({len(y)} images)"
    return ckpt


def _known_samples(samples: list, names: list[str], where: str) -> list:
    """The samples of the checkpoint's classes; an error when there are none, a warning for the others."""
    known = {n.lower() for n in names}
    kept = [s for s in samples if s.label.lower() in known]
    other = sorted({s.label for s in samples if s.label.lower() not in known})
    if not kept:
        raise CxrlabError(f"the classes of {where} ({', '.join(other)}) are not the checkpoint's classes "
                          f"({', '.join(names)}); calibrate on data labelled with the classes the model was trained on")
    if other:
        log.warning("%s: %d image(s) of classes the checkpoint does not know (%s) left out", where,
                    len(samples) - len(kept), ", ".join(other))
    return kept


def finalize_run(run) -> dict:
    """Calibrate, evaluate on test and report for a finished `cxrlab.train.Run`; returns test metrics."""
    from cxrlab.checkpoint import load_checkpoint, save_checkpoint
    from cxrlab.evaluate import evaluation_metrics, write_evaluation
    from cxrlab.inference import bundle_from_checkpoint
    from cxrlab.metrics import format_metric

    best = run.out / "best.pt"
    if not best.is_file():
        log.warning("no best.pt was written (the monitored metric was never finite); skipping the test evaluation")
        return {}
    ckpt = load_checkpoint(best)
    bundle = bundle_from_checkpoint(ckpt, run.device)
    val = run.splits["val"].arrays
    ckpt = calibrate_checkpoint(ckpt, bundle.logits_for_arrays(val.images), val.labels.numpy(),
                                run.cfg.target_recall, run.cfg.calibrate)
    save_checkpoint(ckpt, best)
    log.info("%s epoch %d (%s %.4f); temperature %.3f fitted on validation", run.cfg.select, ckpt["epoch"],
             ckpt["metric"]["name"], ckpt["metric"]["value"], ckpt.get("temperature", 1.0))
    result = {}
    if "test" in run.splits:
        test = run.splits["test"]
        sources = [s.source for s in test.samples]
        groups = [s or "unknown" for s in sources] if any(sources) else None
        metrics, probs, y_pred = evaluation_metrics(ckpt, bundle.logits_for_arrays(test.arrays.images),
                                                    test.arrays.labels.numpy(), groups)
        metrics.update({"split": "test", "checkpoint": str(best)})
        write_evaluation(run.out, metrics, test.arrays.labels.numpy(), probs, y_pred, [s.path for s in test.samples],
                         list(ckpt["class_names"]))
        log.info("test: accuracy %.4f, macro-F1 %.4f, AUC %s (n=%d) -> %s", metrics["accuracy"], metrics["macro_f1"],
                 format_metric(metrics["auc_macro"]), metrics["n"], run.out / "metrics.json")
        result["test"] = {k: metrics[k] for k in ("accuracy", "macro_f1", "auc_macro", "n")}
    if run.cfg.report:
        from cxrlab.evaluate import draw_report

        draw_report(run.out)
    return result
