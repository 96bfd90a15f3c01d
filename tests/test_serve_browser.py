"""The web page in a real browser: Debian Chromium driven by Playwright against a live uvicorn server."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser
if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip(f"browser test needs Debian chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs the playwright package (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn")

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _live(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.train import fit

    root = tmp_path_factory.mktemp("browser")
    generate(root / "d", per_class=10, size=48)
    fit(TrainConfig(model="custom_cnn", epochs=1, img_size=48, batch_size=16, report=False, cache=False,
                    out=str(root / "run"), data=str(root / "d")), progress=False)
    return root


@pytest.fixture(scope="module")
def server(trained):
    from cxrlab.serve.app import create_app

    with _live(create_app(trained / "run" / "best.pt", log_db=trained / "log.sqlite", device="cpu")) as url:
        yield url, trained


@contextlib.contextmanager
def _page(url: str):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(url + "/")
            yield page
        finally:
            browser.close()


def test_raw_path_traversal_on_live_server(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    for path in ("/../../etc/passwd", "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd"):
        con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        con.request("GET", path)  # http.client sends the path as is (no dot-segment normalisation)
        r = con.getresponse()
        body = r.read()
        con.close()
        assert r.status in (400, 404) and b"root:" not in body, (path, r.status)


def test_page_upload_bars_overlay_slider(server, tmp_path):
    url, root = server
    image = next((root / "d" / "test" / "PNEUMONIA").glob("*.png"))
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url + "/")
            notice = page.locator("#notice")
            assert notice.is_visible() and "not for clinical use" in notice.inner_text().lower()
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#bars .bar", timeout=60_000)
            assert page.locator("#bars .bar").count() == 3
            assert page.locator("#bars .bar.top").count() == 1
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
            page.wait_for_function("document.getElementById('base').naturalWidth > 0", timeout=30_000)
            assert page.locator("#overlay").is_visible() and page.locator("#base").is_visible()
            page.locator("#opacity").fill("25")
            assert page.eval_on_selector("#overlay", "e => getComputedStyle(e).opacity") == "0.25"
            assert page.locator("#opacity-value").inner_text() == "25%"
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # a non-image shows the API's error readably
            bad = tmp_path / "notes.png"
            bad.write_text("not an image at all\n")
            page.set_input_files("#file", str(bad))
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            err = page.locator("#error").inner_text()
            assert "422" in err and "not an image" in err
            page.screenshot(path=str(tmp_path / "page_error.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert all(u.startswith(url) or u.startswith("data:") or u.startswith("blob:") for u in requests), requests


def test_onnx_model_shows_the_prediction_without_heatmap(trained, tmp_path):
    """An ONNX model has no Grad-CAM: the page learns it from /api/model, calls /api/predict, shows the bars and a
    note instead of the heatmap and its slider."""
    from cxrlab.export import export_onnx
    from cxrlab.serve.app import create_app

    onnx_path = export_onnx(trained / "run" / "best.pt", tmp_path / "m.onnx").path
    image = next((trained / "d" / "test" / "NORMAL").glob("*.png"))
    posts = []
    with _live(create_app(onnx_path, log_db=tmp_path / "log.sqlite", device="cpu")) as url, _page(url) as page:
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        sync_api.expect(page.locator("#model-info")).to_contain_text("no Grad-CAM", timeout=30_000)
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#bars .bar", timeout=60_000)
        assert page.locator("#results").is_visible() and page.locator("#bars .bar.top").count() == 1
        assert page.locator("#error").is_hidden()
        note = page.locator("#cam-note")
        assert note.is_visible() and "PyTorch checkpoint (.pt)" in note.inner_text()
        assert page.locator("#opacity-label").is_hidden() and page.locator("#stack").is_hidden()
        page.screenshot(path=str(tmp_path / "onnx_page.png"), full_page=True)
    assert posts and all(u.endswith("/api/predict") for u in posts), posts


def test_token_entered_later_same_file_twice_keyboard_and_warnings(trained, tmp_path):
    """A server with --token: the page asks for it, reloads the model info once it is entered; the same file can be
    chosen twice; Enter on the drop zone opens the file chooser; a blank image shows its warning."""
    import numpy as np
    from PIL import Image

    from cxrlab.serve.app import create_app

    image = next((trained / "d" / "test" / "PNEUMONIA").glob("*.png"))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank)
    posts = []
    app = create_app(trained / "run" / "best.pt", token="s3cret", log_db=tmp_path / "log.sqlite", device="cpu")
    with _live(app) as url, _page(url) as page:
        page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
        sync_api.expect(page.locator("#model-info")).to_contain_text("access token", timeout=30_000)
        assert page.locator("#token").is_visible()
        page.fill("#token", "s3cret")
        page.press("#token", "Enter")
        sync_api.expect(page.locator("#model-info")).to_contain_text("custom_cnn-", timeout=30_000)
        for n in (1, 2):  # the same file twice: two analyses
            page.set_input_files("#file", str(image))
            sync_api.expect(page.locator("#status")).to_contain_text(f"{image.name}:", timeout=60_000)
            assert len(posts) == n, posts
            page.evaluate("() => { document.getElementById('status').textContent = ''; }")
        assert page.locator("#warnings-box").is_hidden() and page.locator("#opacity-label").is_visible()
        page.set_input_files("#file", str(blank))
        page.wait_for_selector("#warnings-box:not([hidden])", timeout=30_000)
        assert "constant" in page.locator("#warnings").inner_text()
        page.evaluate("""() => document.getElementById('file').addEventListener('click', (e) => {
            window.chooserOpened = (window.chooserOpened || 0) + 1; e.preventDefault(); })""")
        page.focus("#drop")
        page.keyboard.press("Enter")
        page.keyboard.press(" ")
        assert page.evaluate("() => window.chooserOpened") == 2  # Enter and Space open the file chooser
        page.focus("#token")
        page.keyboard.press(" ")  # typing in the token field inside the zone does not
        assert page.evaluate("() => window.chooserOpened") == 2
