"""Decisions at the validation-chosen thresholds as text: the per-label table and, for a binary task, its
confusion matrix (console and comparison_<split>.md)."""

METHOD_NAMES = {"youden": "Youden J", "f1": "F1-max"}


def _fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _chosen_on(result, method):
    """Where the thresholds of `method` come from, in words."""
    if not result.get("validation"):
        return "0.5 by default (no validation split to choose them on)"
    text = (f"chosen on the {result['validation']['split']!r} split ({METHOD_NAMES.get(method, method)}) and "
            f"applied unchanged")
    defaulted = [label for label, t in result["thresholds"][method].items() if t.get("reason")]
    return text + (f"; 0.5 for {', '.join(defaulted)} (single-class on validation)" if defaulted else "")


def threshold_markdown(result, method):
    """Markdown: accuracy, sensitivity (recall), specificity, precision, F1 and TP/FP/FN/TN of every label at
    `method`'s thresholds; a binary task (one label) also gets its 2x2 confusion matrix."""
    at = result["at_thresholds"][method]["per_label"]
    labels = result["labels"]
    split, n = result.get("split", "test"), result["n_images"]
    lines = [f"## Decisions at the {METHOD_NAMES.get(method, method)} thresholds: {split} split, {n} images", "",
             f"Thresholds {_chosen_on(result, method)}; positive when probability >= threshold.", "",
             "| label | threshold | accuracy | sensitivity (recall) | specificity | precision | F1 | TP | FP | FN | TN |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        e = at[label]
        lines.append(f"| {label} | {e['threshold']:.4f} | {_fmt(e['accuracy'])} | {_fmt(e['sensitivity'])} | "
                     f"{_fmt(e['specificity'])} | {_fmt(e['precision'])} | {_fmt(e['f1'])} | {e['tp']} | "
                     f"{e['fp']} | {e['fn']} | {e['tn']} |")
    if len(labels) == 1:
        e = at[labels[0]]
        lines += ["", f"Confusion matrix ({labels[0]}, {split} split):", "",
                  f"| | predicted no {labels[0]} | predicted {labels[0]} |", "|---|---|---|",
                  f"| **true no {labels[0]}** | {e['tn']} (TN) | {e['fp']} (FP) |",
                  f"| **true {labels[0]}** | {e['fn']} (FN) | {e['tp']} (TP) |"]
    return "\n".join(lines) + "\n"


def binary_summary(result, method):
    """Console lines of a binary task (one label): AUC with CI, the decisions at the threshold and the confusion
    matrix; None for a multi-label task."""
    labels = result["labels"]
    if len(labels) != 1:
        return None
    label = labels[0]
    auc = result["auc"]["per_label"][label]
    e = result["at_thresholds"][method]["per_label"][label]
    if auc.get("ci_low") is not None:
        ci = f" (95% CI {auc['ci_low']:.3f}–{auc['ci_high']:.3f})"
    else:  # e.g. positives from fewer than --min-patients patients: the point AUC, and why it has no CI
        ci = f" (no CI: {auc['reason']})" if auc.get("reason") else ""
    cells = [("", f"predicted no {label}", f"predicted {label}"),
             (f"true no {label}", f"{e['tn']} (TN)", f"{e['fp']} (FP)"),
             (f"true {label}", f"{e['fn']} (FN)", f"{e['tp']} (TP)")]
    w0, w1, w2 = len(label) + 10, len(cells[0][1]) + 3, len(cells[0][2]) + 3
    return "\n".join([
        f"{label} vs not: AUC {_fmt(auc['auc'])}{ci}, AP {_fmt(result['average_precision']['per_label'][label]['ap'])}",
        f"at threshold {e['threshold']:.4f} ({_chosen_on(result, method)}): accuracy {_fmt(e['accuracy'])}, "
        f"sensitivity (recall) {_fmt(e['sensitivity'])}, specificity {_fmt(e['specificity'])}, "
        f"precision {_fmt(e['precision'])}, F1 {_fmt(e['f1'])}"] + [f"{a:<{w0}}{b:>{w1}}{c:>{w2}}" for a, b, c in cells])
