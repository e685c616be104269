"""A scikit-learn classifier per label on hand-crafted, hybrid (hand-crafted + CNN) features: fitted on train,
hyperparameters chosen by validation AUC, scored on test with the project's metrics beside the CNN alone."""

import os

import numpy as np

from cxrkeras.errors import ConfigError

CLASSIFIERS = ("logistic", "mlp")
GRIDS = {"logistic": [dict(C=c) for c in (0.001, 0.01, 0.1, 1.0)],  # inverse L2 strength on standardised features
         "mlp": [dict(hidden=h, alpha=a) for h in (64, 256) for a in (1e-3, 1e-1)]}
FEATURE_SETS = ("texture", "hybrid")  # HOG + LBP alone; HOG + LBP + the CNN embedding


def make_estimator(kind, params, seed=0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        clf = LogisticRegression(C=params["C"], max_iter=2000)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(params["hidden"],), alpha=params["alpha"], max_iter=300,
                            random_state=seed)
    else:
        raise ConfigError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}")
    return make_pipeline(StandardScaler(), clf)


def fit_per_label(x_train, y_train, x_val, y_val, labels, kind="logistic", seed=0):
    """[{label, params, val_auc, estimator | None, prior, note}] : per label the grid point of highest validation
    AUC (a label that is single-class in train gets its training prevalence; in val, the grid's middle point)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import roc_auc_score

    if kind not in GRIDS:
        raise ConfigError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}")
    grid = GRIDS[kind]
    fitted = []
    for j, label in enumerate(labels):
        yt, yv = y_train[:, j] > 0.5, y_val[:, j] > 0.5
        entry = dict(label=label, params=None, val_auc=None, estimator=None, prior=float(yt.mean()), note=None)
        if yt.all() or not yt.any():
            entry["note"] = "single-class in train: predicts the training prevalence"
            fitted.append(entry)
            continue
        scored = []
        for params in grid:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est = make_estimator(kind, params, seed).fit(x_train, yt)
            auc = roc_auc_score(yv, est.predict_proba(x_val)[:, 1]) if 0 < yv.sum() < len(yv) else None
            scored.append((auc, params, est))
        if scored[0][0] is None:
            auc, params, est = scored[len(scored) // 2]
            entry["note"] = "single-class in val: the grid's middle point, not chosen"
        else:
            auc, params, est = max(scored, key=lambda s: s[0])  # first of ties: the strongest regularisation
        entry.update(params=params, val_auc=auc, estimator=est)
        fitted.append(entry)
    return fitted


def predict(fitted, x):
    """[N, L] probabilities of the fitted per-label classifiers."""
    return np.stack([f["estimator"].predict_proba(x)[:, 1] if f["estimator"] is not None
                     else np.full(len(x), f["prior"]) for f in fitted], axis=1)


def features(split, which):
    return split["texture"] if which == "texture" else np.concatenate([split["texture"], split["embedding"]], axis=1)


def evaluate_sets(splits, labels, kind="logistic", n_boot=1000, seed=0, test_probs=None):
    """{set: {auc (auc_with_ci), at_thresholds (binary_metrics at val-chosen Youden thresholds), classifiers}} for
    texture, hybrid and cnn (the model's own outputs) on the test split; `test_probs`: a dict that receives each
    set's test probabilities."""
    from cxrkeras.evaluation.metrics import auc_with_ci, binary_metrics, choose_thresholds, threshold_vector

    train, val, test = splits["train"], splits["val"], splits["test"]
    out = {}
    for which in FEATURE_SETS + ("cnn",):
        if which == "cnn":
            p_val, p_test, chosen = val["probs"], test["probs"], None
        else:
            fitted = fit_per_label(features(train, which), train["labels"], features(val, which), val["labels"],
                                   labels, kind, seed)
            p_val, p_test = predict(fitted, features(val, which)), predict(fitted, features(test, which))
            chosen = [{k: v for k, v in f.items() if k != "estimator"} for f in fitted]
        if test_probs is not None:
            test_probs[which] = p_test
        thresholds = choose_thresholds(val["labels"], p_val, labels, methods=("youden",))
        out[which] = dict(auc=auc_with_ci(test["labels"], p_test, test["patient_ids"], labels, n_boot=n_boot,
                                          seed=seed),
                          at_thresholds=binary_metrics(test["labels"], p_test,
                                                       threshold_vector(thresholds["youden"], labels), labels),
                          classifiers=chosen, dims=None if which == "cnn" else int(features(test, which).shape[1]))
    return out


def _auc_text(entry):
    if entry.get("auc") is None:
        return "n/a"
    ci = f" ({entry['ci_low']:.3f}-{entry['ci_high']:.3f})" if entry.get("ci_low") is not None else ""
    return f"{entry['auc']:.3f}{ci}"


def format_table(result):
    """Test AUC (95% patient-bootstrap CI) per label and their mean for texture / hybrid / CNN, then F1s."""
    sets = result["sets"]
    names = {"texture": "HOG+LBP", "hybrid": "HOG+LBP+CNN", "cnn": "CNN alone"}
    head = f"{'label':<20}" + "".join(f"{names[s]:>24}" for s in sets)
    lines = [head, "-" * len(head)]
    for label in result["labels"]:
        lines.append(f"{label:<20}" + "".join(f"{_auc_text(sets[s]['auc']['per_label'][label]):>24}" for s in sets))
    lines += ["-" * len(head), f"{'mean AUC':<20}" + "".join(f"{_auc_text(sets[s]['auc']['mean']):>24}"
                                                            for s in sets)]
    for key, title in (("micro_f1", "micro-F1"), ("macro_f1", "macro-F1"), ("hamming_loss", "Hamming loss")):
        vals = [sets[s]["at_thresholds"][key] for s in sets]
        lines.append(f"{title:<20}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>24}" for v in vals))
    st = result["settings"]
    lines.append(f"test split, {result['n_test']} images; AUC CIs: {st['n_boot']} patient bootstrap resamples; F1 "
                 f"and Hamming loss at Youden thresholds chosen on val; {st['classifier']} per label, chosen by val "
                 f"AUC; features: HOG {st['hog_dim']} + LBP {st['lbp_dim']} (+ CNN {st['cnn_dim']})")
    return "\n".join(lines)


