"""DeLong's test for two correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988), in O(n log n) by midranks
(Sun & Xu 2014, "Fast implementation of DeLong's algorithm"), and Holm's step-down correction.

For m positive and n negative images, the structural components of classifier k are
V10_i = P(score of positive i > score of a negative) and V01_j = P(score of a positive > score of negative j), ties
counting 1/2; AUC_k = mean(V10). Their covariances S10 (over positives) and S01 (over negatives) give
Var(AUC_a - AUC_b) = (S10_aa + S10_bb - 2 S10_ab) / m + (S01_aa + S01_bb - 2 S01_ab) / n, and z = (AUC_a - AUC_b)
/ sqrt(that). With midranks: V10_i = (rank of positive i among all - its rank among positives) / n and
V01_j = 1 - (rank of negative j among all - its rank among negatives) / m.

DeLong's test treats images as independent; several images of one patient are not, so its p-values are somewhat
optimistic when patients have many images (the paired patient bootstrap in `compare` has no such assumption).
"""

import math

import numpy as np


def midranks(x):
    """1-based ranks of `x` with ties given their average rank (scipy.stats.rankdata's "average"), O(n log n)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1 .. end
    out = np.empty(len(x), dtype=np.float64)
    out[order] = ranks_sorted
    return out


def structural_components(y_true, scores):
    """(V10 [K, m], V01 [K, n]) of K score vectors `scores` [K, N] for the binary labels `y_true` [N]."""
    y = np.asarray(y_true) > 0.5
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both positive and negative images")
    v10, v01 = [], []
    for s in scores:
        pos, neg = s[y], s[~y]
        tz = midranks(np.concatenate([pos, neg]))
        tx, ty = midranks(pos), midranks(neg)
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    return np.array(v10), np.array(v01)


def delong_covariance(y_true, scores):
    """(AUCs [K], covariance of the AUCs [K, K]) by DeLong's method."""
    v10, v01 = structural_components(y_true, scores)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(v10), len(v10)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(v01), len(v01)))
    return v10.mean(axis=1), s10 / m + s01 / n


def _normal_two_sided(z):
    return math.erfc(abs(z) / math.sqrt(2.0))


def delong_test(y_true, scores_a, scores_b):
    """{auc_a, auc_b, delta (a - b), se, z, p}: DeLong's two-sided test of AUC_a = AUC_b on the same images.
    A zero standard error gives p 1 when the AUCs are equal (e.g. identical rankings) and z, p None otherwise (one
    positive or one negative: nothing to estimate the variance from)."""
    aucs, cov = delong_covariance(y_true, np.vstack([scores_a, scores_b]))
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-15:
        z, p = (0.0, 1.0) if abs(delta) <= 1e-15 else (None, None)
    else:
        z = delta / se
        p = _normal_two_sided(z)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": delta, "se": se,
            "z": None if z is None else float(z), "p": None if p is None else float(p)}


def holm(p_values):
    """Holm's step-down adjusted p-values (family-wise error), in the input order; None entries stay None."""
    idx = [i for i, p in enumerate(p_values) if p is not None]
    adjusted = [None] * len(p_values)
    k = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
