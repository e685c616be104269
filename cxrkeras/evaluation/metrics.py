"""Multi-label metrics in NumPy/scikit-learn: AUC with patient-level bootstrap CIs, AP, thresholds, F1, calibration."""

import math

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from cxrkeras.constants import THRESHOLD_METHODS
from cxrkeras.fileio import jsonable

DEFAULT_THRESHOLD = 0.5


def _as_2d(y_true, y_prob):
    y_true = np.asarray(y_true, dtype=np.float64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_true.ndim == 1:
        y_true = y_true[:, None]
    if y_prob.ndim == 1:
        y_prob = y_prob[:, None]
    if y_true.shape != y_prob.shape or y_true.ndim != 2:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} must have the same [N, L] shape")
    return y_true, y_prob


def single_class_reason(y):
    """Why a label's AUC/AP/threshold is undefined on `y` (None when both classes are present)."""
    pos = int(np.sum(y > 0.5))
    if pos == 0:
        return "no positive images in this split"
    if pos == len(y):
        return "no negative images in this split"
    return None


# --- ROC AUC with a patient-level bootstrap ---------------------------------------------------------------


def per_label_auc(y_true, y_prob, labels=None):
    """({label: ROC AUC, NaN where the label is single-class}, their mean over the defined labels (NaN if none)):
    the validation metric of training and the point estimates of `auc_with_ci`."""
    y_true, y_prob = _as_2d(y_true, y_prob)
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(y_true.shape[1])]
    out = {}
    for j, name in enumerate(labels):
        defined = single_class_reason(y_true[:, j]) is None
        out[name] = float(roc_auc_score(y_true[:, j] > 0.5, y_prob[:, j])) if defined else float("nan")
    values = [v for v in out.values() if math.isfinite(v)]
    return out, (float(np.mean(values)) if values else float("nan"))


class _SortedLabel:
    """One label's scores sorted once, with tie groups, so weighted AUCs of many resamples are O(n) each."""

    def __init__(self, y, s):
        order = np.argsort(s, kind="mergesort")
        s_sorted = s[order]
        self.order = order
        self.y = (y[order] > 0.5).astype(np.float64)
        # start index of every run of equal scores: ties count 1/2, exactly like roc_auc_score
        self.starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])

    def auc(self, weights):
        """Weighted AUC for each row of `weights` [B, n] (image weights in original order); NaN if single-class."""
        w = weights[:, self.order]
        pos = np.add.reduceat(w * self.y, self.starts, axis=1)
        neg = np.add.reduceat(w * (1.0 - self.y), self.starts, axis=1)
        neg_below = np.cumsum(neg, axis=1) - neg
        p_tot, n_tot = pos.sum(axis=1), neg.sum(axis=1)
        num = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / (p_tot * n_tot)
        out[(p_tot <= 0) | (n_tot <= 0)] = np.nan
        return out


