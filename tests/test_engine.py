"""Engine pieces with known answers: precise BN, losses, mixing, early stopping, TTA, augmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cxrlab.data.augment import AugmentConfig, augment_batch
from cxrlab.engine import (EarlyStopping, FocalLoss, InputSpec, epoch_order, mix_batch, predict_logits,
                           recalibrate_batchnorm)

SPEC = InputSpec([0.5], [0.25], 1)


def test_precise_bn_gives_the_exact_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    images = torch.randint(0, 256, (40, 12, 12), dtype=torch.uint8)
    bn = model[1]
    bn.running_mean.fill_(100.0)
    bn.running_var.fill_(1e-3)
    model.train()
    n = recalibrate_batchnorm(model, images, SPEC, torch.device("cpu"), n=1000, batch_size=16)
    assert n == 40
    x = (images.float() / 255 - 0.5) / 0.25
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))  # the seeded subset order
    feats = model[0](x[order].unsqueeze(1))
    # the exact average of the per-batch means and unbiased variances (batches of 16, 16, 8)
    batches = [feats[i : i + 16] for i in range(0, 40, 16)]
    mean = sum(b.mean(dim=(0, 2, 3)) for b in batches) / len(batches)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    var = sum(b.var(dim=(0, 2, 3), unbiased=True) for b in batches) / len(batches)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and model.training and model[3].training  # modes and momentum restored


def test_precise_bn_without_batchnorm_is_a_no_op():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    assert recalibrate_batchnorm(model, torch.zeros(4, 4, 4, dtype=torch.uint8), SPEC, torch.device("cpu")) == 0


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)
    assert FocalLoss(gamma=2.0)(logits, y) < F.cross_entropy(logits, y)  # easy examples are down-weighted


def test_mixup_targets_are_convex_combinations():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        xm, ym = mix_batch(x, y, 3, mixup, cutmix, g)
        assert xm.shape == x.shape and torch.allclose(ym.sum(1), torch.ones(6))
    xm, ym = mix_batch(x, y, 3, 0.0, 0.0, g)
    assert torch.equal(xm, x) and torch.equal(ym.argmax(1), y)


def test_epoch_order_depends_only_on_seed_and_epoch():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert torch.equal(epoch_order(labels, 1, 3), epoch_order(labels, 1, 3))
    assert not torch.equal(epoch_order(labels, 1, 3), epoch_order(labels, 1, 4))
    balanced = epoch_order(labels, 0, 1, "balanced")
    share = (labels[balanced] == 1).float().mean().item()
    assert 0.35 < share < 0.65  # the minority class is drawn about half of the time


def test_early_stopping_counts_and_modes():
    es = EarlyStopping("val_loss", patience=2)
    assert es.step(1.0, 1) and not es.step(1.2, 2) and not es.should_stop
    assert not es.step(1.1, 3) and es.should_stop and es.best_epoch == 1
    es2 = EarlyStopping("val_auc", patience=0)
    assert es2.step(0.5, 1) and es2.step(0.6, 2) and not es2.step(math.nan, 3) and not es2.should_stop


def test_tta_is_the_mean_of_image_and_flip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    imgs = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8)
    cpu = torch.device("cpu")
    plain = predict_logits(model, imgs, SPEC, cpu)
    flipped = predict_logits(model, torch.flip(imgs, dims=[2]), SPEC, cpu)
    tta = predict_logits(model, imgs, SPEC, cpu, tta=True)
    assert torch.allclose(torch.from_numpy(tta), torch.from_numpy((plain + flipped) / 2), atol=1e-5)


def test_augment_identity_and_determinism():
    imgs = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    off = AugmentConfig(flip=0, rotation=0, translate=0, crop_scale_min=1.0, brightness=0, contrast=0)
    out = augment_batch(imgs, off, torch.Generator().manual_seed(0))
    assert (out[:, 0] - imgs.float()).abs().max() < 1e-3
    a = augment_batch(imgs, AugmentConfig(gamma=0.3, noise=0.02), torch.Generator().manual_seed(7))
    b = augment_batch(imgs, AugmentConfig(gamma=0.3, noise=0.02), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 255


def test_blur_is_a_normalised_gaussian_with_each_images_own_sigma():
    from cxrlab.data.augment import gaussian_blur_batch

    x = torch.zeros(3, 1, 41, 41)
    x[:, 0, 20, 20] = 1.0  # impulses: the output is the kernel itself
    out = gaussian_blur_batch(x, torch.tensor([0.0, 1.0, 2.5]))
    assert torch.allclose(out[0], x[0])  # sigma 0 leaves the image untouched
    yy, xx = torch.meshgrid(torch.arange(41.0) - 20, torch.arange(41.0) - 20, indexing="ij")
    for i, sigma in ((1, 1.0), (2, 2.5)):
        k = out[i, 0]
        assert k.sum().item() == pytest.approx(1.0, abs=1e-5)  # brightness kept
        assert (k * xx**2).sum().item() == pytest.approx(sigma**2, rel=0.03)  # variance sigma^2 per axis
        assert (k * yy**2).sum().item() == pytest.approx(sigma**2, rel=0.03)
        assert torch.allclose(k, k.T, atol=1e-7) and torch.allclose(k, k.flip(0), atol=1e-7)
    one = gaussian_blur_batch(x[2:], torch.tensor([2.5]))  # batching does not mix images
    assert torch.allclose(one, out[2:], atol=1e-6)
    flat = gaussian_blur_batch(torch.full((2, 1, 16, 16), 77.0), torch.tensor([3.0, 0.5]))
    assert torch.allclose(flat, torch.full_like(flat, 77.0))  # edges replicated: no dark rim
    a = augment_batch(torch.randint(0, 256, (4, 24, 24), dtype=torch.uint8), AugmentConfig(blur=2.0),
                      torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 24, 24) and a.min() >= 0 and a.max() <= 255


def _assert_edge_bands(m: torch.Tensor, top: float) -> None:
    """(n, side, side) bool masks: bands from the edges, full rows/columns, no deeper than `top` of the side."""
    side = m.shape[-1]
    lim = int(top * side)
    assert not m[:, lim:side - lim, lim:side - lim].any()
    for k in range(len(m)):
        rows, cols = m[k].all(dim=1), m[k].all(dim=0)
        assert torch.equal(m[k], rows[:, None] | cols[None, :])  # whole rows and columns
        for band in (rows[: side // 2], rows.flip(0)[: side // 2], cols[: side // 2], cols.flip(0)[: side // 2]):
            w = int(band.sum())
            assert band[:w].all()  # contiguous from the edge


def test_frame_bands_are_black_edge_bands_of_bounded_width():
    from cxrlab.data.augment import random_frames

    n, side, top = 400, 40, 0.2
    m = random_frames(n, side, side, top, torch.Generator().manual_seed(0))[:, 0].bool()
    _assert_edge_bands(m, top)
    sides = torch.stack([m[:, 0, side // 2], m[:, -1, side // 2], m[:, side // 2, 0], m[:, side // 2, -1]], 1)
    assert sides.float().mean(0).sub(0.5).abs().max() < 0.1  # each side painted about half the time
    assert m[:, 0, side // 2].sum() > m[:, int(0.1 * side), side // 2].sum() > 0  # widths spread over [0, top]
    off = AugmentConfig(flip=0, rotation=0, translate=0, crop_scale_min=1.0, brightness=0, contrast=0, frame=top)
    out = augment_batch(torch.full((n, side, side), 200, dtype=torch.uint8), off, torch.Generator().manual_seed(0))[:, 0]
    black = out < 0.5
    _assert_edge_bands(black, top)
    assert black.any() and (out[~black] - 200).abs().max() < 1e-3  # black bands, the rest untouched


def test_sharpness_known_values_and_agreement_with_audit():
    import numpy as np

    from cxrlab.audit import sharpness
    from cxrlab.data.augment import sharpness_batch

    ramp = torch.arange(224.0).repeat(224, 1)  # +1 per column, constant down each column
    check = (torch.arange(224).view(-1, 1) + torch.arange(224)) % 2 * 255.0  # checkerboard 0/255
    assert sharpness_batch(torch.stack([ramp, check])).tolist() == pytest.approx([1.0, 510.0])
    img = torch.randint(0, 256, (224, 224), dtype=torch.uint8)
    assert sharpness_batch(img[None]).item() == pytest.approx(sharpness(img.numpy().astype(np.uint8)), rel=1e-5)


def test_sharpness_matching_blur_brings_the_sharper_class_down_to_the_other():
    from cxrlab.data.augment import gaussian_blur_batch, sharpness_batch, sharpness_matching_blur

    g = torch.Generator().manual_seed(0)
    base = gaussian_blur_batch(torch.rand(60, 1, 48, 48, generator=g) * 255, torch.full((60,), 0.7))
    soft = gaussian_blur_batch(base[30:], torch.full((30,), 1.2))  # class 1: the same kind, blurred
    images = torch.cat([base[:30], soft])[:, 0].round().to(torch.uint8)
    labels = torch.tensor([0] * 30 + [1] * 30)
    top, info = sharpness_matching_blur(images, labels, 3)  # class 2 has no images
    assert info["median"][0] > 1.5 * info["median"][1] and 2 not in info["median"]
    assert top[1] == 0.0 and top[2] == 0.0 and 0.5 < top[0] < 4
    at_half = sharpness_batch(gaussian_blur_batch(images[:30, None].float(), torch.full((30,), top[0] / 2)))
    assert at_half.median().item() == pytest.approx(info["median"][1], rel=0.02)
    assert sharpness_matching_blur(images[:30], labels[:30], 2)[0] == ()  # one class: nothing to match


def test_class_blur_blurs_only_the_classes_it_names():
    from cxrlab.data.augment import sharpness_batch

    imgs = torch.randint(0, 256, (6, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    off = dict(flip=0, rotation=0, translate=0, crop_scale_min=1.0, brightness=0, contrast=0)
    out = augment_batch(imgs, AugmentConfig(**off, class_blur=(3.0, 0.0)), torch.Generator().manual_seed(0), labels)
    assert (out[labels == 1, 0] - imgs[labels == 1].float()).abs().max() < 1e-3
    assert sharpness_batch(out[labels == 0]).mean() < 0.9 * sharpness_batch(imgs[labels == 0]).mean()
    with pytest.raises(ValueError, match="needs the batch's labels"):
        augment_batch(imgs, AugmentConfig(**off, class_blur=(3.0, 0.0)), torch.Generator().manual_seed(0))
    plain = AugmentConfig(blur=2.0)  # without class_blur the random draws are those of before
    a = augment_batch(imgs, plain, torch.Generator().manual_seed(5))
    b = augment_batch(imgs, plain, torch.Generator().manual_seed(5), labels)
    assert torch.equal(a, b)


def test_zoom_out_shrinks_the_whole_image_onto_a_black_frame():
    from cxrlab.data.augment import random_affine_matrices

    white = torch.full((64, 1, 96, 96), 255, dtype=torch.uint8)
    base = dict(flip=0.0, rotation=0.0, translate=0.0, brightness=0.0, contrast=0.0)
    g = torch.Generator().manual_seed(0)
    zoom_in = augment_batch(white, AugmentConfig(**base, crop_scale_min=0.5), g)
    assert (zoom_in[..., 1:-1, 1:-1] > 254.99).all()  # a crop never leaves the image (edge pixels interpolate)
    cfg = AugmentConfig(**base, crop_scale_min=1.0, crop_scale_max=2.0)
    theta = random_affine_matrices(64, cfg, torch.Generator().manual_seed(1))
    out = augment_batch(white, cfg, torch.Generator().manual_seed(1))
    # share of the frame the image covers = 1 / (sx * sy) over the zoomed-out axes (an axis with s < 1 is a
    # crop, which the image fills): less if part of the image fell outside the frame
    kept = (out / 255.0).mean(dim=(1, 2, 3))
    expected = 1.0 / (theta[:, 0, 0].clamp(min=1) * theta[:, 1, 1].clamp(min=1))
    assert torch.allclose(kept, expected, atol=0.03)
    assert kept.min() < 0.7 and kept.max() <= 1.0 and expected.min() >= 1 / 2.0 / (4 / 3) - 1e-6


def test_depthwise_convolutions_stay_fp32_under_cpu_bf16_autocast():
    import copy

    from cxrlab.engine import keep_depthwise_fp32

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 8, 1))  # depthwise, pointwise
    keys = list(net.state_dict())
    assert keep_depthwise_fp32(net) == 1
    assert list(net.state_dict()) == keys  # checkpoints unchanged
    x = torch.randn(2, 4, 8, 8)
    seen = {}
    net[0].register_forward_hook(lambda m, a, out: seen.__setitem__("dw", (a[0].dtype, out.dtype, torch.is_autocast_enabled("cpu"))), prepend=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        assert torch.is_autocast_enabled("cpu")  # switched back on after the depthwise layer
    assert seen["dw"] == (torch.float32, torch.float32, False)
    assert out.dtype == torch.bfloat16  # the pointwise convolution still ran in bf16
    fp32 = F.conv2d(x, net[0].weight, net[0].bias, padding=1, groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(net[0](x), fp32)  # the exact fp32 result, not a bf16 rounding of it
    assert torch.equal(net(x), nn.Sequential(*copy.deepcopy(list(net)))(x))  # outside autocast: untouched, copyable
    out.float().sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.dtype == torch.float32


def test_weight_ema_follows_the_warmed_up_decay():
    from cxrlab.engine import weight_ema

    net = nn.Linear(1, 1, bias=False)
    ema = weight_ema(net, decay=0.2)  # the ramp (2/11) below 0.2 at first, then capped
    values, expected = [1.0, 3.0, 11.0, 7.0], None
    for n, v in enumerate(values):
        net.weight.data.fill_(v)
        ema.update_parameters(net)
        if expected is None:
            expected = v  # the first update copies
        else:
            d = min(0.2, (1 + n) / (10 + n))  # n earlier updates
            expected = d * expected + (1 - d) * v
        assert ema.module.weight.item() == pytest.approx(expected), n
    assert not any(p.requires_grad for p in ema.parameters())
    with pytest.raises(Exception, match="--ema must be a decay"):
        from cxrlab.config import TrainConfig

        TrainConfig(data="x", ema=1.0).validate()


def test_cosine_schedule_is_fitted_to_the_time_budget(budget_run):
    def run_after_first_epoch(seconds: float):
        run = budget_run()
        run._budget_after_epoch(1, seconds, seconds, full=True)
        return run

    slow = run_after_first_epoch(12.0)  # 48 s left -> 4 more epochs fit: the schedule ends at epoch 5
    assert slow.scheduler.T_max == 4
    for epoch in range(2, 9):  # the budget estimate was pessimistic: epochs 6-8 still run
        slow._schedule(epoch, {})
        if epoch >= 5:  # the schedule ended at epoch 5 and stays at its minimum instead of climbing again
            assert slow.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
        else:
            assert slow.optimizer.param_groups[0]["lr"] > 0.01
    assert run_after_first_epoch(5.0).scheduler.T_max == 9  # 12 epochs would fit: the configured 10 stand
    # with 2 frozen epochs the fit is made after epoch 3, on that epoch's own (full) cost: 60 s budget, 30 s
    # gone (two cheap frozen epochs of 5 s and a full one of 20 s) -> 1 more full epoch fits, ending at epoch 4
    frozen = budget_run()
    assert not frozen._budget_after_epoch(1, 5.0, 5.0, full=False)
    assert not frozen._budget_after_epoch(2, 10.0, 5.0, full=False)
    assert frozen.scheduler.T_max == 9  # frozen epochs do not fit the schedule
    frozen._budget_after_epoch(3, 30.0, 20.0, full=True)
    assert frozen.scheduler.T_max == 3  # ends at epoch 4 (= 1 warm-up + 3)


def test_time_budget_is_refitted_after_a_slow_first_epoch(budget_run):
    """A cold first epoch (15 s, then 5 s each) first fits the schedule short; the re-fits on the median epoch
    move its end out, the learning rate never rises, and the run stops exactly where the schedule ends, at
    its minimum (one estimate for both: the old stop check used the mean, which the slow epoch kept high,
    and stopped at epoch 9, one before the schedule's end)."""
    run = budget_run(epochs=20)
    elapsed, ends, lrs, stopped_at = 0.0, [], [], None
    for epoch in range(1, 21):
        run._schedule(epoch, {})  # what run_epoch does at the end of the epoch
        lrs.append(run.optimizer.param_groups[0]["lr"])
        seconds = 15.0 if epoch == 1 else 5.0
        elapsed += seconds
        stop = run._budget_after_epoch(epoch, elapsed, seconds, full=True)
        ends.append(run.scheduler.T_max + 1)
        if stop:
            stopped_at = epoch
            break
    # 45 s left after 15 s -> ends at 4; median 10 s, 40 s left -> 6; median 5 s, 35 s left -> 10
    assert ends[:3] == [4, 6, 10] and ends[-1] == 10
    assert stopped_at == 10  # 60 s spent: the budget is used up where the schedule ends
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))  # moving the end never raises the learning rate
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # the last epoch ran into the minimum
    # an estimate that shrinks below the steps already taken stops the schedule where it is, never behind it
    run.scheduler.T_max = 20
    run._fit_cosine_to_budget(9, 5.0)  # 9 epochs = 8 cosine steps, but 9 were taken
    assert run.scheduler.T_max == run.scheduler.last_epoch == 9


