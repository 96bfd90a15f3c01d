"""Progressive resizing (--progressive-size): the size schedule, its cost in the time budget, the shrinking itself,
and a run whose early epochs train small while validation and the checkpoint stay at the full size."""

from __future__ import annotations

import csv
import pytest
import torch
import torch.nn as nn

from cxrlab.progressive import cost_fraction, epoch_size, more_epochs_that_fit, scaled_augment, shrink


def test_epoch_size_trains_the_first_share_of_the_planned_epochs_small():
    assert [epoch_size(e, 16, 224, 160, 0.5) for e in range(1, 17)] == [160] * 8 + [224] * 8
    assert [epoch_size(e, 10, 224, 160, 0.3) for e in range(1, 11)] == [160] * 3 + [224] * 7
    assert {epoch_size(e, 16, 224, 0, 0.5) for e in range(1, 17)} == {224}  # off
    assert cost_fraction(160, 224) == pytest.approx(0.5102, abs=1e-4) and cost_fraction(224, 224) == 1.0


def test_more_epochs_that_fit_known_answer_and_invariants():
    # after epoch 1 with 12.6 full-size epochs of time: ending at 17 puts epochs 2-8 at 160 px (7 x 0.51) and
    # 9-17 at 224 (9): 12.57 fits; ending at 18 moves epoch 9 to 160 px but adds one at 224: 13.08 does not
    assert more_epochs_that_fit(1, 12.6, 30, 224, 160, 0.5) == 16
    for budget in (0.0, 0.4, 1.0, 3.3, 7.9, 12.6, 25.0):
        for done in (0, 1, 4):
            more = more_epochs_that_fit(done, budget, 30, 224, 160, 0.5)
            end = done + more
            cost = sum(cost_fraction(epoch_size(e, end, 224, 160, 0.5), 224) for e in range(done + 1, end + 1))
            assert cost <= budget + 1e-9  # the plan fits
            assert more >= min(int(budget), 30 - done)  # and never holds fewer epochs than full-size ones would
    assert more_epochs_that_fit(0, 100.0, 30, 224, 160, 0.5) == 30  # capped at --epochs


def test_shrink_is_antialiased_and_keeps_intensities():
    stripes = torch.zeros(2, 64, 64, dtype=torch.uint8)
    stripes[:, :, ::2] = 255  # one-pixel stripes: plain subsampling would give all 0 or all 255
    out = shrink(stripes, 32)
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32
    assert out.min() > 100 and out.max() < 155  # averaged to grey, no aliasing
    flat = torch.full((1, 1, 48, 48), 77, dtype=torch.uint8)
    assert torch.allclose(shrink(flat, 20), torch.full((1, 1, 20, 20), 77.0))
    assert shrink(flat, 48).shape == (1, 1, 48, 48)  # not larger than it is: unchanged
    assert shrink(torch.zeros(1, 40, 80), 20).shape == (1, 1, 10, 20)  # the longer side gets the size


def test_scaled_augment_shrinks_blur_with_the_image():
    from cxrlab.data.augment import AugmentConfig

    cfg = AugmentConfig(blur=1.5, class_blur=(0.0, 1.0), rotation=10)
    half = scaled_augment(cfg, 0.5)
    assert (half.blur, half.class_blur, half.rotation) == (0.75, (0.0, 0.5), 10)
    assert scaled_augment(cfg, 1.0) is cfg


