"""The web service: a FastAPI app around one checkpoint, plus the static page at `/`.

`create_app(checkpoint_or_bundle, ...)` builds the app (tests use it with a TestClient);
`cxrlab serve` runs it with uvicorn. See docs/SERVING.md for the API and the limits on uploads.

Safety rules kept here: uploads are size-limited while they stream in (413), decoded from a temp
file in a private folder (the client's file name is never used as a path), every bad input is a
4xx JSON `{"error": ...}`, static files come only from the package's `static` folder, and an
optional bearer token protects every `/api/*` route except `/api/health`.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from cxrlab.errors import CxrlabError, ImageReadError
from cxrlab.serve.guard import Guard
from cxrlab.serve.predlog import DEFAULT_LOG_DB, PredictionLog

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 2**20
_CHUNK = 2**20
_UPLOAD_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}


class ModelService:
    """One model behind the API: prediction (concurrent) and Grad-CAM (serialised, on its own copy).

    Args:
        bundle: a loaded `ModelBundle`.
        model_id: the id written into responses and the log.
    """

    def __init__(self, bundle, model_id: str, checkpoint_sha256: str | None):
        self.bundle = bundle
        self.model_id = model_id
        self.checkpoint_sha256 = checkpoint_sha256
        self._explain_lock = threading.Lock()
        self._explain_bundle = None

    def predict(self, gray: np.ndarray) -> tuple[str, dict[str, float]]:
        """(predicted class, {class: probability}) for a decoded grayscale image."""
        from cxrlab.data.preprocess import prepare_array

        arr = np.array(prepare_array(gray, self.bundle.pre)[None])  # writable, for torch.as_tensor
        probs = self.bundle.probs(self.bundle.logits_for_arrays(arr, batch_size=1))
        return self._decision(probs[0])

    def _decision(self, p: np.ndarray) -> tuple[str, dict[str, float]]:
        from cxrlab.evaluate import decide

        names = self.bundle.class_names
        k = int(decide(np.asarray(p, dtype=np.float64)[None], self.bundle.ckpt)[0])
        return names[k], {c: float(p[i]) for i, c in enumerate(names)}

    def gradcam_problem(self) -> str | None:
        """Why Grad-CAM cannot run on this model (explain's own check: ONNX, and what else it refuses), or None."""
        from cxrlab.explain import gradcam_unavailable

        return gradcam_unavailable(self.bundle)

    def explain(self, gray: np.ndarray, target: str | None):
        """Grad-CAM result. Hooks are not thread-safe: one explanation at a time, on a private model copy
        so that concurrent predictions never run through the hooked model."""
        from cxrlab.explain import explain_array

        problem = self.gradcam_problem()
        if problem:
            raise CxrlabError(problem)
        with self._explain_lock:
            if self._explain_bundle is None:
                self._explain_bundle = dataclasses.replace(self.bundle, model=copy.deepcopy(self.bundle.model))
            return explain_array(self._explain_bundle, gray, target=target)

    def meta(self) -> dict:
        """What `/api/model` returns (JSON-safe)."""
        from cxrlab import __version__
        from cxrlab.checkpoint import model_meta

        ckpt = self.bundle.ckpt
        meta = model_meta(ckpt)
        problem = self.gradcam_problem()
        meta.update(model_id=self.model_id, checkpoint_sha256=self.checkpoint_sha256,
                    thresholds=ckpt.get("thresholds") or {}, version=meta.get("cxrlab_version"),
                    server_version=__version__, gradcam=problem is None, gradcam_unavailable=problem)
        return json.loads(json.dumps(meta, default=_json_default))


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _state_sha256(bundle) -> str:
    h = hashlib.sha256()
    for k, v in sorted(bundle.ckpt.get("state_dict", {}).items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if hasattr(v, "detach") else repr(v).encode())
    return h.hexdigest()


def load_service(checkpoint_or_bundle, device: str = "auto") -> ModelService:
    """A `ModelService` from a checkpoint path or an already loaded `ModelBundle`."""
    if isinstance(checkpoint_or_bundle, (str, os.PathLike)):
        from cxrlab.inference import load_model_bundle

        path = Path(checkpoint_or_bundle)
        bundle = load_model_bundle(path, device=device)
        sha = _file_sha256(path)
    else:
        bundle, sha = checkpoint_or_bundle, None
    digest = sha or _state_sha256(bundle)
    arch = bundle.ckpt.get("model", {}).get("name", "model")
    return ModelService(bundle, f"{arch}-{digest[:12]}", sha)


# ----------------------------------------------------------------------------- uploads


class _Upload:
    """An upload copied into a private temp folder while hashing and counting bytes."""

    def __init__(self, file: UploadFile, tmp_root: Path, max_bytes: int):
        suffix = Path(file.filename or "").suffix.lower()
        suffix = suffix if suffix in _UPLOAD_SUFFIXES else ""  # only a known suffix; never the name itself
        h, n = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(suffix=suffix, dir=tmp_root)
        self.path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for block in iter(lambda: file.file.read(_CHUNK), b""):
                    n += len(block)
                    if n > max_bytes:
                        raise HTTPException(413, too_large_message(max_bytes))
                    h.update(block)
                    out.write(block)
        except BaseException:
            self.close()
            raise
        self.sha256, self.size = h.hexdigest(), n

    def read(self) -> np.ndarray:
        from cxrlab.data.io import read_gray

        if self.size == 0:
            raise ImageReadError("upload", "empty file (0 bytes)")
        try:
            return read_gray(self.path)
        except ImageReadError as exc:  # the temp path means nothing to the client
            raise ImageReadError("upload", exc.reason) from None

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def too_large_message(max_bytes: int) -> str:
    """The 413 message, in the unit of the option that sets the limit."""
    return (f"the upload is larger than --max-upload-mb {max_bytes / 2**20:.3g} (MB): send a smaller file, "
            "or start the server with a larger --max-upload-mb")


async def _one_file(request: Request) -> None:
    """Refuse a request with several `file` parts (the form is already parsed and cached by FastAPI)."""
    n = len((await request.form()).getlist("file"))
    if n > 1:
        raise HTTPException(422, f"the multipart field 'file' was sent {n} times: send one image per request")


def image_warnings(gray: np.ndarray) -> list[str]:
    """Why a decoded upload does not look like a radiograph (tiny, blank, saturated, a mask), as `cxrlab predict`
    says it (`cxrlab.inference.input_warning`); empty when it looks plausible."""
    from cxrlab.inference import input_warning

    warning = input_warning(gray.shape[1], gray.shape[0], gray)
    return [warning] if warning else []


def _colorize(heatmap: np.ndarray) -> np.ndarray:
    """Heatmap (0..1) -> RGB uint8 with the jet colour map, the same size as the model input."""
    from matplotlib import colormaps

    h = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    return (colormaps["jet"](np.clip(h, 0, 1))[..., :3] * 255 + 0.5).astype(np.uint8)


def _png_bytes(arr) -> bytes:
    from PIL import Image

    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- errors


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"not found: {request.url.path}"
        return _error(exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg")))
        hint = " (send the image as multipart form field 'file')" if any("file" in p for p in parts) else ""
        return _error(422, "invalid request: " + "; ".join(parts) + hint)

    @app.exception_handler(ImageReadError)
    async def image_error(request: Request, exc: ImageReadError):
        return _error(422, f"cannot read the uploaded image: {exc.reason}")

    @app.exception_handler(CxrlabError)
    async def cxrlab_error(request: Request, exc: CxrlabError):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error ({type(exc).__name__}); the server log has the details")


# ----------------------------------------------------------------------------- the app


def create_app(checkpoint_or_bundle, token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               log_db: str | Path = DEFAULT_LOG_DB, device: str = "auto") -> FastAPI:
    """Build the service for one model.

    Args:
        checkpoint_or_bundle: a cxrlab checkpoint path (`.pt`/`.onnx`) or a loaded `ModelBundle`.
        token: when set, every `/api/*` route except `/api/health` needs `Authorization: Bearer TOKEN`.
        max_upload_bytes: largest accepted upload; larger ones get 413 while streaming in.
        log_db: SQLite prediction log (created if missing).
        device: `auto`, `cpu` or `cuda` (checkpoint paths only).

    Returns:
        The FastAPI app. Its private temp folder is removed at shutdown.
    """
    svc = load_service(checkpoint_or_bundle, device)
    plog = PredictionLog(log_db)
    tmp_root = Path(tempfile.mkdtemp(prefix="cxrlab-serve-"))  # mode 0700: private to this user
    app = FastAPI(title="cxrlab", version=svc.meta()["server_version"], docs_url=None, redoc_url=None,
                  description="Chest X-ray classifier service. Research use only: not for clinical use.",
                  on_shutdown=[lambda: shutil.rmtree(tmp_root, ignore_errors=True)])
    app.state.service, app.state.log, app.state.tmp_root = svc, plog, tmp_root
    _install_error_handlers(app)
    _add_routes(app, svc, plog, tmp_root, max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(Guard, token=token, max_body=max_upload_bytes + 16 * 1024,
                       too_large=too_large_message(max_upload_bytes))
    return app


def _add_routes(app: FastAPI, svc: ModelService, plog: PredictionLog, tmp_root: Path, max_upload: int) -> None:
    upload_doc = "radiograph: PNG, JPEG, BMP, TIFF or DICOM"

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC_DIR / "docs.html")

    @app.get("/api/health")
    def health() -> dict:
        """Liveness check (never needs the token)."""
        return {"status": "ok"}

    @app.get("/api/model")
    def model() -> dict:
        """Architecture, classes, input size, preprocessing and versions of the served model."""
        return svc.meta()

    @app.post("/api/predict", dependencies=[Depends(_one_file)])
    def predict(file: UploadFile = File(..., description=upload_doc)) -> dict:
        """Class probabilities for one radiograph; the entry is appended to the prediction log. `warnings` lists
    why the image may not be a radiograph (tiny, blank, saturated, a mask); empty when it looks plausible."""
        up = _Upload(file, tmp_root, max_upload)
        try:
            gray = up.read()
            predicted, probs = svc.predict(gray)
        finally:
            up.close()
        plog.append("predict", up.sha256, svc.model_id, predicted, probs)
        return {"predicted": predicted, "probabilities": probs, "model": svc.model_id, "sha256": up.sha256,
                "warnings": image_warnings(gray)}

    @app.post("/api/explain", responses={200: {"content": {"image/png": {}}}}, dependencies=[Depends(_one_file)])
    def explain(file: UploadFile = File(..., description=upload_doc),
                format: Literal["png", "json"] = Query("png", description="png: the overlay; json: probabilities too"),
                target: str | None = Query(None, description="class to explain (default: the predicted one)")):
        """Grad-CAM for one radiograph: a PNG figure (radiograph, overlay, probabilities), or with `format=json`
    the prediction plus base64 PNGs: `overlay_png_base64` (that figure), `image_png_base64` (the model input)
    and `heatmap_png_base64` (the coloured heatmap, same size as the model input, to lay over it), `warnings`
    (as in `/api/predict`) and `note` (for an ensemble: whose heatmap it is). `target` matches in any case."""
        from cxrlab.explain import overlay_png, target_class

        target = None if target is None else target_class(svc.bundle.class_names, target)  # any case: `pneumonia`
        up = _Upload(file, tmp_root, max_upload)
        try:
            gray = up.read()
            res = svc.explain(gray, target)
        finally:
            up.close()
        predicted, probs = svc._decision(np.array([res.probs[c] for c in svc.bundle.class_names]))
        plog.append("explain", up.sha256, svc.model_id, predicted, probs)
        png = overlay_png(res)
        warnings = [res.warning] if res.warning else []  # explain_array ran input_warning on the upload
        if format == "png":
            headers = {"X-Predicted": predicted, "X-Sha256": up.sha256}
            if warnings:
                headers["X-Warnings"] = " | ".join(warnings).encode("ascii", "replace").decode()
            return Response(png, media_type="image/png", headers=headers)
        b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
        return {"predicted": predicted, "probabilities": probs, "target": res.target, "model": svc.model_id,
                "sha256": up.sha256, "overlay_png_base64": b64(png), "image_png_base64": b64(_png_bytes(res.image)),
                "heatmap_png_base64": b64(_png_bytes(_colorize(res.heatmap))), "warnings": warnings,
                "note": res.note}

    @app.get("/api/history")
    def history(limit: int = Query(50, ge=1, le=1000, description="newest entries to list")) -> dict:
        """The newest entries of the prediction log, newest first."""
        return {"entries": plog.recent(limit), "total": plog.count()}


def app_from_env() -> FastAPI:
    """App factory for `uvicorn --factory` worker processes; `cxrlab serve --workers N` sets these variables."""
    env = os.environ
    return create_app(env["CXRLAB_SERVE_CHECKPOINT"], token=env.get("CXRLAB_SERVE_TOKEN") or None,
                      max_upload_bytes=int(env.get("CXRLAB_SERVE_MAX_UPLOAD", DEFAULT_MAX_UPLOAD)),
                      log_db=env.get("CXRLAB_SERVE_LOG_DB", DEFAULT_LOG_DB), device=env.get("CXRLAB_SERVE_DEVICE", "auto"))
