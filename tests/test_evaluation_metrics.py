"""Evaluation metrics against values computed by hand on a small fixed prediction set."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrkeras.evaluation import metrics as M
from cxrkeras.evaluation import published

# Ten images, three labels. A: positives score .9 .7 .6 among seven negatives; C: positives .9 and .3 with three
# negatives (.8 .7 .6) between them; E: no positive at all.
A_S = [0.9, 0.8, 0.7, 0.3, 0.2, 0.6, 0.15, 0.1, 0.05, 0.01]
A_Y = [1, 0, 1, 0, 0, 1, 0, 0, 0, 0]
C_S = [0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03]
C_Y = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
E_S = [0.7, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1, 0.2, 0.4, 0.1]
E_Y = [0] * 10
LABELS = ["A", "C", "E"]
Y = np.array([A_Y, C_Y, E_Y], dtype=float).T
P = np.array([A_S, C_S, E_S]).T
PATIENTS = [f"p{i}" for i in range(10)]


def test_auc_hand_values_and_excluded_label():
    # C's positives come from 2 patients: estimable only when at least 2 are asked for (the default is 5)
    r = M.auc_with_ci(Y, P, PATIENTS, LABELS, n_boot=300, seed=1, min_patients=2)
    # A: .9 beats 7 negatives, .7 and .6 beat 6 each -> 19/21.  C: .9 beats 8, .3 beats 5 -> 13/16.
    assert r["per_label"]["A"]["auc"] == pytest.approx(19 / 21)
    assert r["per_label"]["C"]["auc"] == pytest.approx(13 / 16)
    assert r["per_label"]["E"]["auc"] is None
    assert r["per_label"]["E"]["reason"] == "no positive images in this split"
    assert r["mean"]["auc"] == pytest.approx((19 / 21 + 13 / 16) / 2)
    assert r["mean"]["labels_used"] == ["A", "C"] and "E" in r["mean"]["excluded"]
    for entry in (r["per_label"]["A"], r["per_label"]["C"], r["mean"]):
        assert entry["ci_low"] <= entry["auc"] <= entry["ci_high"]
        assert entry["ci_high"] - entry["ci_low"] > 0.01
    # with 2-3 positives among 10 patients some resamples lack a class: skipped, counted, CI still defined
    assert 0 < r["per_label"]["C"]["n_boot_valid"] < 300
    # the mean of a resample averages the labels defined in it: it counts whenever one is defined
    valid = [r["per_label"][k]["n_boot_valid"] for k in ("A", "C")]
    assert max(valid) <= r["mean"]["n_boot_valid"] <= 300
    assert r["mean"]["n_boot_all_labels"] <= min(valid) < r["mean"]["n_boot_valid"]


def test_bootstrap_is_seeded():
    a = M.auc_with_ci(Y, P, PATIENTS, LABELS, n_boot=50, seed=3, min_patients=2)
    b = M.auc_with_ci(Y, P, PATIENTS, LABELS, n_boot=50, seed=3, min_patients=2)
    c = M.auc_with_ci(Y, P, PATIENTS, LABELS, n_boot=50, seed=4, min_patients=2)
    assert a == b and a["mean"]["ci_low"] != c["mean"]["ci_low"]


def test_weighted_auc_matches_sklearn_with_ties(rng):
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # heavy ties
    w = rng.integers(0, 4, size=(6, 300)).astype(float)
    ours = M._SortedLabel(y, s).auc(w)
    ref = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_resampling_groups_images_by_patient(rng):
    groups = np.array(["a", "a", "a", "b", "c", "c", "d"])
    for w in M.patient_bootstrap_weights(groups, 40, rng):
        assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 1] == w[:, 2]) and np.all(w[:, 4] == w[:, 5])
        # four patients drawn with replacement: patient counts sum to 4
        np.testing.assert_allclose(w[:, [0, 3, 4, 6]].sum(axis=1), 4)


def test_patient_bootstrap_ignores_duplicated_images(rng):
    """Ten copies of each image under one patient give exactly the CI of the originals; image-wise is narrower."""
    y = (rng.random(60) < 0.3).astype(float)
    s = rng.random(60) * 0.7 + 0.3 * y
    ids = [f"p{i}" for i in range(60)]
    base = M.auc_with_ci(y, s, ids, ["x"], n_boot=200, seed=7)["per_label"]["x"]
    yd, sd = np.repeat(y, 10), np.repeat(s, 10)
    by_patient = M.auc_with_ci(yd, sd, np.repeat(ids, 10), ["x"], n_boot=200, seed=7)["per_label"]["x"]
    by_image = M.auc_with_ci(yd, sd, np.arange(600), ["x"], n_boot=200, seed=7)["per_label"]["x"]
    assert by_patient["auc"] == pytest.approx(base["auc"])
    assert (by_patient["ci_low"], by_patient["ci_high"]) == pytest.approx((base["ci_low"], base["ci_high"]))
    assert (by_image["ci_high"] - by_image["ci_low"]) < 0.6 * (by_patient["ci_high"] - by_patient["ci_low"])


def test_average_precision_hand_values():
    r = M.average_precision(Y, P, LABELS)
    # A: positives ranked 1, 3, 4 -> (1 + 2/3 + 3/4) / 3.  C: ranked 1 and 5 -> (1 + 2/5) / 2.
    assert r["per_label"]["A"]["ap"] == pytest.approx(29 / 36)
    assert r["per_label"]["C"]["ap"] == pytest.approx(0.7)
    assert r["per_label"]["E"]["ap"] is None
    assert r["map"] == pytest.approx((29 / 36 + 0.7) / 2)


def test_thresholds_hand_values():
    t = M.choose_thresholds(Y, P, LABELS)
    # A: J = 1/3, 2/3-1/7, 1-1/7 at .9/.7/.6 -> .6; F1 = 6/7 at .6 is the best.
    assert t["youden"]["A"]["threshold"] == pytest.approx(0.6)
    assert t["f1"]["A"]["threshold"] == pytest.approx(0.6)
    # C: J(.9) = .5, J(.3) = 1 - 3/8 -> .3; F1(.9) = 2/3 > F1(.3) = 4/7 -> .9
    assert t["youden"]["C"]["threshold"] == pytest.approx(0.3)
    assert t["f1"]["C"]["threshold"] == pytest.approx(0.9)
    assert t["youden"]["E"]["threshold"] == 0.5 and "no positive" in t["youden"]["E"]["reason"]


def test_binary_metrics_at_fixed_thresholds():
    r = M.binary_metrics(Y, P, [0.6, 0.9, 0.5], LABELS)
    a, c, e = (r["per_label"][k] for k in LABELS)
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (3, 1, 0, 6)
    assert a["sensitivity"] == 1.0 and a["specificity"] == pytest.approx(6 / 7) and a["f1"] == pytest.approx(6 / 7)
    assert c["sensitivity"] == 0.5 and c["specificity"] == 1.0 and c["f1"] == pytest.approx(2 / 3)
    assert e["sensitivity"] is None and e["specificity"] == pytest.approx(0.9)
    assert r["micro_f1"] == pytest.approx(8 / 11)  # TP 4, FP 2, FN 1
    assert r["macro_f1"] == pytest.approx((6 / 7 + 2 / 3) / 2)  # E has no positives: not in the macro mean
    assert r["hamming_loss"] == pytest.approx(3 / 30)


def test_binary_metrics_agree_with_sklearn(rng):
    """Accuracy, recall, specificity, precision, F1 and the confusion matrix at a threshold, as scikit-learn
    computes them from the thresholded predictions (ties at the threshold count as positive)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

    y = (rng.random((300, 2)) < [0.3, 0.6]).astype(float)
    p = np.round(np.clip(0.25 * y + rng.random((300, 2)) * 0.75, 0, 1), 2)  # rounded: ties at the threshold
    thresholds = [0.5, p[7, 1]]
    r = M.binary_metrics(y, p, thresholds, ["a", "b"])
    for j, name in enumerate(["a", "b"]):
        e, truth, pred = r["per_label"][name], y[:, j] > 0.5, p[:, j] >= thresholds[j]
        tn, fp, fn, tp = confusion_matrix(truth, pred, labels=[False, True]).ravel()
        assert e["confusion_matrix"] == confusion_matrix(truth, pred, labels=[False, True]).tolist()
        assert (e["tp"], e["fp"], e["fn"], e["tn"]) == (tp, fp, fn, tn)
        assert e["accuracy"] == pytest.approx(accuracy_score(truth, pred))
        assert e["sensitivity"] == pytest.approx(recall_score(truth, pred))
        assert e["specificity"] == pytest.approx(recall_score(~truth, ~pred))
        assert e["precision"] == pytest.approx(precision_score(truth, pred))
        assert e["f1"] == pytest.approx(f1_score(truth, pred))


