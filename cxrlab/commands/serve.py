"""`cxrlab serve`: web service and page for a checkpoint (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import os
import socket
from pathlib import Path

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

    from cxrlab.inference import check_device_for
    from cxrlab.serve.predlog import DEFAULT_LOG_DB, PredictionLog

    _check_options(args)
    check_device_for(args.checkpoint, args.device)
    log_db = args.log_db or DEFAULT_LOG_DB
    PredictionLog(log_db)  # a folder, a non-SQLite file or a read-only place: refused here, before anything loads
    _check_port(args.host, args.port)
    _warn_if_exposed(args.host, args.token)
    max_upload = int(args.max_upload_mb * 2**20)
    level = "warning" if args.quiet else "info"
    banner = f"cxrlab serve: http://{args.host}:{args.port}/  (API docs /docs, log {log_db}) - not for clinical use"
    if args.workers == 1:
        from cxrlab.serve.app import create_app

        app = create_app(args.checkpoint, token=args.token, max_upload_bytes=max_upload, log_db=log_db, device=args.device)
        print(banner, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=level)
        return 0
    os.environ.update(CXRLAB_SERVE_CHECKPOINT=os.path.abspath(args.checkpoint), CXRLAB_SERVE_TOKEN=args.token or "",
                      CXRLAB_SERVE_MAX_UPLOAD=str(max_upload), CXRLAB_SERVE_LOG_DB=os.path.abspath(log_db),
                      CXRLAB_SERVE_DEVICE=args.device)
    from cxrlab.inference import load_model_bundle

    load_model_bundle(args.checkpoint, device="cpu")  # fail here, once, with a clear message
    print(banner, flush=True)
    uvicorn.run("cxrlab.serve.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=level)
    return 0


def _check_options(args) -> None:
    """Each bad option named with what was given; the checkpoint must be a file."""
    from cxrlab.errors import CxrlabError

    bad = []
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        bad.append(f"--max-upload-mb must be a number > 0, got {args.max_upload_mb:g}")
    if args.workers < 1:
        bad.append(f"--workers must be >= 1, got {args.workers}")
    if not 1 <= args.port <= 65535:
        why = " (0, a random port, is not supported: pass a free port)" if args.port == 0 else ""
        bad.append(f"--port must be in 1..65535, got {args.port}{why}")
    if bad:
        raise CxrlabError("; ".join(bad))
    path = Path(args.checkpoint)
    if path.is_dir():
        hint = f": pass --checkpoint {path / 'best.pt'}" if (path / "best.pt").is_file() else ""
        raise CxrlabError(f"--checkpoint {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CxrlabError(f"--checkpoint {path} does not exist: pass a cxrlab checkpoint (e.g. RUN/best.pt) "
                          "or an exported .onnx")


def _check_port(host: str, port: int) -> None:
    """Bind the address once before the model loads, so that a busy port is named at once (uvicorn would say so
    only after loading, with exit code 3)."""
    from cxrlab.errors import CxrlabError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a TIME_WAIT port is free
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CxrlabError(f"port {port} on {host} is in use: pass another --port") from None
            if exc.errno == errno.EACCES:
                raise CxrlabError(f"port {port} on {host} needs administrator rights: pass --port 1024 or higher") from None
            raise CxrlabError(f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}. "
                              "Pass an address of this machine with --host (default 127.0.0.1)") from None


def _warn_if_exposed(host: str, token: str | None) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        log.warning("binding %s without --token: anyone who can reach this address can use the API", host)
