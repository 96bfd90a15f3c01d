"""ONNX export with a parity check, int8 quantization, and an onnxruntime inference bundle.

The exported graph includes the preprocessing that happens on tensors, so a client only has to
produce the cxrlab preprocessed image (`cxrlab.data.preprocess.load_array`):

    input  "image":  float32 (N, 1, S, S), grey values 0..255 (the uint8 array cast to float)
    output "logits": float32 (N, num_classes), raw logits (softmax(logits / temperature) = probabilities)

Inside the graph: `x * 1/(255 std) - mean/std`, then the grey channel is repeated to `in_chans`.
The batch axis is dynamic; S is fixed (`img_size`). Everything else a user needs travels as ONNX
`metadata_props`, each value a JSON string (see `META_KEYS` and docs/INFERENCE.md).

An ensemble checkpoint (`cxrlab.ensemble`) exports as one graph: every member with its own
normalisation and temperature, their probabilities averaged with the ensemble's weights; the output
"logits" are log(average probability), as `EnsembleBundle` returns them, so the ensemble's own
temperature and thresholds (in the metadata) act on them as on any model's logits. Its members must
share one preprocessing preset (the graph's input is one image).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrlab.errors import CxrlabError
from cxrlab.inference import BundleBase

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
MIN_OPSET = 17
# Largest |Δprob| between onnxruntime and PyTorch on the parity images. A wrong export (normalisation, channel
# layout, a layer in training mode) moves probabilities by 1e-2 and more; both engines in fp32 differ by summation
# order only, which trained models amplify on the constant white/black parity images: the recipe's EfficientNet-Lite0
# members of runs/cli_m2_s0 differed by 8e-5 / 3.3e-4 there (1.5e-5 on 64 real radiographs), and 1e-4 refused them.
PARITY_TOL = 1e-3
EXPORT_FORMAT = 1
META_KEYS = ("architecture", "class_names", "img_size", "in_chans", "mean", "std", "preprocess", "temperature",
             "thresholds", "cxrlab_version", "epoch", "metric", "input", "quantization", "export_format", "ensemble")
# Quantized op types; the classifier (Gemm/MatMul), pooling and the in-graph normalisation stay fp32. On ImageNet
# efficientnet_lite0 over 32 real radiographs this raised top-1 agreement with fp32 from 16% (every op, ORT
# defaults) to 66% and cut max |dlogit| from 5.0 to 1.9 (docs/BENCHMARKS.md).
QUANT_OPS = ["Conv", "Clip", "Add"]
# The first FP32_FRONT convolutions on every path from the image (and the ops between them) stay fp32 too: their
# errors pass through the whole network. On a recipe-trained Kermany EfficientNet-Lite0 (fp32 0.907 test accuracy)
# quantizing only its first block (one depthwise and one 1x1 conv after the stem) cost 5 points on its own (0.857;
# any later stage alone at most 0.7 points), every layer but the stem 0.861, every layer but the stem and that block 0.909.
FP32_FRONT = 3
QUANT_SCHEME = ("int8 static QDQ: Conv/Clip/Add, per-channel weights, min-max; the first 3 convolutions from the "
                "image and the classifier fp32")
INPUT_DOC = "float32 (N, 1, S, S) grey values 0..255; normalisation and channel repeat are in the graph"
# Below this argmax agreement with fp32 on the held-out images `cxrlab export --quantize int8` warns. A recipe-trained
# Kermany EfficientNet-Lite0 changed 4.2% of its test decisions in int8 (docs/BENCHMARKS.md): more than a clinical
# model should change silently.
INT8_MIN_AGREEMENT = 0.97


@dataclass
class ExportResult:
    """What `export_onnx` did: the file, the parity of the fp32 graph and, for int8, its agreement."""

    path: str
    parity: dict | None = None
    int8: dict | None = None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _normalised_module(model, mean: list, std: list, in_chans: int):
    """Wrap a model so it takes 0..255 grey images (N, 1, S, S) and does the normalisation itself."""
    import torch

    class Normalised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.in_chans = in_chans
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * s))
            self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / s)

        def forward(self, x):
            if self.in_chans != 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            return self.model(x * self.scale - self.shift)

    return Normalised().eval()


def _ensemble_module(ckpt: dict):
    """One module for an ensemble checkpoint: 0..255 grey images in, log(weighted average probability) out.

    Each member normalises the image its own way, divides its logits by its own temperature and takes
    log_softmax; `logsumexp(log w_i + log p_i)` is the log of the average, exact where probabilities are tiny
    (members of weight 0 are left out of the graph).
    """
    import math

    import torch

    from cxrlab.checkpoint import build_model

    members = _exported_members(ckpt)

    class Averaged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.members = torch.nn.ModuleList(
                _normalised_module(build_model(m), list(m["mean"]), list(m["std"]), m["model"]["in_chans"])
                for m, _ in members)
            self.inv_t = [1.0 / float(m.get("temperature") or 1.0) for m, _ in members]
            self.log_w = [math.log(w) for _, w in members]

        def forward(self, x):
            parts = [torch.log_softmax(m(x) * t, dim=1) + lw for m, t, lw in zip(self.members, self.inv_t, self.log_w)]
            return torch.logsumexp(torch.stack(parts), dim=0)

    return Averaged().eval()


def _exported_members(ckpt: dict) -> list[tuple[dict, float]]:
    """(member checkpoint, weight) of an ensemble's members with a weight above 0; one preset for all, or an error."""
    from cxrlab.data.preprocess import Preprocess

    from cxrlab.ensemble import member_weights

    members, weights = ckpt["ensemble"], member_weights(ckpt)
    sources = list(ckpt.get("ensemble_sources") or [f"member {i}" for i in range(len(members))])
    want = Preprocess.of_checkpoint(ckpt)
    for m, src in zip(members, sources):
        got = Preprocess.of_checkpoint(m)
        if got != want:
            raise CxrlabError(f"ONNX export of an ensemble needs one preprocessing preset for all its members (the "
                              f"graph takes one image), but {src} uses {_preset(got)} and the ensemble {_preset(want)}; "
                              "export the members one by one (cxrlab export --checkpoint MEMBER.pt), or use the "
                              "ensemble .pt with predict, evaluate and serve")
    return [(m, w) for m, w in zip(members, weights) if w > 0]