def test_time_budget_noise_on_long_epochs_does_not_leave_an_epoch_at_zero_learning_rate(budget_run):
    """Measured on a slow CPU (a 26 min budget, a 100 s probe, then epochs of 360, 371, 343 and 349 s): with the
    count of epochs rounded down, 1.96 epochs left after epoch 2 became 1, the schedule ended at epoch 3, the
    next re-fit found room for epoch 4 and ran it at a zero learning rate. An epoch that fits to within a tenth
    now counts: the schedule ends at epoch 4, every epoch trains, and the run stops there."""
    run = budget_run(epochs=30)
    run.cfg.time_budget_min = 26.0
    elapsed, lrs, stopped_at = 100.0, [], None
    for epoch, seconds in enumerate([360.0, 371.0, 343.0, 349.0, 350.0], start=1):
        lrs.append(run.optimizer.param_groups[0]["lr"])  # the rate this epoch trains at
        run._schedule(epoch, {})
        elapsed += seconds
        if run._budget_after_epoch(epoch, elapsed, seconds, full=True):
            stopped_at = epoch
            break
    assert stopped_at == 4 and run.scheduler.T_max + 1 == 4
    assert min(lrs) > 0.01  # no epoch at the minimum
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # annealed by the end


def test_time_budget_stops_once_the_schedule_has_reached_its_minimum(caplog, budget_run):
    """If an epoch runs much faster than the estimate after the schedule was fitted to end with it, the
    learning rate is already at its minimum and cannot climb back: the run stops instead of training at 0."""
    import logging

    run = budget_run(epochs=20)
    run._schedule(1, {})
    assert not run._budget_after_epoch(1, 10.0, 10.0, full=True)  # 50 s left: ends at epoch 6
    run._schedule(2, {})
    assert not run._budget_after_epoch(2, 35.0, 25.0, full=True)  # a 25 s epoch: 1 more fits, ends at epoch 3
    assert run.scheduler.T_max + 1 == 3
    run._schedule(3, {})  # the minimum is reached
    with caplog.at_level(logging.INFO, logger="cxrlab.train"):
        assert run._budget_after_epoch(3, 40.0, 5.0, full=True)  # 20 s left, 2 fast epochs would fit: stop anyway
    assert "reached its minimum at epoch 3" in caplog.text


