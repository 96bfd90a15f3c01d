"""Grad-CAM explanations through pytorch-grad-cam: heatmaps, overlays and figures.

The CAM classes, targets and overlay come from the library (`pytorch_grad_cam`); cxrlab adds the
glue: the target layer from the model registry (`model_spec(name).cam_layer`), the one
preprocessing preset, calibrated probabilities, figures with the prediction written in the
picture, and per-epoch CAMs during training (`TrainingCams`). Every CAM object is used as a
context manager, so its hooks are removed even when something fails; the model's train/eval
mode, its parameters' gradients and torch's RNG state are left as they were found.

Scoring explanations against lesion masks (pointing game) lives in `cxrlab.faithfulness`.
"""

from __future__ import annotations

import io
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrlab.camnames import cam_name
from cxrlab.data.preprocess import prepare_array, to_model_input
from cxrlab.errors import CxrlabError

log = logging.getLogger(__name__)

# method name -> class name in pytorch_grad_cam
METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
_GRADIENT_FREE_BATCH = 32  # forward batch of scorecam / ablationcam
_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@dataclass
class ExplainResult:
    """One explained radiograph.

    Attributes:
        heatmap: float32 (S, S) in [0, 1], S the model's input size.
        image: uint8 (S, S), the preprocessed radiograph the model saw.
        overlay: uint8 (S, S, 3) RGB, heatmap blended over the radiograph.
        probs: calibrated probabilities {CLASS: p}.
        predicted: predicted class.
        target: the class the heatmap explains.
        method: CAM method name.
        note: how to read it, or None (an ensemble: "Grad-CAM of member 0 of N; probabilities of the ensemble").
        warning: why the input does not look like a radiograph (`cxrlab.inference.input_warning`), or None.
    """

    heatmap: np.ndarray
    image: np.ndarray
    overlay: np.ndarray
    probs: dict
    predicted: str
    target: str
    method: str = "gradcam"
    note: str | None = None
    warning: str | None = None