def _preset(pre) -> str:
    return ", ".join(f"{k} {v}" for k, v in pre.to_dict().items() if k != "version")


def onnx_metadata(ckpt: dict, quantization: str = "none") -> dict[str, str]:
    """The `metadata_props` of an exported checkpoint: {key: JSON string}.

    For an ensemble, `ensemble` lists its members (architecture, weight, temperature, source); None otherwise.
    """
    from cxrlab import __version__
    from cxrlab.checkpoint import model_meta

    meta = model_meta(ckpt)
    meta.update(thresholds=ckpt.get("thresholds") or {}, input=INPUT_DOC, quantization=quantization,
                export_format=EXPORT_FORMAT, cxrlab_version=meta.get("cxrlab_version") or __version__)
    if ckpt.get("ensemble"):
        from cxrlab.ensemble import member_weights

        sources = ckpt.get("ensemble_sources") or [None] * len(ckpt["ensemble"])
        meta["ensemble"] = [{"architecture": m["model"]["name"], "weight": w,
                             "temperature": float(m.get("temperature") or 1.0), "source": src}
                            for m, w, src in zip(ckpt["ensemble"], member_weights(ckpt), sources)]
    return {k: json.dumps(meta.get(k)) for k in META_KEYS}


def read_metadata(path: str | Path) -> dict:
    """The decoded cxrlab metadata of an ONNX file (without loading the weights into memory twice)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends for foreign files
        raise CxrlabError(f"'{path}' is not an ONNX model (it cannot be parsed as one: {type(exc).__name__}). Pass a "
                          "FILE.onnx written by cxrlab export") from exc
    if not m.graph.node:
        raise CxrlabError(f"'{path}' is not an ONNX model (no graph in it). Pass a FILE.onnx written by cxrlab export")
    props = {p.key: p.value for p in m.metadata_props}
    if "class_names" not in props or "img_size" not in props:
        raise CxrlabError(f"'{path}' has no cxrlab metadata (class_names, img_size); export it with cxrlab export")
    return {k: json.loads(v) for k, v in props.items() if k in META_KEYS}


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "cxrlab"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _torch_export(module, example, path: Path, opset: int, exporter: str) -> None:
    """torch.onnx.export with a dynamic batch axis; `exporter` is "legacy" (TorchScript) or "dynamo"."""
    import torch

    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: batch},), external_data=False, verbose=False)
        return
    with warnings.catch_warnings():  # only around this call: the legacy exporter announces its deprecation
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def sample_images(size: int, n_random: int = 3, seed: int = 0) -> np.ndarray:
    """Parity inputs: uint8 (n, size, size) random noise plus structured images and one phantom."""
    from cxrlab.data.synth import render_phantom

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    structured = [np.zeros((size, size)), np.full((size, size), 255.0), np.tile(ramp, (size, 1)),
                  ((yy // max(size // 8, 1) + xx // max(size // 8, 1)) % 2) * 255.0,
                  render_phantom(rng, size, "PNEUMONIA")[0]]
    noise = list(rng.integers(0, 256, size=(n_random, size, size)))
    return np.stack([np.asarray(a).astype(np.uint8) for a in noise + structured])


def default_threads() -> int:
    """Threads for onnxruntime: $CXRLAB_ORT_THREADS, else the CPUs this process may run on."""
    if os.environ.get("CXRLAB_ORT_THREADS"):
        return int(os.environ["CXRLAB_ORT_THREADS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session; threads default to the CPUs this process may use (env CXRLAB_ORT_THREADS)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, min(int(threads or default_threads()), 16))
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run a session on uint8 (or 0..255 float) images (N, S, S) in batches -> float32 logits (N, C)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    outs = [session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x[i : i + batch_size])})[0]
            for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32) if outs else np.zeros((0, 0), np.float32)


def compare(ref_logits: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> dict:
    """Max |Δprob|, max |Δlogit|, mean |Δprob| and argmax agreement of two logit arrays."""
    from cxrlab.metrics import apply_temperature

    p, q = apply_temperature(ref_logits, temperature), apply_temperature(logits, temperature)
    finite = bool(np.isfinite(logits).all())
    dp = np.abs(p - q) if finite else np.full_like(p, np.inf)
    return {"n": int(len(p)), "max_abs_dprob": float(dp.max()) if dp.size else 0.0,
            "mean_abs_dprob": float(dp.mean()) if dp.size else 0.0,
            "max_abs_dlogit": float(np.abs(ref_logits - logits).max()) if finite and dp.size else float("inf"),
            "argmax_agreement": float((p.argmax(1) == q.argmax(1)).mean()) if len(p) else 1.0}


def check_parity(onnx_path: str | Path, ckpt: dict, model=None, tol: float = PARITY_TOL) -> dict:
    """Run the ONNX file and the PyTorch model on sample images at batch 1 and 3; compare probabilities.

    Args:
        onnx_path: the exported fp32 file.
        ckpt: its checkpoint (model, mean/std, img_size, temperature).
        model: the PyTorch model (rebuilt from `ckpt` when None).
        tol: the largest allowed |Δprob|.

    Returns:
        `compare()` numbers plus `batches`, `tolerance` and `ok`.
    """
    images = sample_images(int(ckpt["img_size"]))
    ref = _torch_logits(ckpt, model, images)
    session = make_session(onnx_path)
    got = np.concatenate([onnx_logits(session, images[:1], 1), onnx_logits(session, images[1:], 3)])
    result = compare(ref, got, float(ckpt.get("temperature", 1.0)))
    result.update(batches=[1, 3], tolerance=tol, ok=result["max_abs_dprob"] <= tol)
    return result


def _torch_logits(ckpt: dict, model, images: np.ndarray) -> np.ndarray:
    """PyTorch's logits for uint8 images: the model's, or for an ensemble its `EnsembleBundle`'s log-average."""
    import torch

    from cxrlab.engine import InputSpec, predict_logits
    from cxrlab.inference import bundle_for

    if ckpt.get("ensemble"):
        return bundle_for(ckpt, "cpu").logits_for_arrays(images, batch_size=3)
    if model is None:
        from cxrlab.checkpoint import build_model

        model = build_model(ckpt)
    spec = InputSpec(list(ckpt["mean"]), list(ckpt["std"]), ckpt["model"]["in_chans"])
    return predict_logits(model, torch.from_numpy(images), spec, torch.device("cpu"), batch_size=3)