def test_time_budget_with_val_every_sets_the_final_validation_aside_and_plans_the_last_epoch(budget_run):
    """--val-every 0: epochs cost their training only, the one validation at the end is kept out of the time left,
    and the epoch the budget expects to be the last is the one `_validates` picks. Before any validation its
    cost is estimated from the training speed."""
    from types import SimpleNamespace

    from cxrlab.training_setup import FORWARD_COST

    every = budget_run(epochs=20)
    every._budget_after_epoch(1, 10.0, 10.0, full=True)  # 50 s left, 10 s epochs (validation included): 5 more
    assert every.planned_end == 6 and every.scheduler.T_max == 5
    final = budget_run(epochs=20)
    final.cfg.val_every, final.eval_s = 0, 20.0
    final._budget_after_epoch(1, 10.0, 10.0, full=True)  # 50 s left - 20 s for the validation at the end: 3 more
    assert final.planned_end == 4 and final.scheduler.T_max == 3
    assert [final._validates(e) for e in (2, 3, 4, 5)] == [False, False, True, False]
    assert final._validates(20)  # the last of --epochs always
    third = budget_run(epochs=20)
    third.cfg.val_every, third.planned_end = 3, None
    assert [third._validates(e) for e in range(1, 7)] == [False, False, True, False, False, True]
    fresh = budget_run()
    fresh.cfg.val_every, fresh.cfg.precise_bn, fresh.eval_s, fresh.train_s = 0, 50, None, 10.0
    fresh.splits = {"train": SimpleNamespace(arrays=[0] * 100), "val": SimpleNamespace(arrays=[0] * 50)}
    assert fresh._eval_estimate() == pytest.approx(10.0 / 100 * 100 * FORWARD_COST)


