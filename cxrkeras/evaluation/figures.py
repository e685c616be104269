"""Evaluation figures as PNG (matplotlib, Agg): ROC curves, precision–recall curves, reliability diagram."""

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from cxrkeras.evaluation.metrics import single_class_reason


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(n):
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def _legend(ax, n):
    ax.legend(loc="lower right" if n <= 8 else "center left", bbox_to_anchor=None if n <= 8 else (1.02, 0.5),
              fontsize=8, frameon=False)


def _curves(labels):
    """(figure, axes, colour per label) of a per-label curves figure."""
    fig, ax = _pyplot().subplots(figsize=(9, 6.5), dpi=110)
    return fig, ax, _colors(len(labels))


def _save_curves(fig, ax, path, entries):
    """Grid, legend (for `entries` lines), layout; write `path` and close the figure."""
    ax.grid(alpha=0.3)
    _legend(ax, entries)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def roc_figure(y_true, y_prob, labels, path, auc_result=None, title="ROC curves"):
    """Per-label ROC curves plus the macro-average curve (TPR averaged on a common FPR grid); writes `path`."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    fig, ax, colors = _curves(labels)
    grid = np.linspace(0, 1, 201)
    tprs = []
    for j, (name, color) in enumerate(zip(labels, colors)):
        if single_class_reason(y_true[:, j]):
            continue
        fpr, tpr, _ = roc_curve(y_true[:, j] > 0.5, y_prob[:, j])
        tprs.append(np.interp(grid, fpr, tpr))
        auc = (auc_result or {}).get("per_label", {}).get(name, {}).get("auc")
        ax.plot(fpr, tpr, lw=1.1, color=color, label=f"{name} ({auc:.3f})" if auc is not None else name)
    if tprs:
        mean_tpr = np.mean(tprs, axis=0)
        mean_tpr[0] = 0.0
        mean = (auc_result or {}).get("mean", {})
        lab = "mean"
        if mean.get("auc") is not None:
            lab += f" (AUC {mean['auc']:.3f}"
            lab += f", CI {mean['ci_low']:.3f}–{mean['ci_high']:.3f})" if mean.get("ci_low") is not None else ")"
        ax.plot(grid, mean_tpr, lw=2.8, color="black", label=lab)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 − specificity)",
           ylabel="True positive rate (sensitivity)", title=title)
    return _save_curves(fig, ax, path, len(labels) + 1)


def pr_figure(y_true, y_prob, labels, path, ap_result=None, title="Precision–recall curves", operating=None):
    """Per-label precision–recall curves with AP in the legend and each label's prevalence as a dotted baseline;
    `operating` ({label: a binary_metrics entry}) marks each such label's point at its threshold."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob)
    fig, ax, colors = _curves(labels)
    for j, (name, color) in enumerate(zip(labels, colors)):
        if not np.any(y_true[:, j] > 0.5):
            continue
        precision, recall, _ = precision_recall_curve(y_true[:, j] > 0.5, y_prob[:, j])
        ap = (ap_result or {}).get("per_label", {}).get(name, {}).get("ap")
        ax.step(recall, precision, where="post", lw=1.1, color=color,
                label=f"{name} (AP {ap:.3f})" if ap is not None else name)
        ax.axhline(np.mean(y_true[:, j] > 0.5), ls=":", lw=0.6, color=color)
        point = (operating or {}).get(name)
        if point and point.get("precision") is not None and point.get("sensitivity") is not None:
            ax.plot([point["sensitivity"]], [point["precision"]], "o", ms=7, color=color, mec="black",
                    label=f"threshold {point['threshold']:.3f}: recall {point['sensitivity']:.2f}, "
                          f"precision {point['precision']:.2f}")
    m = (ap_result or {}).get("map")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall (sensitivity)", ylabel="Precision",
           title=title + (f" — mAP {m:.3f}" if m is not None else ""))
    return _save_curves(fig, ax, path, len(labels) + len(operating or {}))


def reliability_figure(calibration_result, path, title="Reliability diagram (all labels pooled)"):
    """Observed frequency vs mean predicted probability per bin, with bin counts below; ECE in the title."""
    plt = _pyplot()
    bins = calibration_result["bins"]
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(6.5, 7), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    lows = np.array([b["low"] for b in bins])
    width = np.array([b["high"] - b["low"] for b in bins])
    freq = np.array([b["observed_frequency"] if b["count"] else np.nan for b in bins], dtype=float)
    conf = np.array([b["mean_probability"] if b["count"] else np.nan for b in bins], dtype=float)
    counts = np.array([b["count"] for b in bins])
    ax.bar(lows, np.nan_to_num(freq), width=width, align="edge", edgecolor="black", color="#4c72b0", alpha=0.8,
           label="observed frequency")
    ax.bar(lows, np.nan_to_num(conf - freq), bottom=np.nan_to_num(freq), width=width, align="edge",
           color="#dd8452", alpha=0.35, hatch="//", edgecolor="#dd8452", label="gap to mean probability")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax.set(ylim=(0, 1), xlim=(0, 1), ylabel="Fraction positive",
           title=f"{title}\nECE = {calibration_result['ece']:.4f}")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    axc.bar(lows, counts, width=width, align="edge", color="grey", edgecolor="black")
    axc.set_yscale("log" if counts.max(initial=0) > 0 else "linear")
    axc.set(xlabel="Predicted probability", ylabel="count")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