def _load_ckpt(checkpoint) -> dict:
    from cxrlab.checkpoint import load_checkpoint

    return checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)


def export_onnx(checkpoint, out: str | Path, opset: int = MIN_OPSET, check: bool = True, quantize: str | None = None,
                calib_data: str | None = None, calib_count: int = 256, exporter: str = "auto") -> ExportResult:
    """Export a checkpoint to ONNX, check it against PyTorch, optionally quantize it to int8.

    Args:
        checkpoint: a `.pt` path or a loaded checkpoint dict (a model or an ensemble whose members share one
            preprocessing preset).
        out: the `.onnx` file to write (with `quantize`, the int8 model; fp32 stays in a temp file).
        opset: ONNX opset (>= 17).
        check: run the parity check; a failure raises `CxrlabError` and the file is renamed `*.parity-failed`.
        quantize: None or "int8" (static QDQ, per-channel weights).
        calib_data: folder of images for int8 calibration (default: synthetic phantoms).
        calib_count: calibration images (a quarter more is held out for the agreement numbers).
        exporter: "auto" (legacy TorchScript exporter, torch.export-based "dynamo" when that fails),
            "legacy" or "dynamo".

    Returns:
        An `ExportResult`.
    """
    from cxrlab.checkpoint import build_model

    if opset < MIN_OPSET:
        raise CxrlabError(f"--opset must be >= {MIN_OPSET}, got {opset}")
    if quantize not in (None, "int8"):
        raise CxrlabError(f"--quantize must be int8, got '{quantize}'")
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise CxrlabError(f"--out must end in .onnx, got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = _load_ckpt(checkpoint)
    model = None if ckpt.get("ensemble") else build_model(ckpt)
    with tempfile.TemporaryDirectory(prefix="cxrlab-export-") as tmp:
        fp32 = Path(tmp) / "model.onnx" if quantize else out.with_name(f".{out.name}.{os.getpid()}.tmp")
        _export_fp32(model, ckpt, fp32, opset, exporter)
        result = ExportResult(str(out), meta=read_metadata(fp32))
        if check:
            result.parity = check_parity(fp32, ckpt, model)
            _report_parity(result.parity, fp32, out)
        if quantize:
            result.int8 = quantize_int8(fp32, out, ckpt, calib_data, calib_count)
            result.warnings = int8_warnings(result.int8, out)
        else:
            os.replace(fp32, out)
    return result


def int8_warnings(q: dict, out: Path) -> list[str]:
    """What a user must know before deploying an int8 file: calibration on phantoms, decisions that int8 changed."""
    found = []
    if q["source"] == "synthetic phantoms":
        found.append("int8 was calibrated on synthetic phantoms (no --calib-data): its activation ranges and the "
                     "agreement above come from phantoms, not radiographs. Pass --calib-data with a folder of the "
                     "radiographs it will see (e.g. the training images)")
    if q["argmax_agreement"] < INT8_MIN_AGREEMENT:
        found.append(f"int8 changed {1 - q['argmax_agreement']:.1%} of the decisions of the fp32 model on "
                     f"{q['n']} held-out images (agreement {q['argmax_agreement']:.3f} < {INT8_MIN_AGREEMENT}): "
                     f"evaluate it on labelled images (cxrlab evaluate --checkpoint {out} --data DIR) before "
                     f"deploying it, or deploy the fp32 export (cxrlab export without --quantize)")
    return found


def _export_fp32(model, ckpt: dict, path: Path, opset: int, exporter: str) -> None:
    import torch

    m = ckpt["model"]
    if ckpt.get("ensemble"):
        module = _ensemble_module(ckpt)
    else:
        module = _normalised_module(model, list(ckpt["mean"]), list(ckpt["std"]), m["in_chans"])
    example = torch.from_numpy(sample_images(int(ckpt["img_size"]), n_random=2)[:2, None].astype(np.float32))
    tries = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    for i, name in enumerate(tries):
        try:
            _torch_export(module, example, path, opset, name)
            break
        except Exception as exc:  # noqa: BLE001 - exporter failures come in many types
            path.unlink(missing_ok=True)
            if i + 1 < len(tries):
                log.info("%s exporter failed for %s (%s); trying %s", name, m["name"], type(exc).__name__, tries[i + 1])
                continue
            raise CxrlabError(f"ONNX export of {m['name']} failed ({type(exc).__name__}: {str(exc)[:300]})"
                              + ("" if exporter == "auto" else "; try --exporter auto")) from exc
    _write_metadata(path, onnx_metadata(ckpt))


def _report_parity(parity: dict, tmp: Path, out: Path) -> None:
    log.debug("parity onnxruntime vs PyTorch on %d images (batch 1 and 3): max |dprob| %.2e, max |dlogit| %.2e (tolerance %.0e)",
             parity["n"], parity["max_abs_dprob"], parity["max_abs_dlogit"], parity["tolerance"])
    if parity["ok"]:
        return
    bad = out.with_name(out.name + ".parity-failed")
    shutil.move(str(tmp), str(bad))
    raise CxrlabError(f"ONNX parity check failed: max |dprob| {parity['max_abs_dprob']:.3g} > {parity['tolerance']:.0e} "
                      f"between onnxruntime and PyTorch; the suspect file was kept as {bad} for inspection. "
                      f"Try --exporter dynamo or another --opset; --no-check skips the check")


def calibration_images(img_size: int, calib_data: str | None, n: int, seed: int = 0, pre=None) -> np.ndarray:
    """uint8 (n, S, S) images for int8 calibration: a random sample of `calib_data`, else phantoms.

    Both go through the model's preprocessing preset `pre` (a `Preprocess`; default: resizing to `img_size`
    only), so that an equalising model is calibrated on equalised images, as it will see them.
    """
    from cxrlab.data.preprocess import Preprocess, prepare_array

    pre = pre or Preprocess(img_size)
    rng = np.random.default_rng(seed)
    if calib_data:
        from cxrlab.data.cache import load_arrays
        from cxrlab.inference import expand_inputs

        files = expand_inputs([calib_data])
        pick = sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))
        arrays, ok, _ = load_arrays([files[i] for i in pick], pre, cache_dir=False)
        if len(ok) < 2:
            raise CxrlabError(f"--calib-data {calib_data}: fewer than 2 readable images")
        return arrays
    from cxrlab.data.synth import CLASSES, render_phantom

    return np.stack([prepare_array(render_phantom(rng, pre.img_size, CLASSES[i % len(CLASSES)])[0], pre)
                     for i in range(n)])


