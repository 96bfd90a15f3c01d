"""Known-answer tests for cxrlab.metrics (hand-computed values, sklearn cross-checks)."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import classification_report, f1_score, roc_auc_score

from cxrlab.errors import CxrlabError
from cxrlab.metrics import (
    apply_temperature, bootstrap_ci, calibration_summary, choose_threshold,
    classification_report_text, compute_metrics, expected_calibration_error, fit_temperature,
    group_metrics, operating_point, predict_with_thresholds, to_jsonable, write_metrics,
)

NAMES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def onehot_probs(pred, C=3, top=0.8):
    """Probabilities whose argmax is `pred`, with `top` on the predicted class."""
    p = np.full((len(pred), C), (1 - top) / (C - 1))
    p[np.arange(len(pred)), pred] = top
    return p


def random_case(n=600, C=3, sep=1.5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    z = rng.normal(size=(n, C))
    z[np.arange(n), y] += sep
    return y, apply_temperature(z, 1.0)


def test_confusion_matrix_and_per_class_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = compute_metrics(y, onehot_probs(pred), NAMES)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["n"] == 6 and m["class_names"] == NAMES
    n, pn, tb = (m["per_class"][k] for k in NAMES)
    assert (n["precision"], n["recall"], n["support"]) == (pytest.approx(0.5), 0.5, 2)
    assert pn["precision"] == pytest.approx(2 / 3) and pn["recall"] == 1.0
    assert tb["precision"] == 1.0 and tb["recall"] == 0.5
    assert n["accuracy"] == n["recall"] and n["sensitivity"] == 0.5
    assert n["specificity"] == pytest.approx(3 / 4)  # 4 negatives, 1 false positive
    assert pn["specificity"] == pytest.approx(3 / 4)
    assert tb["specificity"] == 1.0
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted"))


def test_perfect_predictions_auc_one_and_ece_zero():
    y = np.array([0, 1, 2] * 10)
    p = onehot_probs(y, top=1.0 - 2e-9)
    m = compute_metrics(y, p, NAMES)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["auc_macro"] == 1.0
    assert all(m["per_class"][k]["auc"] == 1.0 for k in NAMES)
    assert expected_calibration_error(p, y) < 1e-8


def test_binary_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p1 = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1), 1)  # many ties
    probs = np.stack([1 - p1, p1], axis=1)
    m = compute_metrics(y, probs, ["NEG", "POS"])
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert m["per_class"]["POS"]["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)


def test_multiclass_auc_matches_sklearn_ovr_macro():
    y, p = random_case()
    m = compute_metrics(y, p, NAMES)
    assert m["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=1e-12)
    for c, k in enumerate(NAMES):
        assert m["per_class"][k]["auc"] == pytest.approx(roc_auc_score(y == c, p[:, c]))


def test_absent_class_gives_none_auc_and_valid_json():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = onehot_probs(np.array([0, 1, 1, 2, 0, 1]))
    m = compute_metrics(y, p, NAMES)
    assert m["per_class"]["TUBERCULOSIS"]["auc"] is None
    assert m["per_class"]["TUBERCULOSIS"]["support"] == 0
    assert m["per_class"]["TUBERCULOSIS"]["sensitivity"] is None
    assert len(m["confusion_matrix"]) == 3 and m["confusion_matrix"][2] == [0, 0, 0]
    assert m["auc_macro"] is not None  # mean of the defined AUCs
    ci = bootstrap_ci(y, p, NAMES, n_resamples=50)
    assert ci["recall_TUBERCULOSIS"] is None
    json.dumps(to_jsonable({"m": m, "ci": ci}), allow_nan=False)
    one = compute_metrics(np.zeros(4, int), onehot_probs(np.array([0, 0, 1, 0])), NAMES)
    assert one["auc_macro"] is None  # no class has both positives and negatives


def test_binary_with_one_class_absent():
    m = compute_metrics(np.ones(5, int), np.tile([0.3, 0.7], (5, 1)), ["NEG", "POS"])
    assert m["auc_macro"] is None and m["accuracy"] == 1.0


def test_thresholded_predictions_are_used():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.65, 0.35]])
    m = compute_metrics(y, p, ["NEG", "POS"], y_pred=predict_with_thresholds(p, {1: 0.38}))
    assert m["confusion_matrix"] == [[2, 0], [0, 2]]


def test_classification_report_text_matches_sklearn_and_lists_absent_class():
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    text = classification_report_text(y, pred, NAMES)
    assert "TUBERCULOSIS" in text
    ref = classification_report(y, pred, labels=[0, 1, 2], target_names=NAMES, digits=4,
                                zero_division=0)
    assert text.startswith(ref)  # sklearn's report, then the note on the absent class
    assert text[len(ref):].strip() == ("TUBERCULOSIS: no image of this class and none predicted; 'macro avg' above "
                                       "counts it as 0, metrics.json's macro_f1 leaves it out: 0.7333")


def test_ece_by_hand():
    y = np.array([1] * 6 + [0] * 4)  # all predict class 1 at 0.8: 60% correct -> ECE 0.2
    p = np.tile([0.2, 0.8], (10, 1))
    assert expected_calibration_error(p, y) == pytest.approx(0.2)
    # two bins: 5 at 0.9 all correct (gap 0.1), 5 at 0.6 with 3 correct (gap 0) -> 0.05
    p = np.array([[0.1, 0.9]] * 5 + [[0.4, 0.6]] * 5)
    y = np.array([1] * 5 + [1, 1, 1, 0, 0])
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.05)


def _tempered_data(t0, n=20000, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, 3))
    q = apply_temperature(z, t0)
    y = (rng.uniform(size=(n, 1)) > np.cumsum(q, axis=1)).sum(axis=1)
    return z, y


def test_fit_temperature_recovers_known_temperature():
    z, y = _tempered_data(2.0)
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.1)
    zc, yc = _tempered_data(1.0, seed=1)
    assert fit_temperature(3 * zc, yc) > 1.5  # over-confident logits get T > 1
    assert 0.05 <= fit_temperature(np.zeros((10, 3)), np.arange(10) % 3) <= 20


def test_calibration_summary_improves_overconfident_model():
    z, y = _tempered_data(1.0, n=6000, seed=2)
    s = calibration_summary(3 * z[:3000], y[:3000], 3 * z[3000:], y[3000:])
    assert s["temperature"] == pytest.approx(3.0, rel=0.15)
    assert s["ece_after"] < s["ece_before"] and s["ece_after"] < 0.05
    assert s["nll_after"] < s["nll_before"]


def test_bootstrap_width_matches_binomial_theory():
    y = np.repeat([0, 1], 200)
    correct = np.tile(np.r_[np.ones(160, bool), np.zeros(40, bool)], 2)  # accuracy 0.8, n=400
    ci = bootstrap_ci(y, onehot_probs(np.where(correct, y, 1 - y), C=2), ["A", "B"])
    width = ci["accuracy"][1] - ci["accuracy"][0]
    assert width == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / 400), rel=0.25)
    assert ci["accuracy"][0] <= 0.8 <= ci["accuracy"][1]


def test_bootstrap_coverage_of_true_accuracy():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 200)
    hits = 0
    for i in range(100):
        pred = np.where(rng.uniform(size=400) < 0.8, y, 1 - y)
        ci = bootstrap_ci(y, onehot_probs(pred, C=2), ["A", "B"], n_resamples=200, seed=i)
        hits += ci["accuracy"][0] <= 0.8 <= ci["accuracy"][1]
    assert hits >= 88


def test_bootstrap_contains_point_estimates_and_is_fast():
    y, p = random_case(n=2000)
    m = compute_metrics(y, p, NAMES)
    t = time.perf_counter()
    ci = bootstrap_ci(y, p, NAMES, n_resamples=1000)
    assert time.perf_counter() - t < 10  # ~0.2 s on one core
    assert set(ci) == {"accuracy", "macro_f1", "auc_macro"} | {f"recall_{k}" for k in NAMES}
    for key, point in [("accuracy", m["accuracy"]), ("macro_f1", m["macro_f1"]),
                       ("auc_macro", m["auc_macro"])]:
        assert ci[key][0] <= point <= ci[key][1] and ci[key][1] - ci[key][0] < 0.1
    for k in NAMES:
        assert ci[f"recall_{k}"][0] <= m["per_class"][k]["recall"] <= ci[f"recall_{k}"][1]
    assert bootstrap_ci(y, p, NAMES, n_resamples=100, seed=5) == \
        bootstrap_ci(y, p, NAMES, n_resamples=100, seed=5)


def test_bootstrap_widened_to_include_degenerate_estimate():
    y = np.array([0] * 20 + [1])  # one positive, always right: every resample has recall 1
    pred = np.r_[np.zeros(20, int), 1]
    ci = bootstrap_ci(y, onehot_probs(pred, C=2), ["A", "B"], n_resamples=200)
    assert ci["recall_B"] == [1.0, 1.0] and ci["auc_macro"] == [1.0, 1.0]


def test_choose_threshold_by_hand():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.75, 0.4, 0.2, 0.1])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
    r = choose_threshold(y, np.stack([1 - s, s], 1), 1, 0.6)
    assert r["class"] == 1 and r["threshold"] == 0.7 and r["recall"] == 0.6
    assert r["specificity"] == pytest.approx(3 / 4)  # 0.75 is the one false positive
    assert choose_threshold(y, np.stack([1 - s, s], 1), 1, 1.0)["threshold"] == 0.5


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_choose_threshold_is_largest_reaching_target(target):
    y, p = random_case(n=500, seed=4)
    r = choose_threshold(y, p, 2, target)
    s, pos = p[:, 2], y == 2
    assert r["recall"] >= target and np.mean(s[pos] >= r["threshold"]) == r["recall"]
    higher = s[pos][s[pos] > r["threshold"]]
    if higher.size:  # the next larger candidate threshold misses the target
        assert np.mean(s[pos] >= higher.min()) < target
    pred = predict_with_thresholds(p, {2: r["threshold"]})
    op = operating_point(y, pred, 2)
    assert op["sensitivity"] >= target and op["specificity"] <= r["specificity"] + 1e-12


def test_predict_with_thresholds_rules():
    p = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.3, 0.35, 0.35], [0.2, 0.5, 0.3]])
    pred = predict_with_thresholds(p, {1: 0.3, 2: 0.25})
    # row0: 1 fires (1.0) -> 1; row1: 2 fires -> 2; row2: both fire, 0.35/.25 > .35/.3 -> 2;
    # row3: 1 ratio 1.67 vs 2 ratio 1.2 -> 1
    assert pred.tolist() == [1, 2, 2, 1]
    assert predict_with_thresholds(p, {1: 0.9}).tolist() == [0, 0, 2, 2]  # argmax over the rest
    assert predict_with_thresholds(p, {}).tolist() == p.argmax(1).tolist()


def test_operating_point_by_hand():
    r = operating_point([1, 1, 1, 0, 0], [1, 0, 1, 1, 0], 1)
    assert r == {"sensitivity": pytest.approx(2 / 3), "specificity": 0.5}


def test_group_metrics_per_group():
    y, p = random_case(n=300, seed=5)
    groups = np.where(np.arange(300) % 3 == 0, "siteA", "siteB")
    g = group_metrics(y, p, NAMES, groups)
    assert list(g) == ["siteA", "siteB"] and g["siteA"]["n"] == 100 and g["siteB"]["n"] == 200
    assert g["siteA"] == compute_metrics(y[groups == "siteA"], p[groups == "siteA"], NAMES)


def test_to_jsonable_and_write_metrics(tmp_path):
    obj = {"a": np.int64(3), "b": np.float32(0.5), "c": np.array([1.0, np.nan]),
           "d": float("inf"), 5: (np.bool_(True), [np.float64("nan")])}
    out = to_jsonable(obj)
    assert out == {"a": 3, "b": 0.5, "c": [1.0, None], "d": None, "5": [True, [None]]}
    json.dumps(out, allow_nan=False)
    paths = write_metrics(tmp_path / "run", {"x": np.nan}, "report")
    assert json.loads(paths[0].read_text()) == {"x": None}
    assert paths[1].read_text() == "report"


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(CxrlabError, match="shape"):
        compute_metrics([0, 1], np.ones((3, 3)) / 3, NAMES)
    with pytest.raises(CxrlabError, match="columns"):
        compute_metrics([0, 1], np.ones((2, 2)) / 2, NAMES)
    with pytest.raises(CxrlabError, match="0..2"):
        compute_metrics([0, 5], np.ones((2, 3)) / 3, NAMES)
    with pytest.raises(CxrlabError, match="NaN"):
        compute_metrics([0, 1], np.full((2, 3), np.nan), NAMES)
    with pytest.raises(CxrlabError, match="target_recall"):
        choose_threshold([0, 1], np.ones((2, 2)) / 2, 1, 1.5)
    with pytest.raises(CxrlabError, match="no samples"):
        choose_threshold([0, 0], np.ones((2, 2)) / 2, 1, 0.9)


def test_bootstrap_statistics_agree_with_compute_metrics_on_unit_weights():
    from cxrlab.metrics import _resample_stats

    y, p = random_case(n=400, seed=6)
    pred = predict_with_thresholds(p, {2: 0.2})
    m = compute_metrics(y, p, NAMES, y_pred=pred)
    s = _resample_stats(y, pred, p, np.ones((1, y.size)))
    assert s["accuracy"][0] == pytest.approx(m["accuracy"])
    assert s["macro_f1"][0] == pytest.approx(m["macro_f1"])
    assert s["auc_macro"][0] == pytest.approx(m["auc_macro"])
    assert s["recall"][0] == pytest.approx([m["per_class"][k]["recall"] for k in NAMES])


def test_macro_f1_leaves_out_a_class_absent_and_never_predicted():
    """A 3-class model evaluated at a site without one class: macro-F1 averages the classes in the labels or the
    predictions (sklearn's default), as auc_macro averages the classes with positives; the text report says so."""
    from sklearn.metrics import f1_score

    from cxrlab.metrics import classification_report_text, compute_metrics

    names = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    y = np.array([0, 0, 0, 2, 2, 2])
    probs = np.array([[.8, .1, .1], [.7, .1, .2], [.3, .1, .6], [.2, .1, .7], [.1, .2, .7], [.6, .1, .3]])
    m = compute_metrics(y, probs, names)
    assert m["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro")) == pytest.approx(2 / 3)
    assert m["per_class"]["PNEUMONIA"]["support"] == 0
    text = classification_report_text(y, probs.argmax(1), names)
    assert "PNEUMONIA: no image of this class and none predicted" in text and "macro_f1 leaves it out: 0.6667" in text
    pred = np.array([0, 1, 2, 2, 2, 0])  # PNEUMONIA predicted once although absent: it counts (F1 0)
    assert compute_metrics(y, probs, names, y_pred=pred)["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro"))
    assert "macro_f1 leaves" not in classification_report_text(y, pred, names)
