"""The table printed at the end of a stage: per-label validation AUC at the best epoch, best epoch, time."""

import math

from cxrkeras.training.callbacks import MONITOR, improves, worst


def _fmt(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "-"
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def best_row(history, monitor=MONITOR):
    """The history row (dict of strings) with the best finite monitored value (the lowest loss, the highest AUC;
    the first such epoch on a tie, as the best checkpoint keeps it), or None."""
    best, best_value = None, worst(monitor)
    for row in history:
        try:
            value = float(row.get(monitor) or "nan")
        except ValueError:
            continue
        if math.isfinite(value) and improves(value, best_value, monitor):
            best, best_value = row, value
    return best


def format_summary(stage, labels, history, val_positives, seconds, stage_dir, stopped_early=None, monitor=MONITOR):
    """Text table at the epoch `monitor` picks; `val_positives` = {label: positives in the validation split the
    stage reads}."""
    row = best_row(history, monitor)
    lines = [f"stage {stage} summary ({stage_dir})"]
    if row is None:
        lines.append("  no epoch with a defined validation AUC")
        return "\n".join(lines)
    width = max(len(label) for label in labels)
    lines.append(f"  {'label':<{width}}  val pos  val AUC")
    for label in labels:
        lines.append(f"  {label:<{width}}  {val_positives.get(label, 0):>7}  {_fmt(row.get(f'val_auc_{label}'))}")
    lines.append(f"  {'mean':<{width}}  {'':>7}  {_fmt(row.get(MONITOR))}")
    if "val_loss" in row:
        lines.append(f"  {'val loss':<{width}}  {'':>7}  {_fmt(row.get('val_loss'))}")
    note = f", stopped early at epoch {stopped_early}" if stopped_early else ""
    lines.append(f"  best epoch {row['epoch']} of {len(history)} run (by {monitor}){note}; "
                 f"training time {seconds:.1f} s ({seconds / 60:.1f} min)")
    lines.append(f"  best checkpoint: {stage_dir}/best.keras")
    return "\n".join(lines)
