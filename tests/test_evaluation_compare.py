"""Paired comparison: DeLong's test against a slow O(n^2) reference, Holm by hand, a known AUC difference recovered
from synthetic predictions, the same patient resamples for both models, and refusal of runs on other images."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score

from cxrkeras.cli import cli
from cxrkeras.errors import CxrError
from cxrkeras.evaluation import compare, delong


def slow_delong(y, scores):
    """DeLong 1988 written out: psi(x, y) over every positive-negative pair, O(m n) per classifier."""
    y = np.asarray(y) > 0.5
    k = len(scores)
    v10, v01 = [], []
    for s in scores:
        pos, neg = s[y], s[~y]
        psi = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.array([[np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1) for b in range(k)]
                    for a in range(k)])
    s01 = np.array([[np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1) for b in range(k)]
                    for a in range(k)])
    aucs = v10.mean(axis=1)
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    return aucs, cov, z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("n, ties", [(40, False), (300, True), (1001, True)])
def test_fast_delong_equals_the_slow_reference(n, ties):
    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.3).astype(float)
    a = rng.normal(size=n) + 1.0 * y
    b = 0.6 * a + rng.normal(size=n) + 0.4 * y  # correlated with a, as two models of one image set
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    aucs, cov, z, p = slow_delong(y, [a, b])
    fast_aucs, fast_cov = delong.delong_covariance(y, np.vstack([a, b]))
    test = delong.delong_test(y, a, b)
    np.testing.assert_allclose(fast_aucs, aucs, atol=1e-10, rtol=0)
    np.testing.assert_allclose(fast_cov, cov, atol=1e-10, rtol=0)
    assert abs(test["z"] - z) < 1e-10 and abs(test["p"] - p) < 1e-10
    assert abs(test["auc_a"] - roc_auc_score(y, a)) < 1e-12 and abs(test["auc_b"] - roc_auc_score(y, b)) < 1e-12


def test_midranks_are_scipys_average_ranks():
    x = np.round(np.random.default_rng(0).random(500), 2)
    np.testing.assert_array_equal(delong.midranks(x), rankdata(x, method="average"))


def test_holm_by_hand():
    # sorted: .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 = .04 -> kept at .06 (step-down is monotone)
    assert delong.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert delong.holm([0.5, None, 0.9]) == [1.0, None, 1.0]  # .5 x2 = 1, .9 x1 = .9 -> kept at 1


def synthetic(seed=0, patients=600, per_patient=3, separations=(1.5, 1.0, 1.0), worse=(0.8, 1.0, 1.0)):
    """Images of `patients` patients; label j is positive for a patient's images with prevalence 0.3; model A's
    score is normal with mean separations[j] * y, model B's worse[j] * y (unit variance, independent noise), so the
    true AUCs are Phi(d / sqrt(2))."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i}" for i in range(patients)], per_patient)
    n, labels = len(groups), len(separations)
    y = np.repeat(rng.random((patients, labels)) < 0.3, per_patient, axis=0).astype(float)
    a = rng.normal(size=(n, labels)) + np.array(separations) * y
    b = rng.normal(size=(n, labels)) + np.array(worse) * y
    return y, a, b, groups


def test_a_known_difference_is_recovered():
    y, a, b, groups = synthetic()
    r = compare.paired_comparison(y, a, b, groups, ["better", "same", "same2"], n_boot=400, seed=1)
    true_delta = norm.cdf(1.5 / math.sqrt(2)) - norm.cdf(0.8 / math.sqrt(2))  # 0.1414
    better = r["per_label"]["better"]
    assert better["ci_low"] < true_delta < better["ci_high"]
    assert better["delta"] == pytest.approx(true_delta, abs=0.04)
    assert better["delong_p_holm"] < 1e-4 and better["p_bootstrap"] < 0.01 and "better" in r["significant_labels"]
    for name in ("same", "same2"):  # no true difference: the CI covers 0, nothing significant
        e = r["per_label"][name]
        assert e["ci_low"] < 0 < e["ci_high"] and e["delong_p_holm"] > 0.05
    mean = r["mean"]
    assert mean["delta"] == pytest.approx(np.mean([r["per_label"][n]["delta"] for n in r["labels"]]))
    assert mean["ci_low"] < true_delta / 3 < mean["ci_high"] and mean["n_boot_valid"] == 400