def test_threshold_table_and_binary_summary():
    from cxrkeras.evaluation import report

    y, p = np.array(A_Y, float)[:, None], np.array(A_S)[:, None]
    r = M.compute_all(y, p, PATIENTS, ["A"], y_val=y, p_val=p, n_boot=50, min_patients=3)
    r["validation"] = {"split": "val"}
    md = report.threshold_markdown(r, "youden")  # youden on A: 0.6 -> TP 3, FP 1, FN 0, TN 6
    assert "| A | 0.6000 | 0.900 | 1.000 | 0.857 | 0.750 | 0.857 | 3 | 1 | 0 | 6 |" in md
    assert "| **true no A** | 6 (TN) | 1 (FP) |" in md and "| **true A** | 0 (FN) | 3 (TP) |" in md
    assert "chosen on the 'val' split (Youden J)" in md
    text = report.binary_summary(r, "youden")
    assert "A vs not: AUC 0.905 (95% CI" in text and "accuracy 0.900" in text and "specificity 0.857" in text
    assert text.splitlines()[-1].split() == ["true", "A", "0", "(FN)", "3", "(TP)"]
    assert text.splitlines()[-2].split() == ["true", "no", "A", "6", "(TN)", "1", "(FP)"]
    # 3 positive patients, fewer than the default 5: the point AUC and the reason, no CI
    few = M.compute_all(y, p, PATIENTS, ["A"], y_val=y, p_val=p, n_boot=50)
    assert "A vs not: AUC 0.905 (no CI: not estimable: its positives come from 3 patients, fewer than 5)" in \
        report.binary_summary(few, "youden")
    r3 = M.compute_all(Y, P, PATIENTS, LABELS, y_val=Y, p_val=P, n_boot=0)
    assert report.binary_summary(r3, "youden") is None
    assert "Confusion matrix" not in report.threshold_markdown(r3, "f1")
    assert "0.5 for E (single-class on validation)" in report.threshold_markdown(dict(r3, validation={"split": "val"}), "f1")


