"""Load test of `cxrlab serve`: N client threads POST /api/predict for a fixed time.

Starts the real server (`python -m cxrlab serve`, a separate process) on a random 127.0.0.1 port,
waits for /api/health, runs the clients, stops the server, and checks that the SQLite log holds
exactly one row per successful request. Without --checkpoint a small custom_cnn is trained on
synthetic data first (at its default input size, 224 px).

    python bench/serve_load.py --clients 8 --seconds 30 [--checkpoint best.pt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(work: Path) -> tuple[Path, Path]:
    """Train custom_cnn for one epoch on a small phantom set; returns (checkpoint, a test image)."""
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit

    generate(work / "d", per_class=12, size=256)
    fit(TrainConfig(model="custom_cnn", epochs=1, img_size=224, batch_size=16, report=False, cache=False,
                    out=str(work / "run"), data=str(work / "d")), progress=False)
    return work / "run" / "best.pt", next((work / "d" / "test").rglob("*.png"))


def start_server(ckpt: Path, port: int, db: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxrlab", "serve", "--checkpoint", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--log-db", str(db), "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become healthy within 120 s")


def client(url: str, image: bytes, stop_at: float, latencies: list, errors: list, lock: threading.Lock) -> None:
    with httpx.Client(timeout=60) as c:
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                r = c.post(url, files={"file": ("x.png", image, "image/png")})
                ok = r.status_code == 200
                err = None if ok else f"{r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                ok, err = False, f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            with lock:
                (latencies.append(dt) if ok else errors.append(err))


def run_load(ckpt: Path, image: Path, clients: int, seconds: float, db: Path) -> dict:
    port = free_port()
    proc = start_server(ckpt, port, db)
    data = image.read_bytes()
    url = f"http://127.0.0.1:{port}/api/predict"
    try:
        httpx.post(url, files={"file": ("x.png", data, "image/png")}, timeout=60)  # warm-up (logged too)
        latencies, errors, lock = [], [], threading.Lock()
        stop_at = time.time() + seconds
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(url, data, stop_at, latencies, errors, lock)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    con = sqlite3.connect(db)
    rows = con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] - 1  # minus the warm-up
    con.close()
    lat = np.array(latencies) * 1000
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(latencies), "errors": len(errors),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "log_rows": rows, "log_ok": rows == len(latencies), "image_bytes": len(data),
            "checkpoint": str(ckpt), "first_errors": errors[:3],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible, {platform.python_version()}",
            "date": datetime.now(timezone.utc).date().isoformat()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: train a tiny custom_cnn)")
    ap.add_argument("--image", help="radiograph to send (default: a synthetic one)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxrlab-serve-load-") as tmp:
        work = Path(tmp)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
            image = Path(args.image) if args.image else _synthetic_image(work)
        else:
            print("training a tiny custom_cnn (224 px) on synthetic data...", file=sys.stderr)
            ckpt, image = tiny_checkpoint(work)
            image = Path(args.image) if args.image else image
        result = run_load(ckpt, image, args.clients, args.seconds, work / "log.sqlite")
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["errors"] == 0 and result["log_ok"] else 1


def _synthetic_image(work: Path) -> Path:
    from cxrlab.data.synth import generate

    generate(work / "img", per_class=1, size=256)
    return next((work / "img").rglob("*.png"))


if __name__ == "__main__":
    sys.exit(main())