def test_the_same_resamples_score_both_models():
    y, a, b, groups = synthetic(seed=2, patients=60, per_patient=2)
    same = compare.paired_comparison(y, a, a, groups, ["x", "y", "z"], n_boot=100, seed=0)
    for e in list(same["per_label"].values()) + [same["mean"]]:
        # identical scores on identical resamples: every resampled difference is exactly 0
        assert e["delta"] == 0 and e["ci_low"] == 0 and e["ci_high"] == 0
    assert all(same["per_label"][n]["delong_p"] == 1.0 for n in "xyz")
    # paired: adding a constant to B's scores changes no ranking, hence no AUC and no resampled difference
    shifted = compare.paired_comparison(y, a, b, groups, list("xyz"), n_boot=100, seed=0)
    shifted2 = compare.paired_comparison(y, a, b + 3.0, groups, list("xyz"), n_boot=100, seed=0)
    assert shifted["mean"] == shifted2["mean"]


def write_predictions(folder, ids, patients, y, p, labels):
    os.makedirs(folder, exist_ok=True)
    cols = {"image_index": ids, "patient_id": patients}
    cols.update({f"true_{lbl}": y[:, j].astype(int) for j, lbl in enumerate(labels)})
    cols.update({f"prob_{lbl}": p[:, j] for j, lbl in enumerate(labels)})
    path = os.path.join(folder, "predictions_test.csv")
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def test_compare_runs_aligns_rows_refuses_other_images_and_writes_its_files(tmp_path):
    y, a, b, groups = synthetic(seed=3, patients=80, per_patient=2)
    labels = ["L1", "L2", "L3"]
    ids = [f"img{i:04d}.png" for i in range(len(y))]
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    write_predictions(run_a / "evaluation" / "test", ids, groups, y, a, labels)
    order = np.random.default_rng(0).permutation(len(y))  # B's evaluation lists the images in another order
    write_predictions(run_b / "evaluation" / "test", [ids[i] for i in order], groups[order], y[order], b[order],
                      labels)
    result = compare.compare_runs(str(run_a), str(run_b), n_boot=50, log=lambda *_: None)
    direct = compare.paired_comparison(y, a, b, groups, labels, n_boot=50)
    assert result["mean"] == direct["mean"] and result["per_label"] == direct["per_label"]
    for name in ("compare.json", "compare.md", "compare.png"):
        assert os.path.getsize(os.path.join(result["out_dir"], name)) > 0
    assert result["out_dir"] == os.path.join(str(run_a), "comparisons", "run_b-test")

    other = tmp_path / "run_c"
    write_predictions(other / "evaluation" / "test", ids[:-5] + [f"x{i}" for i in range(5)], groups, y, b, labels)
    with pytest.raises(CxrError, match="not evaluated on the same test images.*5 image.*only in run_a"):
        compare.compare_runs(str(run_a), str(other), n_boot=10, log=lambda *_: None)
    relabelled = tmp_path / "run_d"
    y2 = y.copy()
    y2[0, 0] = 1 - y2[0, 0]
    write_predictions(relabelled / "evaluation" / "test", ids, groups, y2, b, labels)
    with pytest.raises(CxrError, match="the same images with different labels"):
        compare.compare_runs(str(run_a), str(relabelled), n_boot=10, log=lambda *_: None)

    res = CliRunner().invoke(cli, ["compare", str(run_a), str(run_b), "--n-boot", "50", "--out",
                                   str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "ΔAUC A − B" in res.output and "DeLong p, Holm" in res.output
    (tmp_path / "unevaluated").mkdir()
    res = CliRunner().invoke(cli, ["compare", str(run_a), str(tmp_path / "unevaluated")])
    assert res.exit_code != 0 and "cxrkeras evaluate" in res.output and "Traceback" not in res.output
