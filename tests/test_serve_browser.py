"""The web page in a real browser: Debian Chromium driven by Playwright against a live uvicorn server."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cxrlab.config import TrainConfig
    from cxrlab.data.synth import generate
    from cxrlab.serve.app import create_app
    from cxrlab.train import fit

    root = tmp_path_factory.mktemp("browser")
    generate(root / "d", per_class=10, size=48)
    fit(TrainConfig(model="custom_cnn", epochs=1, img_size=48, batch_size=16, report=False, cache=False,
                    out=str(root / "run"), data=str(root / "d")), progress=False)
    app = create_app(root / "run" / "best.pt", log_db=root / "log.sqlite", device="cpu")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    srv.should_exit = True
    thread.join(10)


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