def patient_bootstrap_weights(groups, n_boot, rng):
    """Yield [b, n] image weights: patients drawn with replacement, each image weighted by its patient's count.

    Resampling patients (not images) keeps all images of a patient together, as in a patient-wise split; the
    weights are what an explicit concatenation of the drawn patients' images would give.
    """
    _, patient_of_image = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_pat = int(patient_of_image.max()) + 1
    chunk = max(1, min(n_boot, 2_000_000 // max(1, len(patient_of_image))))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n_pat, size=(b, n_pat))
        counts = np.bincount((draws + np.arange(b)[:, None] * n_pat).ravel(), minlength=b * n_pat)
        yield counts.reshape(b, n_pat)[:, patient_of_image].astype(np.float64)
        done += b


MIN_PATIENTS = 5  # a label whose positives (or negatives) come from fewer patients has no estimable CI


def patient_counts(y, groups):
    """(patients with a positive image, patients with a negative image) of one label."""
    groups = np.asarray(groups).astype(str)
    pos = y > 0.5
    return int(len(np.unique(groups[pos]))), int(len(np.unique(groups[~pos])))


def not_estimable_reason(y, groups, min_patients=MIN_PATIENTS):
    """Why a label's AUC cannot be estimated with a CI (None when it can): single-class, or its positives (or
    negatives) come from fewer than `min_patients` patients, so a patient bootstrap has nothing to resample."""
    reason = single_class_reason(y)
    if reason:
        return reason
    pos_patients, neg_patients = patient_counts(y, groups)
    for side, k in (("positives", pos_patients), ("negatives", neg_patients)):
        if k < min_patients:
            return (f"not estimable: its {side} come from {k} patient{'s' if k != 1 else ''}, fewer than "
                    f"{min_patients}")
    return None


def bootstrap_label_aucs(y_true, y_probs, groups, columns, n_boot, seed):
    """[[n_boot, L] AUCs] of the patient bootstrap, one array per score matrix in `y_probs` (a list; all scored on
    the SAME resamples, as a paired comparison needs), NaN where a resample leaves a label single-class and in the
    columns not in `columns`; `seed` fixes the resamples."""
    boots = [np.full((n_boot, y_true.shape[1]), np.nan) for _ in y_probs]
    if not columns or n_boot <= 0:
        return boots
    sorted_labels = [{j: _SortedLabel(y_true[:, j], p[:, j]) for j in columns} for p in y_probs]
    row = 0
    for w in patient_bootstrap_weights(groups, n_boot, np.random.default_rng(seed)):
        for boot, labels in zip(boots, sorted_labels):
            for j in columns:
                boot[row:row + len(w), j] = labels[j].auc(w)
        row += len(w)
    return boots


def percentile_ci(values, confidence=0.95):
    """(low, high, n) percentile interval of the finite `values`; NaNs (invalid resamples) left out and counted."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan"), 0
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi), int(len(values))


def resample_means(boot):
    """[B] mean of each resample over the labels defined in it (NaN where none is); [B] whether all were."""
    defined = np.isfinite(boot)
    counts = defined.sum(axis=1)
    with np.errstate(invalid="ignore"):
        means = np.where(counts > 0, np.nansum(boot, axis=1) / np.maximum(counts, 1), np.nan)
    return means, defined.all(axis=1)


def auc_with_ci(y_true, y_prob, groups, labels=None, n_boot=1000, seed=0, confidence=0.95,
                min_patients=MIN_PATIENTS):
    """Per-label ROC AUC and their mean, each with a percentile bootstrap CI resampled by patient.

    A label without positives (or negatives) gets NaN with a reason and is left out of the mean. A label whose
    positives (or negatives) come from fewer than `min_patients` patients keeps its point AUC but is not estimable:
    no CI, its reason given, left out of the mean. In a resample where an estimable label happens to be
    single-class, that label's AUC is skipped for that resample (`n_boot_valid` counts the others); the mean of a
    resample averages the labels defined in it, so every resample with at least one counts (`n_boot_valid`;
    `n_boot_all_labels`: those in which every label was defined).
    Returns {"per_label": {label: {auc, ci_low, ci_high, n_boot_valid, positives, negatives, positive_patients,
             estimable, reason}}, "mean": {auc, ci_low, ci_high, n_boot_valid, n_boot_all_labels, labels_used,
             excluded: {label: reason}}, ...}.
    """
    y_true, y_prob = _as_2d(y_true, y_prob)
    n, n_labels = y_true.shape
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(n_labels)]
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} patient ids for {n} predictions")

    point = np.array(list(per_label_auc(y_true, y_prob, labels)[0].values()))
    reasons = {j: r for j in range(n_labels) if (r := not_estimable_reason(y_true[:, j], groups, min_patients))}
    estimable = [j for j in range(n_labels) if j not in reasons]
    boot = bootstrap_label_aucs(y_true, [y_prob], groups, estimable, n_boot, seed)[0]

    per_label = {}
    for j, name in enumerate(labels):
        pos = int(np.sum(y_true[:, j] > 0.5))
        entry = {"auc": _f(point[j]), "positives": pos, "negatives": int(n - pos),
                 "positive_patients": patient_counts(y_true[:, j], groups)[0], "estimable": j not in reasons,
                 "reason": reasons.get(j)}
        if j in reasons:
            entry.update(ci_low=None, ci_high=None, n_boot_valid=0)
        else:
            lo, hi, k = percentile_ci(boot[:, j], confidence)
            entry.update(ci_low=_f(lo), ci_high=_f(hi), n_boot_valid=k)
        per_label[name] = entry

    mean = {"auc": None, "ci_low": None, "ci_high": None, "n_boot_valid": 0, "n_boot_all_labels": 0,
            "labels_used": [labels[j] for j in estimable], "excluded": {labels[j]: r for j, r in reasons.items()}}
    if estimable:
        mean["auc"] = _f(np.mean(point[estimable]))
        if n_boot > 0:
            means, complete = resample_means(boot[:, estimable])
            lo, hi, k = percentile_ci(means, confidence)
            mean.update(ci_low=_f(lo), ci_high=_f(hi), n_boot_valid=k, n_boot_all_labels=int(complete.sum()))
    return {"per_label": per_label, "mean": mean, "n_boot": int(n_boot), "seed": seed, "confidence": confidence,
            "resampling": "patient", "min_patients": int(min_patients),
            "n_patients": int(len(np.unique(groups.astype(str))))}


# --- average precision -----------------------------------------------------------------------------------


def average_precision(y_true, y_prob, labels=None):
    """Per-label average precision (sklearn's step-wise AP) and their mean (mAP) over labels with positives."""
    y_true, y_prob = _as_2d(y_true, y_prob)
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(y_true.shape[1])]
    per_label, used = {}, []
    for j, name in enumerate(labels):
        reason = single_class_reason(y_true[:, j])
        if reason == "no positive images in this split":
            per_label[name] = {"ap": None, "reason": reason}
            continue
        ap = float(average_precision_score(y_true[:, j] > 0.5, y_prob[:, j]))
        per_label[name] = {"ap": ap, "reason": None, "prevalence": float(np.mean(y_true[:, j] > 0.5))}
        used.append(ap)
    return {"per_label": per_label, "map": _f(np.mean(used)) if used else None}


# --- thresholds chosen on validation, applied unchanged to test ------------------------------------------


def youden_threshold(y, s):
    """Score threshold (predict positive if score >= t) maximising sensitivity + specificity - 1."""
    fpr, tpr, thr = roc_curve(y > 0.5, s)
    finite = np.isfinite(thr)
    j = np.argmax(np.where(finite, tpr - fpr, -np.inf))
    return float(thr[j])


def f1_threshold(y, s):
    """Score threshold (predict positive if score >= t) maximising F1."""
    precision, recall, thr = precision_recall_curve(y > 0.5, s)
    p, r = precision[:-1], recall[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(thr[int(np.argmax(f1))])


def choose_thresholds(y_val, p_val, labels=None, methods=THRESHOLD_METHODS):
    """{method: {label: {"threshold", "reason"}}} from the validation split.

    A label that is single-class on validation cannot have a threshold chosen: it gets DEFAULT_THRESHOLD and
    the reason is recorded.
    """
    y_val, p_val = _as_2d(y_val, p_val)
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(y_val.shape[1])]
    pick = {"youden": youden_threshold, "f1": f1_threshold}
    out = {}
    for method in methods:
        if method not in pick:
            raise ValueError(f"unknown threshold method {method!r}: choose one of {', '.join(THRESHOLD_METHODS)}")
        out[method] = {}
        for j, name in enumerate(labels):
            reason = single_class_reason(y_val[:, j])
            if reason:
                out[method][name] = {"threshold": DEFAULT_THRESHOLD,
                                     "reason": f"{reason} (validation): default {DEFAULT_THRESHOLD} used"}
            else:
                out[method][name] = {"threshold": pick[method](y_val[:, j], p_val[:, j]), "reason": None}
    return out


def threshold_vector(thresholds, labels):
    """[L] float array of thresholds in `labels` order from one method's {label: {"threshold"}} mapping."""
    return np.array([float(thresholds[name]["threshold"]) for name in labels], dtype=np.float64)


def binary_metrics(y_true, y_prob, thresholds, labels=None):
    """Accuracy, sensitivity (recall), specificity, precision, F1 and the confusion matrix per label; micro/macro
    F1 and Hamming loss at fixed thresholds (predict positive if probability >= threshold)."""
    y_true, y_prob = _as_2d(y_true, y_prob)
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(y_true.shape[1])]
    t = np.asarray(thresholds, dtype=np.float64).reshape(1, -1)
    truth = y_true > 0.5
    pred = y_prob >= t
    tp = np.sum(pred & truth, axis=0)
    fp = np.sum(pred & ~truth, axis=0)
    fn = np.sum(~pred & truth, axis=0)
    tn = np.sum(~pred & ~truth, axis=0)
    per_label, f1s = {}, []
    for j, name in enumerate(labels):
        sens = _ratio(tp[j], tp[j] + fn[j])
        spec = _ratio(tn[j], tn[j] + fp[j])
        prec = _ratio(tp[j], tp[j] + fp[j])
        f1 = _ratio(2 * tp[j], 2 * tp[j] + fp[j] + fn[j])
        per_label[name] = {"threshold": float(t[0, j]), "accuracy": _ratio(tp[j] + tn[j], len(truth)),
                           "sensitivity": sens, "specificity": spec, "precision": prec, "f1": f1,
                           "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j]),
                           # scikit-learn's layout: rows = true 0, 1; columns = predicted 0, 1
                           "confusion_matrix": [[int(tn[j]), int(fp[j])], [int(fn[j]), int(tp[j])]]}
        if tp[j] + fn[j] > 0:  # F1 of a label without positives is undefined, not 0
            f1s.append(f1)
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    return {"per_label": per_label,
            "micro_f1": _ratio(2 * TP, 2 * TP + FP + FN),
            "macro_f1": _f(np.mean(f1s)) if f1s else None,
            "hamming_loss": float(np.mean(pred != truth))}


# --- calibration -----------------------------------------------------------------------------------------


def reliability_bins(y_true, y_prob, n_bins=10):
    """Equal-width probability bins over all (image, label) pairs: count, mean confidence, observed frequency."""
    y = np.asarray(y_true, dtype=np.float64).ravel() > 0.5
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = idx == b
        k = int(m.sum())
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": k,
                     "mean_probability": _f(p[m].mean()) if k else None,
                     "observed_frequency": _f(y[m].mean()) if k else None})
    return bins