class _Reader:
    """onnxruntime CalibrationDataReader over uint8 images, one small batch at a time."""

    def __init__(self, images: np.ndarray, batch: int = 8):
        self.batches = [images[i : i + batch, None].astype(np.float32) for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT_NAME: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_int8(fp32: Path, out: Path, ckpt: dict, calib_data: str | None = None, calib_count: int = 256,
                  fp32_front: int = FP32_FRONT) -> dict:
    """Static QDQ int8 quantization (see `QUANT_OPS`; the first `fp32_front` convolutions stay fp32) of an fp32 export.

    A quarter of `calib_count` extra images is held out; the return value compares fp32 and int8
    on them (`compare()` keys) and says how many images were used.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cxrlab.data.preprocess import Preprocess

    n_hold = max(calib_count // 4, 2)
    pre = Preprocess.of_checkpoint(ckpt)
    images = calibration_images(int(ckpt["img_size"]), calib_data, calib_count + n_hold, pre=pre)
    calib, hold = images[: max(len(images) - n_hold, 1)], images[max(len(images) - n_hold, 1) :]
    pre_path = fp32.with_name("model.pre.onnx")
    quant_pre_process(str(fp32), str(pre_path), skip_symbolic_shape=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    quantize_static(str(pre_path), str(tmp), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANT_OPS,
                    nodes_to_exclude=_fp32_front(pre_path, fp32_front))
    _write_metadata(tmp, onnx_metadata(ckpt, quantization=QUANT_SCHEME))
    t = float(ckpt.get("temperature", 1.0))
    ref, q = make_session(fp32), make_session(tmp)
    result = compare(onnx_logits(ref, hold), onnx_logits(q, hold), t)
    result.update(calibration_images=len(calib), source=calib_data or "synthetic phantoms")
    os.replace(tmp, out)
    log.debug("int8 vs fp32 on %d held-out images: argmax agreement %.3f, max |dprob| %.3g, mean |dprob| %.3g",
             result["n"], result["argmax_agreement"], result["max_abs_dprob"], result["mean_abs_dprob"])
    return result


def _fp32_front(path: Path, convs: int = FP32_FRONT) -> list[str]:
    """The nodes of `QUANT_OPS` types kept in fp32: those with fewer than `convs` convolutions between them and the
    input image on their longest path (each member of an ensemble has its own front)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    depth: dict[str, int] = {}  # convolutions between the input and a tensor (nodes come in topological order)
    front = []
    for node in graph.node:
        d = max((depth.get(t, 0) for t in node.input if t), default=0)
        if d < convs and node.op_type in QUANT_OPS:
            front.append(node.name)
        depth.update((t, d + (node.op_type == "Conv")) for t in node.output)
    return front


class OnnxBundle(BundleBase):
    """An ONNX model with the `ModelBundle` interface used by predict, evaluate and serve.

    Attributes:
        ckpt: checkpoint-like dict from the metadata (class_names, temperature, thresholds, img_size, ...).
        pre: the preprocessing preset.
        session: the onnxruntime session.
        path: the ONNX file.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        from cxrlab.data.preprocess import Preprocess

        self.path = Path(path)
        meta = read_metadata(self.path)
        self.ckpt = {**meta, "model": {"name": meta.get("architecture"), "in_chans": meta.get("in_chans"),
                                        "num_classes": len(meta["class_names"])}, "onnx_path": str(self.path)}
        self.pre = Preprocess.of_checkpoint(meta)
        self.session = make_session(self.path, threads)

    def logits_for_arrays(self, images, tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """Logits for preprocessed uint8 images (N, S, S) (numpy or torch)."""
        x = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
        logits = onnx_logits(self.session, x, batch_size)
        if tta:
            logits = (logits + onnx_logits(self.session, x[..., ::-1], batch_size)) / 2
        return logits


def load_onnx_bundle(path: str | Path, threads: int | None = None) -> OnnxBundle:
    """Open an ONNX file written by `cxrlab export` for inference."""
    from cxrlab.checkpoint import is_torch_file

    path = Path(path)
    if not path.is_file():
        raise CxrlabError(f"ONNX model '{path}' does not exist")
    if is_torch_file(path):  # the first bytes only: parsing the ONNX file here would read it once more
        raise CxrlabError(f"'{path}' is not an ONNX model (it looks like a PyTorch checkpoint: rename it to .pt, or "
                          "pass the .onnx file written by cxrlab export)")
    return OnnxBundle(path, threads)


def bundle_via_onnx(checkpoint: str | Path, threads: int | None = None) -> OnnxBundle:
    """Export a `.pt` checkpoint (parity-checked, cached next to it when writable) and open it with onnxruntime."""
    from cxrlab import __version__

    src = Path(checkpoint)
    if not src.is_file():
        raise CxrlabError(f"checkpoint '{src}' does not exist")
    st = src.stat()
    name = f".{src.name}.{st.st_size}-{st.st_mtime_ns}-{__version__}.onnx"
    cached = src.with_name(name)
    if not cached.is_file():
        if not os.access(src.parent, os.W_OK):
            cached = Path(tempfile.mkdtemp(prefix="cxrlab-onnx-")) / name
        log.info("exporting %s to ONNX (%s)", src, cached)
        export_onnx(src, cached)
    return load_onnx_bundle(cached, threads)