def test_expected_calibration_error_hand_value():
    y, p = [1, 0, 1, 0], [0.95, 0.05, 0.55, 0.45]
    assert M.expected_calibration_error(y, p, 10) == pytest.approx((0.05 + 0.05 + 0.45 + 0.45) / 4)
    bins = M.reliability_bins(y, p, 10)
    assert [b["count"] for b in bins] == [1, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_compute_all_is_strict_json_and_comparison_table():
    r = M.compute_all(Y, P, PATIENTS, LABELS, y_val=Y, p_val=P, n_boot=50)
    json.dumps(M.to_jsonable(r), allow_nan=False)
    assert r["at_thresholds"]["f1"]["per_label"]["C"]["threshold"] == pytest.approx(0.9)
    md = published.comparison_markdown(r["auc"], LABELS)
    assert "CheXNet" not in md and "| C | 0.8125 (" in md and "E: left out of the mean (no positive images" in md


def test_published_table_has_nih_labels():
    from cxrkeras.labels import NIH_LABELS

    columns, table = published.load_published()
    assert set(table) == set(NIH_LABELS) | {"Mean"}
    assert table["Hernia"]["paper (2)"] == pytest.approx(0.954) and table["Mean"]["CheXNet"] == pytest.approx(0.841)
    auc = {"per_label": {k: {"auc": 0.8, "ci_low": 0.7, "ci_high": 0.9, "positives": 5} for k in NIH_LABELS},
           "mean": {"auc": 0.8, "ci_low": 0.75, "ci_high": 0.85, "excluded": {}, "labels_used": list(NIH_LABELS)}}
    header, rows = published.comparison_rows(auc, list(NIH_LABELS))
    assert header[3:] == columns and rows[-1][-1] == "0.8818" and rows[0][1] == "0.8000 (0.7000–0.9000)"


def test_a_label_with_positives_from_few_patients_is_not_estimable(rng):
    """Hernia-like: one positive image among 200 patients keeps its point AUC but gets no CI and leaves the mean."""
    n = 400
    groups = np.repeat([f"p{i}" for i in range(200)], 2)
    y = np.zeros((n, 2))
    y[:, 0] = np.repeat(rng.random(200) < 0.3, 2)
    y[7, 1] = 1  # one positive image (patient p3)
    p = rng.random((n, 2)) * 0.7 + 0.3 * y
    r = M.auc_with_ci(y, p, groups, ["common", "rare"], n_boot=200, seed=0)
    rare = r["per_label"]["rare"]
    assert rare["auc"] == pytest.approx(roc_auc_score(y[:, 1], p[:, 1])) and not rare["estimable"]
    assert rare["ci_low"] is None and rare["positive_patients"] == 1
    assert "1 patient, fewer than 5" in rare["reason"]
    assert r["mean"]["labels_used"] == ["common"] and "rare" in r["mean"]["excluded"]
    assert r["mean"]["auc"] == pytest.approx(r["per_label"]["common"]["auc"])
    assert r["per_label"]["common"]["estimable"] and r["min_patients"] == 5
    table = published.comparison_markdown(r, ["common", "rare"])
    assert "rare: left out of the mean (not estimable: its positives come from 1 patient" in table


def test_mean_ci_averages_each_resample_over_its_defined_labels(rng):
    """Against a brute force: the same patient resamples drawn again, each resample's images concatenated
    explicitly, scikit-learn's AUC of every label defined in it, their mean, its percentiles."""
    patients = 20
    groups = np.repeat([f"p{i}" for i in range(patients)], 2)
    n = len(groups)
    y = np.zeros((n, 3))
    y[:, 0] = np.repeat(rng.random(patients) < 0.4, 2)
    y[:, 1] = np.repeat(np.arange(patients) < 2, 2)  # 2 positive patients: missing from ~12% of the resamples
    y[:, 2] = np.repeat(rng.random(patients) < 0.5, 2)
    p = rng.random((n, 3)) * 0.6 + 0.4 * y * rng.random((n, 3))
    r = M.auc_with_ci(y, p, groups, ["a", "b", "c"], n_boot=300, seed=11, min_patients=2)

    _, patient_of_image = np.unique(groups.astype(str), return_inverse=True)
    draws = np.random.default_rng(11).integers(0, patients, size=(300, patients))
    means, complete = [], 0
    for d in draws:
        rows = np.concatenate([np.flatnonzero(patient_of_image == k) for k in d])
        aucs = [roc_auc_score(y[rows, j], p[rows, j]) for j in range(3) if 0 < y[rows, j].sum() < len(rows)]
        means.append(np.mean(aucs))
        complete += len(aucs) == 3
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert r["mean"]["ci_low"] == pytest.approx(lo, abs=1e-12) and r["mean"]["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert r["mean"]["n_boot_valid"] == 300 and r["mean"]["n_boot_all_labels"] == complete < 300
