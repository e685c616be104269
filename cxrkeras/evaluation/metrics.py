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


def auc_with_ci(y_true, y_prob, groups, labels=None, n_boot=1000, seed=0, confidence=0.95):
    """Per-label ROC AUC and their mean, each with a percentile bootstrap CI resampled by patient.

    A label without positives (or negatives) gets NaN with a reason and is left out of the mean. In a resample
    where an evaluable label happens to be single-class, that label's AUC is skipped for that resample; the mean's
    CI uses only resamples in which every evaluable label is defined (counts are reported).
    Returns {"per_label": {label: {auc, ci_low, ci_high, n_boot_valid, positives, negatives, reason}},
             "mean": {auc, ci_low, ci_high, n_boot_valid, labels_used, excluded: {label: reason}}, ...}.
    """
    y_true, y_prob = _as_2d(y_true, y_prob)
    n, n_labels = y_true.shape
    labels = list(labels) if labels is not None else [f"label_{i}" for i in range(n_labels)]
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} patient ids for {n} predictions")
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2.0

    point = np.array(list(per_label_auc(y_true, y_prob, labels)[0].values()))
    evaluable, sorted_labels, reasons = [], {}, {}
    for j in range(n_labels):
        reason = single_class_reason(y_true[:, j])
        if reason:
            reasons[j] = reason
            continue
        evaluable.append(j)
        sorted_labels[j] = _SortedLabel(y_true[:, j], y_prob[:, j])

    boot = np.full((n_boot, n_labels), np.nan)
    if evaluable and n_boot > 0:
        row = 0
        for w in patient_bootstrap_weights(groups, n_boot, rng):
            for j in evaluable:
                boot[row:row + len(w), j] = sorted_labels[j].auc(w)
            row += len(w)

    def ci(values):
        values = values[~np.isnan(values)]
        if len(values) == 0:
            return float("nan"), float("nan"), 0
        lo, hi = np.quantile(values, [tail, 1.0 - tail])
        return float(lo), float(hi), int(len(values))

    per_label = {}
    for j, name in enumerate(labels):
        pos = int(np.sum(y_true[:, j] > 0.5))
        entry = {"auc": _f(point[j]), "positives": pos, "negatives": int(n - pos), "reason": reasons.get(j)}
        if j in reasons:
            entry.update(ci_low=None, ci_high=None, n_boot_valid=0)
        else:
            lo, hi, k = ci(boot[:, j])
            entry.update(ci_low=_f(lo), ci_high=_f(hi), n_boot_valid=k)
        per_label[name] = entry

    mean = {"auc": None, "ci_low": None, "ci_high": None, "n_boot_valid": 0,
            "labels_used": [labels[j] for j in evaluable],
            "excluded": {labels[j]: r for j, r in reasons.items()}}
    if evaluable:
        mean["auc"] = _f(np.mean(point[evaluable]))
        sub = boot[:, evaluable]
        complete = ~np.isnan(sub).any(axis=1)
        lo, hi, k = ci(sub[complete].mean(axis=1)) if complete.any() else (float("nan"), float("nan"), 0)
        mean.update(ci_low=_f(lo), ci_high=_f(hi), n_boot_valid=k)
    return {"per_label": per_label, "mean": mean, "n_boot": int(n_boot), "seed": seed, "confidence": confidence,
            "resampling": "patient", "n_patients": int(len(np.unique(groups.astype(str))))}


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
                seed=0, n_bins=10):
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
              "auc": auc_with_ci(y_true, y_prob, patient_ids, labels, n_boot=n_boot, seed=seed),
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