def test_train_one_epoch_feeds_the_model_images_of_the_step_size():
    from cxrlab.data.augment import AugmentConfig
    from cxrlab.engine import ArrayData, InputSpec, StepConfig, train_one_epoch

    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model[0].register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    data = ArrayData(torch.randint(0, 255, (12, 32, 32), dtype=torch.uint8), torch.tensor([0, 1] * 6))
    spec = InputSpec(mean=[0.5] * 3, std=[0.25] * 3, in_chans=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    for size, want in ((16, (16, 16)), (0, (32, 32))):
        seen.clear()
        step = StepConfig(4, 0, 1, 2, AugmentConfig(blur=1.0), amp="off", progress=False, size=size)
        out = train_one_epoch(model, data, opt, crit, spec, step, torch.device("cpu"))
        assert set(seen) == {want} and len(seen) == 3 and out["batches"] == 3


def _simulate(run, full_s: float = 10.0, overhead: float = 1.0) -> list[int]:
    """The loop's budget bookkeeping with epochs that cost `full_s` x the pixel ratio x `overhead` (a small epoch's
    fixed costs do not shrink); returns the sizes of the epochs that ran."""
    elapsed, sizes = 0.0, []
    for epoch in range(1, run.cfg.epochs + 1):
        size = run.epoch_size(epoch)
        run._schedule(epoch, {})
        frac = cost_fraction(size, 224)
        seconds = full_s * (frac if size == 224 else min(1.0, frac * overhead))
        run.full_size_seen |= size == 224
        elapsed += seconds
        sizes.append(size)
        if run._budget_after_epoch(epoch, elapsed, seconds / frac, full=True, at_full_size=size == 224):
            break
    assert elapsed <= 60.0 * 1.02  # the budget holds
    return sizes


def test_the_time_budget_fits_more_epochs_with_progressive_resizing_and_ends_at_the_full_size(budget_run):
    plain = _simulate(budget_run(20))
    assert plain == [224] * 6  # 60 s of 10 s epochs
    run = budget_run(20, progressive_size=112)  # a 112 px epoch costs a quarter of a 224 px one
    sizes = _simulate(run)
    # after epoch 1 (2.5 s): 57.5 s = 5.75 epochs left; ending at 9 puts 2-4 at 112 px and 5-9 at 224 px (5.75)
    assert sizes == [112] * 4 + [224] * 5
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # annealed where the budget ends
    # small epochs that cost more than the pixel ratio (fixed costs) make the first estimates pessimistic; the
    # full-size epochs then set the pace, more epochs fit, and training never goes back to the small size
    slow = _simulate(budget_run(20, progressive_size=112), overhead=1.6)
    assert slow[0] == 112 and slow[-1] == 224 and slow == sorted(slow) and len(slow) > len(plain)


def test_a_run_trains_small_first_and_validates_and_ships_at_the_full_size(synth_dir, tmp_path):
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.train import fit

    base = dict(data=str(synth_dir), model="small_cnn", img_size=48, batch_size=8, epochs=4, report=False,
                cache=False, workers=0, early_stop=0)
    fit(TrainConfig(out=str(tmp_path / "p"), progressive_size=32, **base), progress=False)
    rows = list(csv.DictReader(open(tmp_path / "p" / "history.csv")))
    assert [int(r["img_size"]) for r in rows] == [32, 32, 48, 48]
    assert all(r["val_loss"] != "" for r in rows)  # every epoch validated, at 48 px
    ckpt = load_checkpoint(tmp_path / "p" / "best.pt")
    assert ckpt["img_size"] == ckpt["preprocess"]["img_size"] == 48
    log = (tmp_path / "p" / "train.log").read_text()
    assert "epoch 1 trains at 32 px" in log and "epoch 3 trains at 48 px" in log
    with pytest.raises(CxrlabError, match=r"--progressive-size 48 must be smaller than the training size \(48 px"):
        fit(TrainConfig(out=str(tmp_path / "q"), progressive_size=48, **base), progress=False)
    # reference design 2 sizes its flatten layer for --img-size: refused before training, with the way out
    with pytest.raises(CxrlabError, match="model custom_cnn does not take 32 px images.*global pooling"):
        fit(TrainConfig(out=str(tmp_path / "r"), progressive_size=32, **{**base, "model": "custom_cnn"}), progress=False)
    assert not (tmp_path / "r" / "last.pt").exists()
    for bad, msg in ((dict(progressive_size=8), "--progressive-size is the early epochs' image size"),
                     (dict(progressive_size=32, progressive_frac=1.0), "--progressive-frac is the share")):
        with pytest.raises(CxrlabError, match=msg):
            TrainConfig(data="x", **bad).validate()


def test_an_interrupted_progressive_run_resumes_to_the_same_result(synth_dir, tmp_path, monkeypatch):
    """Stopped after epoch 1 (still small) and resumed: the same sizes, losses and final weights as in one go."""
    from cxrlab.checkpoint import load_checkpoint
    from cxrlab.config import TrainConfig
    from cxrlab.train import Run, fit

    base = dict(data=str(synth_dir), model="small_cnn", img_size=48, batch_size=16, epochs=4, report=False,
                cache=False, workers=0, early_stop=0, progressive_size=32, seed=3)
    fit(TrainConfig(out=str(tmp_path / "full"), **base), progress=False)
    with monkeypatch.context() as m:
        def stop_after_first(self, epoch):
            raise KeyboardInterrupt
        m.setattr(Run, "_on_epoch_end", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            fit(TrainConfig(out=str(tmp_path / "part"), **base), progress=False)
    fit(TrainConfig(out=str(tmp_path / "part"), **base), resume=True, progress=False)
    a, b = (list(csv.DictReader(open(tmp_path / d / "history.csv"))) for d in ("full", "part"))
    assert [r["img_size"] for r in a] == [r["img_size"] for r in b] == ["32", "32", "48", "48"]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("full", "part"))
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_resume_refuses_a_different_progressive_size(synth_dir, tmp_path):
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError
    from cxrlab.train import fit

    base = dict(data=str(synth_dir), model="small_cnn", img_size=48, batch_size=16, epochs=1, report=False,
                cache=False, workers=0)
    fit(TrainConfig(out=str(tmp_path / "r"), **base), progress=False)
    with pytest.raises(CxrlabError, match="--resume: progressive_size was 0 .* but is 32 now"):
        fit(TrainConfig(out=str(tmp_path / "r"), progressive_size=32, **{**base, "epochs": 2}), resume=True,
            progress=False)
