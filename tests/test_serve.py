"""The web service: every endpoint, bad uploads, limits, token, the prediction log under concurrency."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sqlite3
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit

    root = tmp_path_factory.mktemp("serve")
    generate(root / "d", per_class=10, size=48)
    cfg = TrainConfig(model="custom_cnn", epochs=1, img_size=48, batch_size=16, report=False, cache=False,
                      out=str(root / "run"), data=str(root / "d"))
    fit(cfg, progress=False)
    return root


@pytest.fixture(scope="module")
def ckpt(trained):
    return trained / "run" / "best.pt"


@pytest.fixture(scope="module")
def client(ckpt, trained):
    from cxrlab.serve.app import create_app

    app = create_app(ckpt, log_db=trained / "log.sqlite", device="cpu")
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def png(trained) -> bytes:
    path = next((trained / "d" / "test").rglob("*.png"))
    return path.read_bytes()


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A real decompression bomb: a valid `side` x `side` 8-bit PNG of zeros (~400 KB compressed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    rows_per_block = 256
    for start in range(0, side, rows_per_block):
        parts.append(comp.compress(row * min(rows_per_block, side - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _post(client, data: bytes, name="x.png", path="/api/predict", **kw):
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, **kw)


def test_health_model_and_pages(client):
    assert client.get("/api/health").json() == {"status": "ok"}
    m = client.get("/api/model").json()
    assert m["architecture"] == "custom_cnn" and m["img_size"] == 48
    assert m["class_names"] == ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    assert m["model_id"].startswith("custom_cnn-") and m["version"]
    page = client.get("/")
    assert page.status_code == 200 and "not for clinical use" in page.text.lower()
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")  # no CDN assets in <head>
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200 and "/openapi.json" in client.get("/docs").text
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/explain", "/api/history", "/api/model", "/api/health"} <= set(spec["paths"])


def test_predict_png_and_jpeg(client, png):
    for data, name in ((png, "a.png"), (_jpeg(png), "b.jpg"), (png, "../../etc/passwd")):
        r = _post(client, data, name)
        assert r.status_code == 200, r.text
        body = r.json()
        probs = body["probabilities"]
        assert abs(sum(probs.values()) - 1) < 1e-4
        assert body["predicted"] == max(probs, key=probs.get)
        assert body["sha256"] == hashlib.sha256(data).hexdigest()
        assert body["model"] == client.get("/api/model").json()["model_id"]


def test_explain_png_and_json(client, png):
    r = _post(client, png, path="/api/explain")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    r = _post(client, png, path="/api/explain?format=json&target=PNEUMONIA")
    body = r.json()
    assert r.status_code == 200 and body["target"] == "PNEUMONIA"
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    for key in ("overlay_png_base64", "image_png_base64", "heatmap_png_base64"):
        assert base64.b64decode(body[key]).startswith(b"\x89PNG")
    img = Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"])))
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    assert img.size == heat.size == (48, 48)
    bad = _post(client, png, path="/api/explain?target=NOPE")
    assert bad.status_code == 400 and "NOPE" in bad.json()["error"]


def test_bad_uploads_are_4xx_json(client, png):
    cases = {
        "random": np.random.default_rng(0).bytes(5000),
        "empty": b"",
        "truncated jpeg": _jpeg(png)[:300],
        "text": b"hello, this is not an image\n" * 10,
        "bomb": _bomb_png(),
    }
    for what, data in cases.items():
        for path in ("/api/predict", "/api/explain"):
            r = _post(client, data, "x.png", path=path)
            assert 400 <= r.status_code < 500, (what, path, r.status_code, r.text)
            err = r.json()["error"]
            assert isinstance(err, str) and err, what
            assert "/tmp" not in err  # the temp file's path is never shown
    assert "Mpx" in _post(client, cases["bomb"]).json()["error"]
    assert "empty" in _post(client, b"").json()["error"]
    missing = client.post("/api/predict", data={"other": "1"})
    assert missing.status_code == 422 and "file" in missing.json()["error"]
    assert client.get("/api/health").json() == {"status": "ok"}  # still alive


def test_upload_limit_413(ckpt, trained, png):
    from cxrlab.serve.app import create_app

    app = create_app(ckpt, max_upload_bytes=len(png) - 1, log_db=trained / "limit.sqlite", device="cpu")
    with TestClient(app) as c:
        over_file = _post(c, png)  # envelope fits the body limit; the file itself is counted while copied
        assert over_file.status_code == 413 and "--max-upload-mb" in over_file.json()["error"]
        huge = _post(c, b"\0" * (len(png) + 200_000))  # Content-Length over the limit: refused before reading
        assert huge.status_code == 413 and "--max-upload-mb" in huge.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(50):
                yield b"\0" * 10_000

        streamed = c.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413
        assert _post(c, png[: len(png) - 1]).status_code == 200  # exactly at the limit: accepted (decodes)


def test_token(ckpt, trained, png):
    from cxrlab.serve.app import create_app

    app = create_app(ckpt, token="s3cret", log_db=trained / "token.sqlite", device="cpu")
    with TestClient(app) as c:
        assert c.get("/api/health").status_code == 200
        for r in (c.get("/api/model"), c.get("/api/history"), _post(c, png),
                  c.get("/api/model", headers={"Authorization": "Bearer wrong"})):
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "token" in r.json()["error"]
        ok = _post(c, png, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/api/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself is public; it asks for the token


def test_history_and_cli(client, png, trained, capsys):
    from cxrlab.cli import main

    _post(client, png)
    r = client.get("/api/history?limit=2").json()
    assert len(r["entries"]) == 2 and r["total"] >= 2
    e = r["entries"][0]
    assert e["sha256"] == hashlib.sha256(png).hexdigest() and e["endpoint"] == "predict"
    assert e["time"].endswith("+00:00") and set(e["probabilities"]) == {"NORMAL", "PNEUMONIA", "TUBERCULOSIS"}
    assert client.get("/api/history?limit=0").status_code == 422
    assert main(["history", "--log-db", str(trained / "log.sqlite"), "--limit", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(["history", "--log-db", str(trained / "log.sqlite")]) == 0
    assert "entries in" in capsys.readouterr().out
    assert main(["history", "--log-db", str(trained / "missing.sqlite")]) == 2


def test_concurrent_predictions_all_logged(ckpt, trained, png):
    from cxrlab.serve.app import create_app

    db = trained / "concurrent.sqlite"
    app = create_app(ckpt, log_db=db, device="cpu")
    with TestClient(app) as c:
        def work(i):
            return [_post(c, png).status_code for _ in range(5)]

        with ThreadPoolExecutor(16) as pool:
            codes = [s for batch in pool.map(work, range(16)) for s in batch]
    assert codes == [200] * 80
    con = sqlite3.connect(db)
    rows = con.execute("SELECT sha256, model, predicted, probabilities, time FROM predictions").fetchall()
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert len(rows) == 80
    sha = hashlib.sha256(png).hexdigest()
    for s, _model, pred, probs, _t in rows:
        p = json.loads(probs)
        assert s == sha and pred in p and abs(sum(p.values()) - 1) < 1e-4


def test_no_path_traversal(client):
    for path in ("/../../etc/passwd", "/static/../../../etc/passwd", "/static/..%2f..%2f..%2fetc/passwd",
                 "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static//etc/passwd", "/static/../app.py",
                 "/static/..%2fapp.py"):
        r = client.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert "root:" not in r.text and "create_app" not in r.text
    assert client.get("/nope").json()["error"].startswith("not found")


def test_serve_an_ensemble_exported_to_onnx(ckpt, trained, png):
    """An ensemble .pt and its one-graph ONNX export answer with the same probabilities; Grad-CAM needs the .pt
    (/api/model's `gradcam` says so), and explains the ensemble's first member."""
    from cxrlab.checkpoint import load_checkpoint, save_checkpoint
    from cxrlab.ensemble import build_ensemble
    from cxrlab.export import export_onnx
    from cxrlab.serve.app import create_app

    warm = {k: v for k, v in load_checkpoint(ckpt).items() if k not in ("format_version", "cxrlab_version")}
    save_checkpoint({**warm, "temperature": 2.5}, trained / "soft.pt")  # a member that answers differently
    save_checkpoint(build_ensemble([ckpt, trained / "soft.pt"], [3, 1]), trained / "ens.pt")
    onnx_path = export_onnx(trained / "ens.pt", trained / "ens.onnx").path
    answers = {}
    for name, model in (("pt", trained / "ens.pt"), ("onnx", onnx_path)):
        with TestClient(create_app(model, log_db=trained / f"ens_{name}.sqlite", device="cpu")) as c:
            assert c.get("/api/model").json()["architecture"] == "ensemble"
            r = _post(c, png)
            assert r.status_code == 200, r.text
            answers[name] = r.json()
            gradcam = c.get("/api/model").json()["gradcam"]
            r = _post(c, png, path="/api/explain?format=json")
            if name == "onnx":
                assert not gradcam and r.status_code == 400 and "PyTorch checkpoint" in r.text
            else:  # explain.py: the first member's Grad-CAM, the ensemble's probabilities, and a note saying so
                assert gradcam and r.status_code == 200, r.text
                assert "member 0 of 2" in r.json()["note"]
                assert r.json()["probabilities"] == pytest.approx(answers["pt"]["probabilities"], abs=1e-6)
    a, b = answers["pt"]["probabilities"], answers["onnx"]["probabilities"]
    assert answers["pt"]["predicted"] == answers["onnx"]["predicted"]
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4


# ----------------------------------------------------------------------------- QA fixes


@pytest.fixture(scope="module")
def onnx_model(ckpt, trained):
    from cxrlab.export import export_onnx

    return export_onnx(ckpt, trained / "single.onnx").path


def _png_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_model_says_whether_gradcam_works(client, onnx_model, trained, png):
    """The page decides between /api/explain and /api/predict from /api/model's `gradcam`."""
    from cxrlab.serve.app import create_app

    m = client.get("/api/model").json()
    assert m["gradcam"] is True and m["gradcam_unavailable"] is None
    with TestClient(create_app(onnx_model, log_db=trained / "onnx.sqlite", device="cpu")) as c:
        m = c.get("/api/model").json()
        assert m["gradcam"] is False and "PyTorch checkpoint (.pt)" in m["gradcam_unavailable"]
        r = _post(c, png, path="/api/explain?format=json")
        assert r.status_code == 400 and r.json()["error"] == m["gradcam_unavailable"]
        assert _post(c, png).status_code == 200  # the prediction the page falls back on
    js = client.get("/static/app.js").text
    assert "gradcam" in js and "/api/predict" in js and "/api/explain?format=json" in js


def test_page_asks_for_token_and_reloads_model_info(client):
    """The page: model info again once a token is entered, the same file can be chosen twice, Enter opens the
    chooser, the slider is hidden without a heatmap, warnings are shown (the browser test drives these)."""
    js, html = client.get("/static/app.js").text, client.get("/").text
    assert '$("token").addEventListener("change", loadModel)' in js
    assert "enter it under" in js and "resp.status === 401" in js
    assert 'e.target.value = ""' in js
    assert 'e.key === "Enter"' in js and '$("file").click()' in js
    for el in ('id="opacity-label"', 'id="cam-note"', 'id="warnings"'):
        assert el in html


def _serve_cli(args, monkeypatch, capsys):
    """`cxrlab serve ARGS` with uvicorn and model loading replaced: (exit code, stdout, stderr, was the app built)."""
    import uvicorn

    import cxrlab.serve.app as serve_app
    from cxrlab.cli import main

    built = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    monkeypatch.setattr(serve_app, "create_app", lambda *a, **k: built.append(a) or object())
    code = main(["serve", *map(str, args), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err, bool(built)


def test_serve_checks_options_checkpoint_and_log_before_the_banner(ckpt, trained, monkeypatch, capsys):
    cases = [
        (["--checkpoint", trained / "missing.pt"], "--checkpoint"),
        (["--checkpoint", trained / "run"], "pass --checkpoint"),
        (["--checkpoint", ckpt, "--log-db", trained], "--log-db"),
        (["--checkpoint", ckpt, "--log-db", ckpt], "not a cxrlab prediction log"),
        (["--checkpoint", ckpt, "--max-upload-mb", "0"], "--max-upload-mb must be"),
        (["--checkpoint", ckpt, "--workers", "0"], "--workers must be >= 1, got 0"),
        (["--checkpoint", ckpt, "--port", "70000"], "--port must be in 1..65535, got 70000"),
        (["--checkpoint", ckpt, "--port", "0"], "got 0"),
    ]
    for args, says in cases:
        code, out, err, built = _serve_cli(args, monkeypatch, capsys)
        assert code == 2 and says in err, (args, err)
        assert "cxrlab serve:" not in out and not built, args
    assert "folder" in _serve_cli(["--checkpoint", ckpt, "--log-db", trained], monkeypatch, capsys)[2]
    code, out, err, built = _serve_cli(["--checkpoint", ckpt, "--port", 8123, "--log-db", trained / "cli.sqlite"],
                                       monkeypatch, capsys)
    assert code == 0 and built and "http://127.0.0.1:8123/" in out


def test_serve_refuses_a_busy_port_before_loading(ckpt, trained, monkeypatch, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err, built = _serve_cli(["--checkpoint", ckpt, "--port", port, "--log-db", trained / "busy.sqlite"],
                                           monkeypatch, capsys)
    assert code == 2 and f"port {port} on 127.0.0.1 is in use: pass another --port" in err
    assert not built and "cxrlab serve:" not in out


def test_413_names_the_option_and_two_files_are_refused(ckpt, trained, png, client):
    from cxrlab.serve.app import create_app

    with TestClient(create_app(ckpt, max_upload_bytes=2**20, log_db=trained / "mb.sqlite", device="cpu")) as c:
        for size in (2**20 + 100, 2**20 + 100_000):  # the file counted while copied; Content-Length over the limit
            r = _post(c, b"\0" * size)
            assert r.status_code == 413
            assert r.json()["error"].startswith("the upload is larger than --max-upload-mb 1 (MB)"), r.json()
    for path in ("/api/predict", "/api/explain"):
        r = client.post(path, files=[("file", ("a.png", png)), ("file", ("b.png", png))])
        assert r.status_code == 422 and "'file'" in r.json()["error"] and "2 times" in r.json()["error"]


def test_thresholds_empty_dict_and_target_any_case(client, png):
    assert client.get("/api/model").json()["thresholds"] == {}  # as docs/INFERENCE.md says: {} when none
    r = _post(client, png, path="/api/explain?format=json&target=pneumonia")
    assert r.status_code == 200, r.text
    assert r.json()["target"] == "PNEUMONIA"


def test_degenerate_images_come_with_warnings(client, png):
    images = {"constant": np.full((64, 64), 128, np.uint8), "black": np.zeros((64, 64), np.uint8),
              "1x1": np.full((1, 1), 77, np.uint8)}
    for name, arr in images.items():
        for path in ("/api/predict", "/api/explain?format=json"):
            r = _post(client, _png_of(arr), path=path)
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            assert body["warnings"] and all(isinstance(w, str) for w in body["warnings"]), (name, path)
            assert {"predicted", "probabilities", "model", "sha256"} <= set(body)
    assert "tiny" in _post(client, _png_of(images["1x1"])).json()["warnings"][0]
    assert "constant" in _post(client, _png_of(images["black"])).json()["warnings"][0]
    assert _post(client, png).json()["warnings"] == []
    r = _post(client, _png_of(images["constant"]), path="/api/explain")
    assert "constant" in r.headers["x-warnings"]


def test_history_on_a_non_database_says_read_not_write(ckpt, trained, capsys):
    from cxrlab.cli import main

    assert main(["history", "--log-db", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "not a cxrlab prediction log" in err and "writable" not in err
    empty = trained / "empty.sqlite"
    empty.write_bytes(b"")
    assert main(["history", "--log-db", str(empty)]) == 2
    assert "not a cxrlab prediction log" in capsys.readouterr().err and empty.stat().st_size == 0  # nothing written
