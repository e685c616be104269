"""Published per-class test AUCs on NIH ChestX-ray14 and the table that puts ours (with CI) beside them."""

import csv
import os

RESOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources",
                        "published_auc.csv")
MEAN_ROW = "Mean"
SOURCE_NOTE = ("Published columns: per-class test AUC as reported by each paper (Wang 2017, CheXNet, SynthEnsemble, "
               "AG-CNN, and the LKA paper reimplemented here); their splits and test protocols differ from ours, "
               "so they are context, not a like-for-like comparison.")


def load_published(path=RESOURCE):
    """(columns, {label: {column: auc}}) from the bundled CSV; the "Mean" row is kept under its own key."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames if c != "label"]
        table = {row["label"]: {c: float(row[c]) for c in columns if row[c] not in ("", None)} for row in reader}
    return columns, table


def comparison_rows(auc_result, labels, published=None):
    """Rows [label, ours "0.812 (0.790–0.834)", published...] and the header; published columns only where known.

    Published columns appear when at least one label is in the published table; their mean row only when the
    label set is exactly the published one (a mean over other labels would not be comparable).
    """
    columns, table = published if published is not None else load_published()
    known = [lbl for lbl in labels if lbl in table and lbl != MEAN_ROW]
    if not known:
        columns = []
    same_set = set(labels) == set(table) - {MEAN_ROW} and not auc_result["mean"].get("excluded")
    header = ["label", "ours AUC (95% CI)", "positives"] + columns
    rows = []
    for lbl in labels:
        entry = auc_result["per_label"][lbl]
        rows.append([lbl, _fmt_ci(entry.get("auc"), entry.get("ci_low"), entry.get("ci_high"), entry.get("reason")),
                     str(entry.get("positives", ""))] + [_fmt(table.get(lbl, {}).get(c)) for c in columns])
    mean = auc_result["mean"]
    note = "" if not mean.get("excluded") else f" [{len(mean['labels_used'])} labels]"
    rows.append([f"**{MEAN_ROW}**", _fmt_ci(mean.get("auc"), mean.get("ci_low"), mean.get("ci_high")) + note, ""]
                + [_fmt(table[MEAN_ROW].get(c)) if same_set else "" for c in columns])
    return header, rows


def comparison_markdown(auc_result, labels, title=None, published=None):
    """The comparison as a Markdown table (with notes on excluded labels and on the published columns)."""
    header, rows = comparison_rows(auc_result, labels, published)
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(r) + " |" for r in rows)
    lines.append("")
    boot = auc_result.get("n_boot")
    if boot:
        mean = auc_result["mean"]
        lines.append(f"CI: {int(round(auc_result.get('confidence', 0.95) * 100))}% percentile bootstrap, {boot} "
                     f"resamples by patient ({auc_result.get('n_patients', '?')} patients), seed "
                     f"{auc_result.get('seed')}; the mean's CI averages each resample over the labels defined in it "
                     f"({mean.get('n_boot_valid')} valid resamples, {mean.get('n_boot_all_labels', '?')} with every "
                     f"label defined). A label whose positives come from fewer than "
                     f"{auc_result.get('min_patients', '?')} patients is not estimable.")
    for lbl, reason in auc_result["mean"].get("excluded", {}).items():
        lines.append(f"- {lbl}: left out of the mean ({reason}).")
    if len(header) > 3:
        lines.append(SOURCE_NOTE)
    return "\n".join(lines) + "\n"


def _fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def format_ci(entry):
    """"0.8120 (0.7900–0.8340)" of one per-label entry of `auc_with_ci`."""
    return _fmt_ci(entry.get("auc"), entry.get("ci_low"), entry.get("ci_high"), entry.get("reason"))


def _fmt_ci(auc, lo, hi, reason=None):
    if auc is None:
        return f"n/a ({reason})" if reason else "n/a"
    if lo is None or hi is None:
        return f"{auc:.4f} ({reason})" if reason else f"{auc:.4f}"
    return f"{auc:.4f} ({lo:.4f}–{hi:.4f})"