def test_time_budget_stops_early_when_the_machine_gets_busier(budget_run):
    """The median ignores one slow epoch at the start, but an epoch slower than the median just now counts:
    after eight 5 s epochs a 12 s one leaves 8 s, less than the 12 s the next may take."""
    run = budget_run(epochs=20)
    for epoch in range(1, 9):
        run._schedule(epoch, {})
        assert not run._budget_after_epoch(epoch, 5.0 * epoch, 5.0, full=True)
    run._schedule(9, {})
    assert run._budget_after_epoch(9, 52.0, 12.0, full=True)  # the median alone (5 s) would go on
    assert run.scheduler.T_max + 1 == 9  # and the schedule ends at this epoch too
    run.cut_short = True  # an epoch the mid-epoch guard ended early always ends the run
    assert budget_run()._budget_after_epoch(1, 1.0, 1.0, full=True) is False
    assert run._budget_after_epoch(10, 1.0, 1.0, full=False)


def test_js_divergence_known_values():
    from cxrlab.engine import js_divergence

    a = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    sure0, sure1 = torch.tensor([[30.0, 0.0]]), torch.tensor([[0.0, 30.0]])
    assert js_divergence(sure0, sure1).item() == pytest.approx(math.log(2), rel=1e-4)  # the maximum
    b = torch.tensor([[0.0, 1.0, -1.0], [1.0, 0.0, 0.0]])
    pa, pb = torch.softmax(a, 1), torch.softmax(b, 1)
    m = (pa + pb) / 2
    kl = lambda p: (p * (p / m).log()).sum(1)  # noqa: E731
    expected = ((kl(pa) + kl(pb)) / 2).mean().item()
    assert js_divergence(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert js_divergence(b, a).item() == pytest.approx(expected, rel=1e-5)


def test_consistency_with_identical_views_trains_like_plain_cross_entropy():
    """Augmentation off: both views are the same image, the JS term is 0 and the CE mean is CE."""
    from cxrlab.engine import ArrayData, InputSpec, StepConfig, train_one_epoch

    off = AugmentConfig(flip=0, rotation=0, translate=0, crop_scale_min=1.0, brightness=0, contrast=0)
    data = ArrayData(torch.randint(0, 256, (24, 8, 8), dtype=torch.uint8), torch.arange(24) % 3)
    spec = InputSpec([0.5], [0.25], 1, False)
    runs = []
    for weight in (0.0, 12.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = StepConfig(8, 0, 1, 3, off, amp="off", progress=False, consistency=weight)
        out = train_one_epoch(model, data, opt, lambda lg, t: -(t * lg.log_softmax(1)).sum(1).mean(), spec, step,
                              torch.device("cpu"))
        runs.append((out, model[1].weight.detach().clone()))
    assert runs[0][0]["loss"] == pytest.approx(runs[1][0]["loss"], rel=1e-6)
    torch.testing.assert_close(runs[0][1], runs[1][1])
    # with augmentation on, the views differ and the term is added (the path is live)
    losses = []
    for weight in (0.0, 12.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        step = StepConfig(8, 0, 1, 3, AugmentConfig(rotation=30, brightness=0.5), amp="off", progress=False,
                          consistency=weight)
        losses.append(train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.0),
                                      lambda lg, t: -(t * lg.log_softmax(1)).sum(1).mean(), spec, step,
                                      torch.device("cpu"))["loss"])
    assert losses[1] > losses[0] + 1e-3


def test_consistency_term_pulls_two_augmented_views_together():
    """With real augmentation the term is positive and its gradient lowers it."""
    from cxrlab.engine import js_divergence

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (16, 16, 16), dtype=torch.uint8)
    cfg = AugmentConfig(rotation=30, translate=0.2, brightness=0.5, contrast=0.5, blur=2.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    views = [augment_batch(imgs, cfg, g) / 255.0 for _ in range(2)]
    before = js_divergence(model(views[0]), model(views[1]))
    for _ in range(20):
        loss = js_divergence(model(views[0]), model(views[1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = js_divergence(model(views[0]), model(views[1])).item()
    assert before.item() > 1e-4 and after < before.item() / 2


def test_consistency_option_is_validated():
    from cxrlab.config import TrainConfig
    from cxrlab.errors import CxrlabError

    TrainConfig(consistency=12).validate()
    with pytest.raises(CxrlabError, match="--consistency is a loss weight"):
        TrainConfig(consistency=-1).validate()
    with pytest.raises(CxrlabError, match="--mixup / --cutmix replace"):
        TrainConfig(consistency=12, mixup=0.2).validate()


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(caplog):
    """Emulated bf16 is several times slower than fp32 (6x measured on an AVX2 EPYC): a CPU without it trains in
    fp32 and says why; with it, bf16 (and fp16, which CPU autocast runs as bf16) stays; auto is fp32 on a CPU."""
    import logging

    from cxrlab.engine import resolve_amp

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="cxrlab.engine"):
        assert resolve_amp("bf16", cpu, native_bf16=False) == "off"
    assert "no native bf16" in caplog.text and "fp32 instead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxrlab.engine"):
        assert resolve_amp("bf16", cpu, native_bf16=True) == "bf16"
        assert resolve_amp("fp16", cpu, native_bf16=True) == "bf16"
        assert resolve_amp("auto", cpu, native_bf16=True) == "off"
        assert resolve_amp("off", cpu, native_bf16=False) == "off"
    assert not caplog.text
    assert resolve_amp("auto", cuda) == "fp16" and resolve_amp("bf16", cuda) == "bf16"


def test_native_bf16_detection_matches_the_cpu_flags():
    """On Linux x86 the kernel lists the instructions: AVX512-BF16 or AMX-BF16 means native bf16."""
    import platform
    from pathlib import Path

    from cxrlab.engine import cpu_has_native_bf16

    info = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not info.is_file():
        pytest.skip("needs Linux on x86_64")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.read_text().splitlines()
                  if line.startswith("flags")), set())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
