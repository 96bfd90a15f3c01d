"""`cxrlab serve`: web service and page for a checkpoint (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="cxrlab checkpoint (.pt) or exported model (.onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("CXRLAB_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on /api/* except /api/health (default: $CXRLAB_TOKEN)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (larger: 413)")
    p.add_argument("--log-db", default=None, help="SQLite prediction log (default ./cxrlab_predictions.sqlite)")
    p.add_argument("--workers", type=int, default=1, help="server processes, each with its own model copy")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args) -> int:
    import uvicorn

    from cxrlab.errors import CxrlabError
    from cxrlab.serve.predlog import DEFAULT_LOG_DB

    if args.max_upload_mb <= 0 or args.workers < 1 or not 0 <= args.port < 65536:
        raise CxrlabError("--max-upload-mb must be > 0, --workers >= 1 and --port in 0..65535")
    from cxrlab.inference import check_device_for

    check_device_for(args.checkpoint, args.device)
    _warn_if_exposed(args.host, args.token)
    max_upload = int(args.max_upload_mb * 2**20)
    log_db = args.log_db or DEFAULT_LOG_DB
    print(f"cxrlab serve: http://{args.host}:{args.port}/  (API docs /docs, log {log_db}) - not for clinical use")
    if args.workers == 1:
        from cxrlab.serve.app import create_app

        app = create_app(args.checkpoint, token=args.token, max_upload_bytes=max_upload, log_db=log_db, device=args.device)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
        return 0
    os.environ.update(CXRLAB_SERVE_CHECKPOINT=os.path.abspath(args.checkpoint), CXRLAB_SERVE_TOKEN=args.token or "",
                      CXRLAB_SERVE_MAX_UPLOAD=str(max_upload), CXRLAB_SERVE_LOG_DB=os.path.abspath(log_db),
                      CXRLAB_SERVE_DEVICE=args.device)
    from cxrlab.inference import load_model_bundle

    load_model_bundle(args.checkpoint, device="cpu")  # fail here, once, with a clear message
    uvicorn.run("cxrlab.serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="warning" if args.quiet else "info")
    return 0


def _warn_if_exposed(host: str, token: str | None) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        log.warning("binding %s without --token: anyone who can reach this address can use the API", host)