def write_result(result, out_dir):
    from cxrkeras.fileio import atomic_write, write_json

    os.makedirs(out_dir, exist_ok=True)
    json_path = write_json(os.path.join(out_dir, "hybrid.json"), result)
    text_path = os.path.join(out_dir, "hybrid.md")
    atomic_write(text_path, "```\n" + format_table(result) + "\n```\n")
    return json_path, text_path


def compare_with_cnn(splits, test_probs, labels, out_dir, n_boot=1000, seed=0, log=print):
    """`cxrkeras compare` of each feature set (A) against the CNN alone (B) on the test split: paired patient
    bootstrap ΔAUC and DeLong per label (Holm); compare.md/json/png in <out_dir>/comparisons/<set>-vs-cnn/.
    Returns {set: {mean: ..., significant labels}}."""
    from cxrkeras.evaluation.compare import delta_text, paired_comparison, write_comparison

    test, names = splits["test"], {"texture": "HOG+LBP", "hybrid": "HOG+LBP+CNN"}
    summary = {}
    for which in FEATURE_SETS:
        result = paired_comparison(test["labels"], test_probs[which], test_probs["cnn"], test["patient_ids"], labels,
                                   n_boot=n_boot, seed=seed)
        result.update(split="test", a={"name": names[which]}, b={"name": "CNN alone"})
        write_comparison(result, os.path.join(out_dir, "comparisons", f"{which}-vs-cnn"), figure=True,
                         title=f"{names[which]} (A) vs the CNN alone (B): test split", log=lambda *_: None)
        summary[which] = {"mean": result["mean"], "out_dir": result["out_dir"]}
        log(f"{names[which]} vs CNN alone: mean ΔAUC {delta_text(result['mean'])} "
            f"(paired patient bootstrap; per label with DeLong + Holm in {result['out_dir']})")
    return summary

