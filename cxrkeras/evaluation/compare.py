"""Paired comparison of two models on the same images: per-label and mean ΔAUC (A − B) with a paired patient
bootstrap (the same patient resamples score both models), DeLong's test per label with Holm's correction, a
figure; `compare_runs` reads two `cxrkeras evaluate` outputs and refuses them when their images differ.
"""

import glob
import os

import numpy as np

from cxrkeras.errors import CxrError
from cxrkeras.evaluation import delong, metrics
from cxrkeras.fileio import atomic_write, read_json_or, write_json

ALPHA = 0.05  # significance level of the Holm-corrected DeLong p-values in tables and the figure


def _bootstrap_p(deltas):
    """Two-sided bootstrap p-value of Δ = 0: twice the share of resamples on the far side of 0, as (k + 1) / (B + 1)
    so that it is never 0 (its resolution is 2 / (B + 1))."""
    d = deltas[np.isfinite(deltas)]
    if len(d) == 0:
        return None
    far = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return float(min(1.0, 2.0 * (far + 1) / (len(d) + 1)))


def paired_comparison(y_true, p_a, p_b, patient_ids, labels, n_boot=1000, seed=0, confidence=0.95,
                      min_patients=metrics.MIN_PATIENTS):
    """Compare scores `p_a` and `p_b` [N, L] of the same images (labels `y_true`, patients `patient_ids`).

    Per estimable label (see metrics.not_estimable_reason): AUC of each, Δ = AUC_a − AUC_b with its percentile CI
    and a bootstrap p-value over `n_boot` patient resamples shared by both, and DeLong's z and p (Holm-corrected over
    the estimable labels). The mean Δ averages, in each resample, the labels defined in it.
    """
    y_true, p_a = metrics._as_2d(y_true, p_a)
    _, p_b = metrics._as_2d(y_true, p_b)
    if p_a.shape != p_b.shape:
        raise ValueError(f"scores of shape {p_a.shape} and {p_b.shape} cannot be paired")
    labels = list(labels)
    groups = np.asarray(patient_ids)
    reasons = {j: r for j in range(len(labels))
               if (r := metrics.not_estimable_reason(y_true[:, j], groups, min_patients))}
    columns = [j for j in range(len(labels)) if j not in reasons]
    boot_a, boot_b = metrics.bootstrap_label_aucs(y_true, [p_a, p_b], groups, columns, n_boot, seed)
    auc_a = metrics.per_label_auc(y_true, p_a, labels)[0]
    auc_b = metrics.per_label_auc(y_true, p_b, labels)[0]
    per_label, tests = {}, []
    for j, name in enumerate(labels):
        entry = {"auc_a": metrics._f(auc_a[name]), "auc_b": metrics._f(auc_b[name]), "reason": reasons.get(j),
                 "positives": int(np.sum(y_true[:, j] > 0.5)),
                 "positive_patients": metrics.patient_counts(y_true[:, j], groups)[0]}
        if j in reasons:
            entry.update(delta=None, ci_low=None, ci_high=None, n_boot_valid=0, p_bootstrap=None, delong_z=None,
                         delong_p=None)
        else:
            d = boot_a[:, j] - boot_b[:, j]
            lo, hi, k = metrics.percentile_ci(d, confidence)
            test = delong.delong_test(y_true[:, j], p_a[:, j], p_b[:, j])
            entry.update(delta=test["delta"], ci_low=metrics._f(lo), ci_high=metrics._f(hi), n_boot_valid=k,
                         p_bootstrap=_bootstrap_p(d), delong_z=test["z"], delong_p=test["p"], delong_se=test["se"])
            tests.append(name)
        per_label[name] = entry
    for name, adjusted in zip(tests, delong.holm([per_label[n]["delong_p"] for n in tests])):
        per_label[name]["delong_p_holm"] = adjusted
    mean = {"auc_a": None, "auc_b": None, "delta": None, "ci_low": None, "ci_high": None, "n_boot_valid": 0,
            "p_bootstrap": None, "labels_used": [labels[j] for j in columns],
            "excluded": {labels[j]: r for j, r in reasons.items()}}
    if columns:
        a_mean = float(np.mean([auc_a[labels[j]] for j in columns]))
        b_mean = float(np.mean([auc_b[labels[j]] for j in columns]))
        mean.update(auc_a=a_mean, auc_b=b_mean, delta=a_mean - b_mean)
        if n_boot > 0:
            means_a, _ = metrics.resample_means(boot_a[:, columns])
            means_b, _ = metrics.resample_means(boot_b[:, columns])
            d = means_a - means_b
            lo, hi, k = metrics.percentile_ci(d, confidence)
            mean.update(ci_low=metrics._f(lo), ci_high=metrics._f(hi), n_boot_valid=k, p_bootstrap=_bootstrap_p(d))
    significant = [n for n in tests if (per_label[n].get("delong_p_holm") or 1.0) < ALPHA]
    return {"labels": labels, "per_label": per_label, "mean": mean, "n_images": int(len(y_true)),
            "n_patients": int(len(np.unique(groups.astype(str)))), "n_boot": int(n_boot), "seed": seed,
            "confidence": confidence, "min_patients": int(min_patients), "resampling": "patient, paired",
            "significant_labels": significant, "alpha": ALPHA}


