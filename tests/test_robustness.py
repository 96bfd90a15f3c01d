"""Bad input never crashes and never vanishes; manifests parse safely; kill -9 then --resume matches."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlab.errors import CxrlabError

ENV = dict(os.environ, CXRLAB_NO_REEXEC="1")
BAD = ("empty.png", "text.jpg", "truncated.jpg", "bomb.png")
ODD = ("sixteen_bit.png", "rgba.png", "cmyk.jpg", "palette.png", "exif_rotated.jpg")


def make_corpus(d: Path) -> Path:
    """Broken files and valid files in odd modes, as users' folders hold them."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all\n")
    Image.fromarray(rng.integers(0, 255, (300, 300), np.uint8)).save(d / "full.jpg")
    full = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (d / "full.jpg").unlink()
    Image.new("L", (20000, 20000)).save(d / "bomb.png")
    Image.fromarray((rng.random((64, 64)) * 65535).astype(np.uint16)).save(d / "sixteen_bit.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).convert("P").save(d / "palette.png")
    im = Image.fromarray(rng.integers(0, 255, (40, 64), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(d / "exif_rotated.jpg", exif=exif)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("bad") / "corpus")


def test_predict_reports_each_bad_file_and_predicts_the_rest(tiny_run, corpus, tmp_path):
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "cxrlab", "predict", "--checkpoint", str(tiny_run / "best.pt"),
                        *sorted(map(str, corpus.iterdir())), "--output", str(out)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = {Path(row["path"]).name: row for row in csv.DictReader(open(out))}
    assert set(rows) == set(BAD) | set(ODD)
    for name in BAD:
        assert rows[name]["error"] and not rows[name]["predicted"], name
        assert name in r.stderr, f"terminal does not name {name}"
    assert "Mpx" in rows["bomb.png"]["error"]
    for name in ODD:
        probs = [float(v) for k, v in rows[name].items() if k.startswith("prob_")]
        assert rows[name]["predicted"] and abs(sum(probs) - 1) < 1e-3 and not rows[name]["error"], name


def test_explain_reports_bad_files_and_explains_the_rest(tiny_run, corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "cxrlab", "explain", "--checkpoint", str(tiny_run / "best.pt"),
                        *sorted(map(str, corpus.iterdir())), "--out", str(tmp_path / "cam")], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for name in BAD:
        assert name in r.stderr + r.stdout
    written = {p.name for p in (tmp_path / "cam").glob("*_cam.png")}
    assert {f"{Path(n).stem}_cam.png" for n in ODD} <= written


def test_training_skips_unreadable_files_and_says_so(synth_dir, corpus, tmp_path):
    import shutil

    from cxrlab.config import TrainConfig
    from cxrlab.train import fit

    data = tmp_path / "d"
    shutil.copytree(synth_dir, data)
    for name in ("truncated.jpg", "text.jpg", "empty.png"):
        shutil.copy(corpus / name, data / "train" / "NORMAL" / name)
    out = tmp_path / "run"
    fit(TrainConfig(data=str(data), out=str(out), model="custom_cnn", img_size=48, epochs=1, batch_size=16,
                    report=False, cache=False, workers=0), progress=False)
    log = (out / "train.log").read_text()
    assert "skipped 3 unreadable file(s) in train" in log
    for name in ("truncated.jpg", "text.jpg", "empty.png"):
        assert name in log
    assert (out / "best.pt").is_file()


def test_service_upload_path_rejects_the_bad_corpus(tiny_run, corpus, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cxrlab.serve.app import create_app

    client = TestClient(create_app(tiny_run / "best.pt", log_db=tmp_path / "log.sqlite", device="cpu"))
    for name in BAD:
        r = client.post("/api/predict", files={"file": (name, (corpus / name).read_bytes())})
        assert 400 <= r.status_code < 500 and r.json()["error"], name
    for name in ODD:
        r = client.post("/api/predict", files={"file": (name, (corpus / name).read_bytes())})
        assert r.status_code == 200 and abs(sum(r.json()["probabilities"].values()) - 1) < 1e-4, name
    assert client.get("/api/health").status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.text(min_size=0, max_size=20), st.text(min_size=0, max_size=12),
                               st.sampled_from(["train", "val", "test", "TRAIN", "", "holdout"])), max_size=6))
def test_manifest_parsing_never_escapes_or_crashes(tmp_path_factory, rows):
    from cxrlab.data.dataset import read_manifest

    d = tmp_path_factory.mktemp("m")
    m = d / "m.csv"
    with open(m, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    try:
        samples = read_manifest(m)
    except CxrlabError:
        return
    base = d.resolve()
    for s in samples:
        assert base in s.path.parents  # never outside the manifest's folder
        assert s.split in ("train", "val", "test", "all") and s.label


@pytest.mark.slow
def test_kill_9_then_resume_equals_uninterrupted(synth_dir, tmp_path):
    args = ["train", "--data", str(synth_dir), "--model", "custom_cnn", "--epochs", "5", "--img-size", "48",
            "--batch-size", "8", "--seed", "1", "--no-report", "--no-cache", "--quiet"]
    full = subprocess.run([sys.executable, "-m", "cxrlab", *args, "--out", str(tmp_path / "full")], env=ENV,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    kill_dir = tmp_path / "kill"
    proc = subprocess.Popen([sys.executable, "-m", "cxrlab", *args, "--out", str(kill_dir)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    hist = kill_dir / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (hist.is_file() and len(hist.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(hist.read_text().splitlines()) - 1
    assert 2 <= done < 5, "kill landed too late to test anything"
    pre = hist.read_text().splitlines()
    r = subprocess.run([sys.executable, "-m", "cxrlab", *args, "--out", str(kill_dir), "--resume"], env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = list(csv.DictReader(open(tmp_path / "full" / "history.csv")))
    b = list(csv.DictReader(open(hist)))
    assert len(a) == len(b) == 5
    assert hist.read_text().splitlines()[: len(pre) - 1] == pre[:-1]  # finished epochs are kept, not redone
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4, abs=1e-6), (ra["epoch"], k)