def expected_calibration_error(y_true, y_prob, n_bins=10):
    """ECE = sum over bins of (bin share) * |observed frequency - mean probability| (pooled over labels)."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["observed_frequency"] - b["mean_probability"])
                     for b in bins if b["count"]))


def calibration(y_true, y_prob, labels=None, n_bins=10):
    y_true, y_prob = _as_2d(y_true, y_prob)
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(y_true.shape[1])]
    return {"n_bins": n_bins, "ece": expected_calibration_error(y_true, y_prob, n_bins),
            "per_label_ece": {name: expected_calibration_error(y_true[:, j], y_prob[:, j], n_bins)
                              for j, name in enumerate(labels)},
            "bins": reliability_bins(y_true, y_prob, n_bins)}


# --- everything together ---------------------------------------------------------------------------------


def compute_all(y_true, y_prob, patient_ids, labels, y_val=None, p_val=None, thresholds=None, n_boot=1000,
                seed=0, n_bins=10, min_patients=MIN_PATIENTS):
    """All metrics of a split. Thresholds come from (y_val, p_val), or are given ({method: {label: {...}}})."""
    labels = list(labels)
    y_true, y_prob = _as_2d(y_true, y_prob)
    if y_true.shape[1] != len(labels):
        raise ValueError(f"{y_true.shape[1]} label columns for {len(labels)} label names")
    if thresholds is None:
        if y_val is None or p_val is None:
            raise ValueError("give validation labels/probabilities or thresholds")
        thresholds = choose_thresholds(y_val, p_val, labels)
    result = {"n_images": int(len(y_true)), "labels": labels,
              "auc": auc_with_ci(y_true, y_prob, patient_ids, labels, n_boot=n_boot, seed=seed,
                                 min_patients=min_patients),
              "average_precision": average_precision(y_true, y_prob, labels),
              "thresholds": thresholds,
              "at_thresholds": {m: binary_metrics(y_true, y_prob, threshold_vector(t, labels), labels)
                                for m, t in thresholds.items()},
              "calibration": calibration(y_true, y_prob, labels, n_bins)}
    return result


to_jsonable = jsonable  # strict-JSON conversion; cxrkeras.fileio owns it


def _ratio(a, b):
    return float(a) / float(b) if b > 0 else None


def _f(x):
    x = float(x)
    return x if math.isfinite(x) else None