# --- reading two evaluations ---


def predictions_file(target, split):
    """The predictions CSV `cxrkeras evaluate` wrote for `split`: `target` is that CSV, an evaluation folder, or a
    run folder (its evaluation/<split>/)."""
    if os.path.isfile(target):
        return target
    name = f"predictions_{split}.csv"
    for folder in (target, os.path.join(target, "evaluation", split)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    found = sorted(glob.glob(os.path.join(target, "**", name), recursive=True))
    if len(found) == 1:
        return found[0]
    more = f" (found {len(found)}: {', '.join(found[:3])}; give the evaluation folder)" if found else ""
    raise CxrError(f"{target!r} holds no {name}{more}: evaluate it first, `cxrkeras evaluate --run {target} --split "
                   f"{split}`, or give the evaluation folder or the predictions CSV")


def load_predictions(target, split="test"):
    """{path, name, labels, image_ids, patients, y, probs, metrics, fingerprint} of one evaluation."""
    import pandas as pd

    from cxrkeras.hashing import images_fingerprint

    path = predictions_file(target, split)
    try:
        frame = pd.read_csv(path, dtype={"image_index": str, "patient_id": str})
    except (OSError, ValueError) as exc:
        raise CxrError(f"{path}: cannot be read as a predictions CSV ({exc})") from exc
    labels = [c[len("true_"):] for c in frame.columns if c.startswith("true_")]
    missing = [c for c in ["image_index", "patient_id"] + [f"prob_{lbl}" for lbl in labels] if c not in frame]
    if not labels or missing:
        raise CxrError(f"{path}: not a `cxrkeras evaluate` predictions CSV (missing columns: "
                       f"{', '.join(missing) or 'true_<label>'})")
    if frame["image_index"].duplicated().any():
        raise CxrError(f"{path}: image {frame['image_index'][frame['image_index'].duplicated()].iloc[0]!r} appears "
                       f"twice; re-run `cxrkeras evaluate`")
    y = frame[[f"true_{lbl}" for lbl in labels]].to_numpy(dtype=np.float64)
    probs = frame[[f"prob_{lbl}" for lbl in labels]].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(probs)):
        raise CxrError(f"{path}: some probabilities are not finite; re-evaluate the model")
    ids = frame["image_index"].tolist()
    metrics_doc = read_json_or(os.path.join(os.path.dirname(path), "metrics.json")) or {}
    return {"path": os.path.abspath(path), "name": _run_name(target), "labels": labels, "image_ids": ids,
            "patients": frame["patient_id"].tolist(), "y": y, "probs": probs, "metrics": metrics_doc,
            "fingerprint": images_fingerprint(ids, y)}


def _run_name(target):
    parts = [p for p in os.path.abspath(target).split(os.sep) if p]
    for i, part in enumerate(parts):
        if part == "evaluation" and i:
            return parts[i - 1]
    return os.path.splitext(parts[-1])[0] if parts else str(target)


def check_same_images(a, b, split):
    """Refuse two evaluations that did not score the same images with the same labels; B's rows in A's order."""
    if a["labels"] != b["labels"]:
        raise CxrError(f"{a['name']} and {b['name']} predict different labels ({a['labels']} vs {b['labels']}): "
                       f"only models of the same label set can be compared")
    if a["fingerprint"] != b["fingerprint"]:
        only_a = set(a["image_ids"]) - set(b["image_ids"])
        only_b = set(b["image_ids"]) - set(a["image_ids"])
        detail = [f"{len(only_a)} image(s) only in {a['name']}" if only_a else "",
                  f"{len(only_b)} only in {b['name']}" if only_b else ""]
        if not only_a and not only_b:
            detail = ["the same images with different labels"]

        def where(run):
            m = run["metrics"]
            records = f", records {m['records']}" if m.get("records") else ""
            sha = f", manifest sha256 {m['manifest_sha256'][:12]}…" if m.get("manifest_sha256") else ""
            return (f"{run['name']}: {len(run['image_ids'])} {split} images, fingerprint {run['fingerprint'][:12]}…"
                    f"{records}{sha}")

        raise CxrError(f"the two runs were not evaluated on the same {split} images ({'; '.join(d for d in detail if d)}"
                       f"): {where(a)}; {where(b)}. A paired comparison needs the same images: evaluate both on the "
                       f"same records split")
    order = {image: i for i, image in enumerate(b["image_ids"])}
    rows = [order[image] for image in a["image_ids"]]
    return b["probs"][rows]