def cam_class(method: str):
    """The pytorch-grad-cam class for a method name (see `METHODS`); unknown names list the valid ones."""
    key = str(method).lower()
    if key not in METHODS:
        raise CxrlabError(f"unknown CAM method '{method}'. Valid methods: {', '.join(METHODS)}")
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, METHODS[key])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers (CAM hooks go on the real layers)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock CAM computations on `model` hold (one per model).

    CAM hooks record every forward pass through the target layer, so a concurrent forward on the
    same model (another request's prediction) would mix into the explanation. A multi-threaded
    caller (the web service) should hold this lock around its own forwards on a shared model.
    """
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.RLock())


def _make_cam(method: str, model: torch.nn.Module, layer: torch.nn.Module):
    cls = cam_class(method)
    key = method.lower()
    if key == "ablationcam":
        from pytorch_grad_cam import AblationLayer

        # a fresh ablation layer: the library's default instance is shared and keeps activations
        return cls(model=model, target_layers=[layer], ablation_layer=AblationLayer(), batch_size=_GRADIENT_FREE_BATCH)
    cam = cls(model=model, target_layers=[layer])
    if key == "scorecam":
        cam.batch_size = _GRADIENT_FREE_BATCH
    return cam


def cam_heatmaps(model: torch.nn.Module, layer: torch.nn.Module, images, targets: list[int], spec, device,
                 method: str = "gradcam", batch_size: int = 16) -> np.ndarray:
    """Heatmaps of preprocessed uint8 images for given class indices, in one CAM context.

    Args:
        model: torch model (its train/eval mode and parameter gradients are restored afterwards); its
            weights may be frozen (requires_grad False), as a weight EMA's are.
        layer: the target layer inside `model`.
        images: uint8 (N, S, S) array or tensor.
        targets: class index per image.
        spec: `InputSpec` (mean, std, in_chans, channels_last).
        device: where to compute.
        method: a name from `METHODS`.
        batch_size: images per CAM call.

    Returns:
        float32 (N, S, S) in [0, 1].
    """
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.ndim != 3 or len(targets) != len(images):
        raise CxrlabError(f"expected uint8 images (N, S, S) and N targets, got {tuple(images.shape)} and {len(targets)}")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}
    out = np.zeros(tuple(images.shape), np.float32)
    try:
        with model_lock(model), torch.enable_grad(), _make_cam(method, model, layer) as cam:
            try:
                for i in range(0, len(images), batch_size):
                    x = to_model_input(images[i : i + batch_size].to(device), spec.mean, spec.std, spec.in_chans)
                    if getattr(spec, "channels_last", False):
                        x = x.contiguous(memory_format=torch.channels_last)
                    # frozen weights (a weight EMA, a frozen backbone) build no graph on their own
                    x.requires_grad_(True)
                    tg = [ClassifierOutputTarget(int(t)) for t in targets[i : i + batch_size]]
                    out[i : i + len(x)] = cam(input_tensor=x, targets=tg)
                    cam.outputs = None  # drop the retained graph before the next batch
                    cam.activations_and_grads.clear()
            except IndexError as exc:  # the library's __exit__ would print and swallow an IndexError
                raise RuntimeError(f"pytorch-grad-cam failed: {exc}") from exc
    finally:
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32, copy=False)


# ---------------------------------------------------------------- bundles


def _torch_model(bundle) -> torch.nn.Module:
    """The module Grad-CAM hooks: the model of a checkpoint, or the first member's of an ensemble (its
    `bundle.model`); refuses ONNX models."""
    from cxrlab.ensemble import first_member

    model = getattr(bundle, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise CxrlabError("Grad-CAM needs the PyTorch checkpoint (.pt): an ONNX model has no gradients or layers. "
                          "Pass the .pt checkpoint the ONNX file was exported from.")
    if "name" not in (first_member(bundle.ckpt).get("model") or {}):
        raise CxrlabError("Grad-CAM needs a checkpoint that names its architecture (model.name); this one does not")
    return unwrap_model(model)


def gradcam_unavailable(bundle) -> str | None:
    """Why Grad-CAM cannot run on this model (an ONNX model, a checkpoint without its architecture), or None."""
    try:
        _torch_model(bundle)
    except CxrlabError as exc:
        return str(exc)
    return None


def _cam_layer(bundle, model: torch.nn.Module) -> torch.nn.Module:
    from cxrlab.ensemble import first_member
    from cxrlab.models import model_spec

    return model_spec(first_member(bundle.ckpt)["model"]["name"]).cam_layer(model)


def ensemble_note(bundle) -> str | None:
    """For an ensemble: "Grad-CAM of member 0 of N; probabilities of the ensemble" (the heatmap comes from the
    first member's layers, the probabilities and the decision from the whole ensemble); None otherwise."""
    members = (getattr(bundle, "ckpt", None) or {}).get("ensemble")
    return f"Grad-CAM of member 0 of {len(members)}; probabilities of the ensemble" if members else None


def target_class(names: list[str], target: str | int) -> str:
    """The model's class name for a `--target`: a class index, or a name as `cxrlab.config.class_named` matches it
    (any letter case, as data folders and `--target-recall` match).

    Raises:
        CxrlabError: no class matches; the message lists the model's classes.
    """
    from cxrlab.config import class_named

    if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(names):
        return names[int(target)]
    match = class_named(names, str(target))
    if match is not None:
        return match
    raise CxrlabError(f"unknown target class '{target}'. This model's classes: {', '.join(names)}")


def _class_index(names: list[str], target: str | int | None) -> int | None:
    return None if target is None else names.index(target_class(names, target))


def _predict(bundle, images: np.ndarray, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities (N, C), predicted indices (N,)) with the checkpoint's decision rule; `probs`
    given, only the rule is applied."""
    from cxrlab.evaluate import decide

    if probs is None:
        probs = bundle.probs(bundle.logits_for_arrays(images))
    return probs, np.asarray(decide(probs, bundle.ckpt), dtype=int)


def explain_batch(bundle, images_uint8: np.ndarray, targets: list[int] | None = None, method: str = "gradcam",
                  batch_size: int = 16) -> np.ndarray:
    """Heatmaps for a batch of preprocessed images, in one CAM context.

    Args:
        bundle: a torch `ModelBundle` (see `cxrlab.inference.load_model_bundle`).
        images_uint8: uint8 (N, S, S), already preprocessed (`prepare_array`).
        targets: class index per image; None explains each image's predicted class.
        method: a name from `METHODS`.
        batch_size: images per CAM call.

    Returns:
        float32 (N, S, S) in [0, 1].
    """
    model = _torch_model(bundle)
    images = np.array(images_uint8, dtype=np.uint8)
    with model_lock(model):
        if targets is None:
            targets = list(_predict(bundle, images)[1]) if len(images) else []
        targets = [_class_index(bundle.class_names, int(t)) for t in targets]
        return cam_heatmaps(model, _cam_layer(bundle, model), images, targets, bundle.spec, bundle.device, method,
                            batch_size)


def make_overlay(image: np.ndarray, heatmap: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """RGB uint8 overlay of a heatmap (jet colormap) on a uint8 grayscale image (library function)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(rgb, heatmap.astype(np.float32), use_rgb=True, image_weight=image_weight)


def explain_arrays(bundle, images_uint8: np.ndarray, target: str | list | None = None,
                   method: str = "gradcam", probs: np.ndarray | None = None,
                   warnings: list | None = None) -> list[ExplainResult]:
    """Explain preprocessed images; `target` is one class for all, a list (one per image) or None (predicted).
    `probs`: the images' calibrated probabilities when the caller already has them (skips a forward pass).
    `warnings`: one input warning (or None) per image, carried into the results and their figures.
    An ensemble's heatmaps are its first member's, its probabilities the ensemble's (`ensemble_note`)."""
    model = _torch_model(bundle)
    images = np.array(images_uint8, dtype=np.uint8)  # a writable copy (PIL arrays are read-only)
    names = bundle.class_names
    if target is None:
        idx = None
    elif isinstance(target, (list, tuple, np.ndarray)):
        idx = [_class_index(names, t) for t in target]
    else:
        idx = [_class_index(names, target)] * len(images)
    with model_lock(model):  # the prediction and the CAM see no other thread's forwards
        probs, pred = _predict(bundle, images, probs)
        idx = list(pred) if idx is None else idx
        heat = cam_heatmaps(model, _cam_layer(bundle, model), images, idx, bundle.spec, bundle.device, method)
    note, warnings = ensemble_note(bundle), warnings or [None] * len(images)
    return [ExplainResult(heat[i], images[i], make_overlay(images[i], heat[i]),
                          {c: float(probs[i, k]) for k, c in enumerate(names)}, names[int(pred[i])],
                          names[int(idx[i])], method.lower(), note, warnings[i]) for i in range(len(images))]


def explain_array(bundle, gray: np.ndarray, target: str | None = None, method: str = "gradcam") -> ExplainResult:
    """Explain one decoded radiograph.

    Args:
        bundle: a torch `ModelBundle`.
        gray: decoded 2-D uint8 radiograph at any size (preprocessed here with the bundle's preset).
        target: class to explain (default: the predicted class).
        method: a name from `METHODS`.

    Returns:
        The `ExplainResult` (heatmap, preprocessed image, overlay, probabilities, prediction, and a warning
        when the image does not look like a radiograph).
    """
    from cxrlab.inference import input_warning

    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise CxrlabError(f"explain_array needs a 2-D uint8 grayscale image, got shape {gray.shape} dtype {gray.dtype} "
                          "(decode files with cxrlab.data.io.read_gray)")
    warning = input_warning(gray.shape[1], gray.shape[0], gray)
    return explain_arrays(bundle, prepare_array(gray, bundle.pre)[None], target, method, warnings=[warning])[0]


# ---------------------------------------------------------------- figures


def _probs_text(probs: dict, predicted: str) -> str:
    return "\n".join(f"{'>' if c == predicted else ' '} {c}: {p:.3f}" for c, p in
                     sorted(probs.items(), key=lambda kv: -kv[1]))


def explanation_figure(result: ExplainResult, title: str | None = None, mask: np.ndarray | None = None):
    """A matplotlib Figure (Agg canvas, no pyplot): radiograph, overlay, prediction and probabilities.

    Args:
        result: the explanation.
        title: headline (default: predicted class and probability).
        mask: optional boolean lesion mask (S, S), drawn as a contour on the overlay.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.3), dpi=100)
    FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(result.image, cmap="gray", vmin=0, vmax=255)
    ax0.set_title("radiograph", fontsize=9)
    ax1.imshow(result.overlay)
    ax1.set_title(f"{result.method} for {result.target}", fontsize=9)
    if mask is not None and np.any(mask):
        ax1.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="white", linewidths=1.0)
    r, c = np.unravel_index(int(np.argmax(result.heatmap)), result.heatmap.shape)
    ax1.plot([c], [r], marker="+", color="white", markersize=10, mew=2)
    for ax in (ax0, ax1):
        ax.set_axis_off()
    p = result.probs.get(result.predicted, float("nan"))
    fig.suptitle(title or f"predicted {result.predicted} (p={p:.2f})", fontsize=11, fontweight="bold")
    lines = [(f"warning: {result.warning}", "firebrick")] if result.warning else []
    lines += [(result.note, "dimgray")] if result.note else []
    for k, (text, colour) in enumerate(lines):
        fig.text(0.5, 0.905 - 0.04 * k, text, ha="center", va="top", fontsize=8, color=colour, wrap=True)
    fig.text(0.5, 0.02, _probs_text(result.probs, result.predicted), ha="center", va="bottom",
             family="monospace", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86 - 0.04 * len(lines), bottom=0.04 + 0.035 * len(result.probs),
                        wspace=0.04)
    return fig


def overlay_png(result: ExplainResult, title: str | None = None, mask: np.ndarray | None = None) -> bytes:
    """The explanation figure as PNG bytes (for the web service)."""
    fig = explanation_figure(result, title, mask)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    finally:
        fig.clf()
    return buf.getvalue()


def save_explanation(result: ExplainResult, path: str | Path, title: str | None = None,
                     mask: np.ndarray | None = None) -> Path:
    """Write the explanation figure (radiograph, overlay, prediction and probabilities) as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(overlay_png(result, title, mask))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- files


INDEX_NAME = "explain_index.csv"  # written into the output folder by `explain_paths`


def explain_paths(bundle, inputs: list[str], out: str | Path, target: str | None = None, method: str = "gradcam",
                  save_raw: bool = False, chunk: int = 32) -> tuple[list[Path], dict[str, str]]:
    """Explain image files and folders; write OUT/<stem>_cam.png (and <stem>_cam.npy with `save_raw`) and
    OUT/explain_index.csv (source file -> output file, predicted class, probabilities, warning, error).

    Files found under `out` while searching a folder are skipped (explain's own outputs of an earlier run).
    Files with the same stem from different folders are written as <stem>_cam.png, <stem>-2_cam.png, ...;
    the index and each figure's title name the source file.

    Args:
        bundle: a torch `ModelBundle`, or an ensemble (the first member's Grad-CAM, the ensemble's probabilities).
        inputs: files and folders (searched recursively).
        out: output folder.
        target: class to explain (default: each image's predicted class); matched case-insensitively.
        method: a name from `METHODS`.
        save_raw: also save the float32 heatmap as .npy.
        chunk: images decoded and explained at a time.

    Returns:
        (written PNG paths, {file: reason} for files that could not be explained).
    """
    _torch_model(bundle)
    target = None if target is None else target_class(bundle.class_names, target)
    cam_class(method)
    out = Path(out)
    files, written, errors, used, rows = _input_files(inputs, out), [], {}, set(), []
    if ensemble_note(bundle):
        log.info("ensemble checkpoint: %s", ensemble_note(bundle))
    for start in range(0, len(files), chunk):
        ok, arrays, warnings = _decode(files[start : start + chunk], bundle.pre, errors)
        ok, arrays, warnings, probs = _ensemble_probs(bundle, ok, arrays, warnings, errors)
        if not ok:
            continue
        for f, res in zip(ok, explain_arrays(bundle, np.stack(arrays), target, method, probs, warnings)):
            stem = _unique_stem(f.stem, used)
            title = f"{_short(f)}: {res.predicted} (p={res.probs[res.predicted]:.2f})"
            written.append(save_explanation(res, out / f"{stem}_cam.png", title=title))
            if save_raw:
                np.save(out / f"{stem}_cam.npy", res.heatmap)
            rows.append(_index_row(f, written[-1].name, res))
    rows += [{"source": f, "error": reason} for f, reason in errors.items()]
    _write_index(out / INDEX_NAME, rows, bundle.class_names)
    _warn_stale_raw(out, used, save_raw)
    return written, errors


def _input_files(inputs: list[str], out: Path) -> list[Path]:
    """The files to explain: `expand_inputs`, less files under `out` that a folder search found."""
    from cxrlab.inference import expand_inputs

    named, root, found = {Path(i) for i in inputs if not Path(i).is_dir()}, out.resolve(), expand_inputs(inputs)
    files = [f for f in found if f in named or not f.resolve().is_relative_to(root)]
    skipped = len(found) - len(files)
    if skipped:
        log.info("skipped %d file(s) under the output folder %s (explain's own outputs)", skipped, out)
    if not files:
        raise CxrlabError(f"no image files to explain in {', '.join(map(str, inputs))}: the only images there are "
                          f"under the output folder {out} (explain's own outputs); choose another --out or input")
    return files


def _ensemble_probs(bundle, ok: list[Path], arrays: list, warnings: list, errors: dict) -> tuple:
    """For an ensemble, the ensemble's probabilities from the files, as `cxrlab predict` computes them (each
    member decodes with its own preset); a file a member cannot read joins `errors`. Single models: None."""
    if not ensemble_note(bundle) or not ok:
        return ok, arrays, warnings, None
    logits, rows, bad = bundle.logits_for_files(ok)
    for f, reason in bad.items():
        errors[f] = reason
        log.warning("cannot explain %s: %s", f, reason)
    return ([ok[i] for i in rows], [arrays[i] for i in rows], [warnings[i] for i in rows],
            bundle.probs(logits) if rows else None)


def _short(path: Path, width: int = 60) -> str:
    text = str(path)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _index_row(source: Path, output: str, res: ExplainResult) -> dict:
    return {"source": source, "output": output, "predicted": res.predicted, "target": res.target,
            **{f"prob_{c}": f"{p:.6f}" for c, p in res.probs.items()}, "warning": res.warning or ""}


def _write_index(path: Path, rows: list[dict], class_names: list[str]) -> None:
    """OUT/explain_index.csv: source,output,predicted,target,prob_<class>...,warning,error (this run's files)."""
    import csv

    cols = ["source", "output", "predicted", "target", *(f"prob_{c}" for c in class_names), "warning", "error"]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _warn_stale_raw(out: Path, stems: set, save_raw: bool) -> None:
    """Without --save-raw, <stem>_cam.npy left by an earlier run beside a new <stem>_cam.png no longer matches it;
    say so (they are not deleted)."""
    stale = [] if save_raw else sorted(s for s in stems if (out / f"{s}_cam.npy").exists())
    if stale:
        log.warning("%d <stem>_cam.npy file(s) in %s are from an earlier --save-raw run and do not match the new "
                    "overlays (e.g. %s_cam.npy); delete them or run again with --save-raw", len(stale), out, stale[0])


def _decode(files: list[Path], pre, errors: dict) -> tuple[list[Path], list[np.ndarray], list[str | None]]:
    """Readable files, their preprocessed arrays and input warnings; each bad file is logged and added to `errors`,
    each warning logged."""
    from cxrlab.data.io import read_gray
    from cxrlab.inference import input_warning

    ok, arrays, warnings = [], [], []
    for f in files:
        try:
            gray = read_gray(f)
            arrays.append(prepare_array(gray, pre))
        except CxrlabError as exc:
            errors[str(f)] = getattr(exc, "reason", str(exc))
            log.warning("cannot explain %s: %s", f, errors[str(f)])
            continue
        ok.append(f)
        warnings.append(input_warning(gray.shape[1], gray.shape[0], gray))
        if warnings[-1]:
            log.warning("%s: %s", f, warnings[-1])
    return ok, arrays, warnings


def _unique_stem(stem: str, used: set) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def score_faithfulness(checkpoint, data, masks=None, split: str = "test", method: str = "gradcam", out=None,
                       **kwargs) -> dict:
    """Pointing game and energy in the lesion mask; see `cxrlab.faithfulness.score_faithfulness`."""
    from cxrlab.faithfulness import score_faithfulness as _score

    return _score(checkpoint, data, masks, split=split, method=method, out=out, **kwargs)


# ---------------------------------------------------------------- training


class TrainingCams:
    """Grad-CAM overlays of a fixed set of validation images at the end of training epochs.

    Writes `out_dir/epoch{EEE}_true-{TRUE}_pred-{PRED}_{stem}.png` (`cxrlab.camnames`) explaining
    the predicted class. Leaves the model's mode and gradients and torch's RNG state unchanged,
    so a run with CAMs trains exactly like one without.

    Args:
        out_dir: folder for the overlays (created).
        images: uint8 (K, S, S) preprocessed images.
        labels: true class indices (K,).
        stems: file stems of the images (K).
        class_names: class names of the model outputs.
        spec: `InputSpec` of the model.
        model_name: registry name (gives the CAM target layer).
        method: a name from `METHODS`.
        device: where the model lives.
    """

    def __init__(self, out_dir, images, labels, stems: list[str], class_names: list[str], spec, model_name: str,
                 method: str = "gradcam", device="cpu"):
        from cxrlab.models import model_spec

        cam_class(method)
        self.out_dir = Path(out_dir)
        self.images = torch.as_tensor(images).cpu()
        self.labels = [int(v) for v in torch.as_tensor(labels).cpu()]
        self.stems, self.class_names = [str(s) for s in stems], list(class_names)
        self.spec, self.method, self.device = spec, method.lower(), torch.device(device)
        self.cam_layer = model_spec(model_name).cam_layer
        if not (len(self.images) == len(self.labels) == len(self.stems)):
            raise CxrlabError(f"TrainingCams: {len(self.images)} images, {len(self.labels)} labels, {len(self.stems)} stems")

    def on_epoch_end(self, epoch: int, model: torch.nn.Module) -> list[Path]:
        """Write this epoch's overlays; returns their paths (empty when the CAM failed: logged, training goes on)."""
        if not len(self.images):
            return []
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        was_training = model.training
        try:
            return self._write(epoch, unwrap_model(model))
        except (RuntimeError, ValueError) as exc:
            log.warning("Grad-CAM at epoch %d failed (%s); training continues", epoch, exc)
            return []
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def _write(self, epoch: int, model: torch.nn.Module) -> list[Path]:
        model.eval()
        with torch.no_grad():
            x = to_model_input(self.images.to(self.device), self.spec.mean, self.spec.std, self.spec.in_chans)
            probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        pred = probs.argmax(1)
        heat = cam_heatmaps(model, self.cam_layer(model), self.images, list(pred), self.spec, self.device, self.method)
        paths = []
        for i, stem in enumerate(self.stems):
            true, guess = self.class_names[self.labels[i]], self.class_names[int(pred[i])]
            res = ExplainResult(heat[i], self.images[i].numpy(), make_overlay(self.images[i].numpy(), heat[i]),
                                {c: float(probs[i, k]) for k, c in enumerate(self.class_names)}, guess, guess, self.method)
            title = f"epoch {epoch} | true {true} | pred {guess} (p={probs[i, pred[i]]:.2f})"
            paths.append(save_explanation(res, self.out_dir / cam_name(epoch, true, guess, stem), title))
        return paths
