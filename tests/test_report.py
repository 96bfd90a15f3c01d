"""Plots and report.html drawn from a synthetic run folder (no torch, a few seconds)."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab import plots
from cxrlab.camnames import cam_name, parse_cam_name
from cxrlab.errors import CxrlabError
from cxrlab.metrics import compute_metrics, expected_calibration_error
from cxrlab.report import PLOTS, build_report, draw_all, read_predictions, write_html_report

CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


# ---------------------------------------------------------------- fake run folder helpers


def write_predictions(folder: Path, y_true, probs, classes, error_rows: int = 1) -> None:
    """predictions.csv pointing at small generated PNGs under folder/images (+ error rows)."""
    (folder / "images").mkdir(exist_ok=True)
    with (folder / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "pred", *(f"prob_{c}" for c in classes), "error"])
        for i, (t, p) in enumerate(zip(y_true, probs)):
            img = np.full((48, 64), 40 + 60 * t, np.uint8)
            img[8 + i % 20 : 20 + i % 20, 10:30] = 250
            Image.fromarray(img).save(folder / "images" / f"img{i:03d}.png")
            w.writerow([f"images/img{i:03d}.png", classes[t], classes[int(p.argmax())], *(f"{v:.6f}" for v in p), ""])
        for i in range(error_rows):
            w.writerow([f"images/broken{i}.png", classes[0], "", *([""] * len(classes)), "cannot identify image file"])


def synthetic_probs(y_true: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y_true), n_classes))
    logits[np.arange(len(y_true)), y_true] += 1.5
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def make_run_folder(folder: Path, history: bool = True) -> dict:
    """A run folder: history (5 epochs), metrics consistent with 30 predictions, cams, config."""
    folder.mkdir(parents=True, exist_ok=True)
    y = np.repeat(np.arange(3), 10)
    probs = synthetic_probs(y, 3)
    write_predictions(folder, y, probs, CLASSES)
    m = compute_metrics(y, probs, CLASSES)
    m["ci95"] = {"accuracy": [0.41, 0.79], "macro_f1": [0.4, 0.8], "auc_macro": None, "recall_NORMAL": [0.3, 0.9]}
    m["calibration"] = {"temperature": 1.37, "ece_before": 0.123, "ece_after": 0.045}
    m["operating_points"] = {"PNEUMONIA": {"threshold": 0.3, "sensitivity": 0.9, "specificity": 0.7},
                             "TUBERCULOSIS": {"threshold": 0.25, "sensitivity": 1.0, "specificity": 0.85}}
    m["operating_point"] = {"class": "PNEUMONIA", **m["operating_points"]["PNEUMONIA"]}
    m["groups"] = {"site<A>": compute_metrics(y[:15], probs[:15], CLASSES), "siteB": compute_metrics(y[15:], probs[15:], CLASSES)}
    (folder / "metrics.json").write_text(json.dumps(m))
    if history:
        with (folder / "history.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"])
            for e in range(1, 6):
                w.writerow([e, 1.2 / e, 0.5 + e / 20, 1.3 / e, 0.45 + e / 20, "" if e == 1 else 0.6 + e / 20, 1e-3 * 0.5**e, 3.2])
    (folder / "config.yaml").write_text("model: resnet18\nepochs: 5\nnote: '<script>alert(1)</script>'\n")
    (folder / "data_summary.json").write_text(json.dumps({"train": {c: 50 for c in CLASSES}, "test": {c: 10 for c in CLASSES}}))
    cam = folder / "cam"
    cam.mkdir(exist_ok=True)
    overlay = Image.new("RGB", (64, 64), (200, 60, 30))
    for name in (cam_name(1, "NORMAL", "NORMAL", "img000"), cam_name(3, "NORMAL", "NORMAL", "img000"),
                 cam_name(3, "PNEUMONIA", "NORMAL", "img011"), "notes.png"):
        overlay.save(cam / name)
    (folder / "explain").mkdir(exist_ok=True)
    overlay.save(folder / "explain" / "img020_cam.png")
    return m


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("run")
    metrics = make_run_folder(folder)
    build_report(folder)
    return folder, metrics


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def img_srcs(page: str) -> list[str]:
    parser = _Imgs()
    parser.feed(page)
    return parser.srcs


def assert_image(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= 300 and im.height >= 200, (path.name, im.size)


# ---------------------------------------------------------------- plots


def test_draw_all_writes_every_plot(run_dir):
    folder, _ = run_dir
    for name in PLOTS:
        assert_image(folder / name)


def test_eval_folder_without_history(tmp_path):
    make_run_folder(tmp_path, history=False)
    shutil.rmtree(tmp_path / "cam")
    written = {p.name for p in draw_all(tmp_path)}
    assert written == set(PLOTS) - {"history.png"}
    page = write_html_report(tmp_path).read_text()
    assert "No Grad-CAM" not in page and "img020" in page  # explain output still shown


@pytest.mark.parametrize("classes", [["NEG", "POS"], CLASSES])
def test_class_without_samples(tmp_path, classes):
    y = np.array([0] * 10 + [len(classes) - 2] * 5)  # the last class never occurs
    probs = synthetic_probs(y, len(classes))
    write_predictions(tmp_path, y, probs, classes, error_rows=0)
    (tmp_path / "metrics.json").write_text(json.dumps(compute_metrics(y, probs, classes)))
    written = {p.name for p in draw_all(tmp_path)}
    assert {"confusion.png", "roc.png", "pr.png", "samples.png", "per_class.png"} <= written
    assert all(c in write_html_report(tmp_path).read_text() for c in classes)


def test_predictions_only_and_missing_images(tmp_path):
    y = np.array([0, 1, 1, 0, 1])
    write_predictions(tmp_path, y, synthetic_probs(y, 2), ["A", "B"], error_rows=2)
    shutil.rmtree(tmp_path / "images")  # thumbnails become placeholders
    assert read_predictions(tmp_path / "predictions.csv").skipped == 2
    written = {p.name for p in draw_all(tmp_path)}
    assert written == {"confusion.png", "roc.png", "pr.png", "samples.png"}


def test_unlabelled_predictions_need_no_curves(tmp_path):
    (tmp_path / "predictions.csv").write_text("path,pred,prob_A,prob_B,error\na.png,A,0.9,0.1,\n")
    assert read_predictions(tmp_path / "predictions.csv") is None
    assert draw_all(tmp_path) == []
    assert "No plots" in write_html_report(tmp_path).read_text()


def test_no_inputs_is_a_clear_error(tmp_path):
    with pytest.raises(CxrlabError, match="metrics.json"):
        draw_all(tmp_path)
    with pytest.raises(CxrlabError, match="not a folder"):
        build_report(tmp_path / "missing")


def test_drawing_leaves_the_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.rcParams["backend"]
    y = np.array([0, 1, 0, 1])
    plots.plot_roc(y, synthetic_probs(y, 2), ["A", "B"], tmp_path / "roc.png")
    assert matplotlib.rcParams["backend"] == before


def test_select_samples_is_a_deterministic_mix():
    y = np.repeat(np.arange(3), 10)
    probs = synthetic_probs(y, 3)
    pred = probs.argmax(1)
    chosen = plots.select_samples(y, pred, probs, 16)
    assert chosen == plots.select_samples(y, pred, probs, 16) and len(set(chosen)) == 16
    n_wrong = int((y[chosen] != pred[chosen]).sum())
    assert n_wrong == min(8, int((y != pred).sum())) and n_wrong < 16
    assert set(y[chosen][y[chosen] == pred[chosen]]) == {0, 1, 2}


def test_reliability_ece_matches_metrics():
    y = np.repeat(np.arange(3), 10)
    probs = synthetic_probs(y, 3, seed=3)
    ece = plots.reliability_bins(y, probs, 15)[-1]
    assert ece == pytest.approx(expected_calibration_error(probs, y, 15))


# ---------------------------------------------------------------- HTML


def test_html_has_classes_metrics_and_escaped_text(run_dir):
    folder, m = run_dir
    page = (folder / "report.html").read_text()
    for c in CLASSES:
        assert c in page
        assert f"{m['per_class'][c]['f1']:.3f}" in page
    for key in ("accuracy", "macro_f1", "weighted_f1", "auc_macro"):
        assert f"{m[key]:.3f}" in page
    assert "0.410 – 0.790" in page  # ci95
    assert "1.370" in page and "0.045" in page  # calibration
    assert "0.850" in page and "0.250" in page  # second operating point
    assert "<th>class</th><th>threshold</th><th>sensitivity</th>" in page  # the class first
    assert "<th>accuracy (= recall)</th>" in page  # per-class accuracy is correct / total of that class
    assert "site&lt;A&gt;" in page and "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # config in <pre>, escaped
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_every_img_is_inline_or_a_relative_file(run_dir):
    folder, _ = run_dir
    srcs = img_srcs((folder / "report.html").read_text())
    assert len(srcs) >= len(PLOTS) + 3
    for src in srcs:
        assert src.startswith("data:image/") or (not src.startswith(("/", "http")) and (folder / src).is_file()), src[:80]


def test_gallery_splits_correct_and_wrong_latest_epoch(run_dir):
    folder, _ = run_dir
    page = (folder / "report.html").read_text()
    assert "Correct" in page and "Wrong" in page
    assert "epoch 3" in page and "epoch 1" not in page  # only the latest epoch of img000
    assert "notes" not in page  # names that do not parse are left out
    y20 = CLASSES[2]
    assert "img020 <span" in page and f"true {y20}" in page  # explain output labelled from predictions


def test_cli_report(run_dir, capsys):
    from cxrlab.cli import main

    folder, _ = run_dir
    assert main(["report", str(folder), "--title", "My <run>"]) == 0
    assert str(folder / "report.html") in capsys.readouterr().out
    assert "<title>My &lt;run&gt;</title>" in (folder / "report.html").read_text()


# ---------------------------------------------------------------- CAM names


@pytest.mark.parametrize(
    "fields",
    [(3, "NORMAL", "PNEUMONIA", "img_001"), (120, "COVID-19", "Lung Opacity", "a.b"),
     (None, "NO_FINDING", "x/y%z", "p_q_cam")],
)
def test_cam_name_round_trip(fields):
    name = cam_name(*fields)
    assert "/" not in name and name.endswith(".png")
    assert parse_cam_name(name) == dict(zip(("epoch", "true", "pred", "stem"), fields))
    assert parse_cam_name(f"some/dir/{name}")["stem"] == fields[3]


def test_cam_name_format_and_errors():
    assert cam_name(7, "A", "B", "s") == "epoch007_true-A_pred-B_s.png"
    with pytest.raises(ValueError):
        parse_cam_name("img001_cam.png")
    with pytest.raises(ValueError):
        cam_name(1, "A", "B", "dir/stem")


# ---------------------------------------------------------------- browser


@pytest.mark.browser
def test_report_renders_in_chromium(run_dir):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright python package not installed")
    folder, _ = run_dir
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((folder / "report.html").resolve().as_uri())
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert widths and all(w > 0 for w in widths), widths
            page.screenshot(path="/tmp/cxrlab_report_screenshot.png", full_page=True)
        finally:
            browser.close()