def compare_runs(run_a, run_b, split="test", out_dir=None, n_boot=1000, seed=0, min_patients=metrics.MIN_PATIENTS,
                 figure=True, log=print):
    """`cxrkeras compare`: the paired comparison of two evaluations of `split`; writes compare.json, compare.md and
    compare.png into `out_dir` (default <run_a>/comparisons/<run_b name>-<split>/) and returns the result."""
    a, b = load_predictions(run_a, split), load_predictions(run_b, split)
    p_b = check_same_images(a, b, split)
    result = paired_comparison(a["y"], a["probs"], p_b, a["patients"], a["labels"], n_boot=n_boot, seed=seed,
                               min_patients=min_patients)
    result.update(split=split, a={"name": a["name"], "predictions": a["path"]},
                  b={"name": b["name"], "predictions": b["path"]}, images_fingerprint=a["fingerprint"])
    if out_dir is None:
        if not os.path.isdir(run_a):
            raise CxrError("give an output folder (--out) when RUN_A is not a run folder")
        out_dir = os.path.join(run_a, "comparisons", f"{b['name']}-{split}")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "compare.json"), result)
    text = comparison_markdown(result)
    atomic_write(os.path.join(out_dir, "compare.md"), text)
    if figure:
        delta_figure(result, os.path.join(out_dir, "compare.png"))
    log(text)
    log(f"written to {out_dir}")
    result["out_dir"] = out_dir
    return result


# --- text and figure ---


def _num(x, digits=4, signed=False):
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(x):
    if x is None:
        return "–"
    return "<0.0001" if x < 1e-4 else f"{x:.4f}"


def delta_text(entry):
    """"+0.0123 (−0.0040 to +0.0290)"."""
    if entry.get("delta") is None:
        return "–"
    ci = f" ({_num(entry['ci_low'], signed=True)} to {_num(entry['ci_high'], signed=True)})" \
        if entry.get("ci_low") is not None else ""
    return _num(entry["delta"], signed=True) + ci


def comparison_markdown(result, title=None):
    """The per-label table (AUC of each, ΔAUC with CI, bootstrap p, DeLong p raw and Holm) and notes."""
    a = (result.get("a") or {}).get("name", "A")
    b = (result.get("b") or {}).get("name", "B")
    title = title or f"{a} (A) vs {b} (B): {result.get('split', '')} split"
    lines = [f"## {title}", "",
             "| label | positives (patients) | AUC A | AUC B | ΔAUC A − B (95% CI) | bootstrap p | DeLong p | "
             "DeLong p, Holm |", "|---|---|---|---|---|---|---|---|"]
    for name in result["labels"]:
        e = result["per_label"][name]
        if e["reason"]:
            lines.append(f"| {name} | {e['positives']} ({e['positive_patients']}) | {_num(e['auc_a'])} | "
                         f"{_num(e['auc_b'])} | not estimable | | | |")
            continue
        mark = " *" if name in result["significant_labels"] else ""
        lines.append(f"| {name} | {e['positives']} ({e['positive_patients']}) | {_num(e['auc_a'])} | "
                     f"{_num(e['auc_b'])} | {delta_text(e)}{mark} | {_p(e['p_bootstrap'])} | {_p(e['delong_p'])} | "
                     f"{_p(e.get('delong_p_holm'))} |")
    m = result["mean"]
    lines.append(f"| **mean** ({len(m['labels_used'])} labels) | | {_num(m['auc_a'])} | {_num(m['auc_b'])} | "
                 f"{delta_text(m)} | {_p(m['p_bootstrap'])} | | |")
    lines += ["", f"{result['n_images']} images, {result['n_patients']} patients; {result['n_boot']} patient "
              f"resamples shared by both models (seed {result['seed']}), {m['n_boot_valid']} valid for the mean; "
              f"percentile {int(round(result['confidence'] * 100))}% CIs. DeLong's test per label (images taken as "
              f"independent), Holm-corrected over {len(m['labels_used'])} labels; * Holm p < {result['alpha']}."]
    for name, reason in m["excluded"].items():
        lines.append(f"- {name}: left out ({reason}).")
    return "\n".join(lines) + "\n"


def delta_figure(result, path, title=None):
    """Forest plot: ΔAUC (A − B) per estimable label and the mean, with 95% CIs; Holm-significant labels filled."""
    from cxrkeras.evaluation.figures import _pyplot

    plt = _pyplot()
    names = result["mean"]["labels_used"]
    rows = [(n, result["per_label"][n]) for n in names] + [("mean", result["mean"])]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.6), dpi=110)
    for i, (name, e) in enumerate(rows):
        y = len(rows) - 1 - i
        if e.get("delta") is None:
            continue
        lo, hi = e.get("ci_low"), e.get("ci_high")
        if lo is not None:
            ax.plot([lo, hi], [y, y], color="C0" if name != "mean" else "black", lw=1.6)
        filled = name == "mean" or name in result["significant_labels"]
        ax.plot(e["delta"], y, "D" if name == "mean" else "o", color="C0" if name != "mean" else "black",
                mfc=None if filled else "white", ms=6)
    ax.axvline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n for n, _ in reversed(rows)])
    a = (result.get("a") or {}).get("name", "A")
    b = (result.get("b") or {}).get("name", "B")
    ax.set_xlabel(f"ΔAUC = AUC({a}) − AUC({b}), {int(round(result['confidence'] * 100))}% paired patient-bootstrap CI")
    ax.set_title(title or f"{a} vs {b} ({result.get('split', '')}; filled: Holm-corrected DeLong p < "
                          f"{result['alpha']})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
