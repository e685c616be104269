"""Class-targeted subsets of a labels table (`build-records --subset per-label=2000,no-finding=10000`): fewer images
for limited compute, with every label still represented, as the attention study trained.

Whole patients are taken, so no patient is cut in two and the patient-wise split stays possible. Labels are filled
rarest first (by their images in the table): for each label still short of its target, patients with that label
are taken in a seeded random order until the label has at least its target of positive images, or all of them
when the table has fewer. The images of the taken patients count for every label they carry, so later (more
common) labels may already be met, and a label may end above its target (by at most the last patient's images, or
more through patients taken for rarer labels). Then 'No Finding' images: patients whose images all have no finding
first (they add nothing to the labels), then patients with both. The manifest records the targets, what was
available and what was reached.
"""

import numpy as np

from cxrkeras.errors import ConfigError
from cxrkeras.labels import NO_FINDING

MAX_TARGET = 10_000_000
_KEYS = {"per-label": "per_label", "no-finding": "no_finding"}


def parse_subset(spec, labels):
    """{"per_label": n, "no_finding": n, "labels": {label: n}} of "per-label=2000,no-finding=10000" (a label name
    sets that label's own target, e.g. "per-label=2000,Hernia=100"); a ConfigError naming the bad item."""
    if isinstance(spec, dict):
        return spec
    targets = {"per_label": None, "no_finding": None, "labels": {}}
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise ConfigError("--subset is empty: write e.g. per-label=2000,no-finding=10000")
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = int(value.strip())
        except ValueError:
            number = None
        if not sep or number is None or not 0 <= number <= MAX_TARGET:
            raise ConfigError(f"--subset {item!r}: write KEY=N with N a whole number from 0 to {MAX_TARGET:,} "
                              f"(e.g. per-label=2000,no-finding=10000)")
        if key.lower() in _KEYS:
            targets[_KEYS[key.lower()]] = number
        elif key in labels:
            targets["labels"][key] = number
        else:
            raise ConfigError(f"--subset {item!r}: unknown key {key!r}; use per-label, no-finding or a label name "
                              f"({', '.join(labels)})")
    if targets["per_label"] is None and targets["no_finding"] is None and not targets["labels"]:
        raise ConfigError("--subset sets no target")
    return targets


def _take(candidates, gains, need):
    """The first candidates (already in order) whose gains sum to at least `need` (all when they never do)."""
    reached = np.flatnonzero(np.cumsum(gains) >= need)
    return candidates[: reached[0] + 1] if len(reached) else candidates


def select_subset(table, targets, seed):
    """(row mask of the subset, report for the manifest) of `table` (sources.Table) for `targets` (parse_subset)."""
    labels = list(table.labels)
    codes = {}
    inverse = np.fromiter((codes.setdefault(p, len(codes)) for p in table.patient_id), dtype=np.int64,
                          count=len(table))
    n_pat = len(codes)
    y = np.asarray(table.y, dtype=np.int64)
    per_patient = np.zeros((n_pat, len(labels)), dtype=np.int64)
    np.add.at(per_patient, inverse, y)
    no_finding = np.bincount(inverse, weights=(y.sum(axis=1) == 0), minlength=n_pat).astype(np.int64)
    priority = np.random.default_rng(seed).permutation(n_pat)  # seeded random order of the patients

    totals = per_patient.sum(axis=0)
    order = [labels[j] for j in np.argsort(totals, kind="stable")]  # rarest first
    selected = np.zeros(n_pat, dtype=bool)
    for label in order:
        target = targets["labels"].get(label, targets["per_label"])
        j = labels.index(label)
        need = (target or 0) - int(per_patient[selected, j].sum())
        if need <= 0:
            continue
        candidates = np.flatnonzero((per_patient[:, j] > 0) & ~selected)
        candidates = candidates[np.argsort(priority[candidates])]
        selected[_take(candidates, per_patient[candidates, j], need)] = True
    need = (targets["no_finding"] or 0) - int(no_finding[selected].sum())
    if need > 0:
        candidates = np.flatnonzero((no_finding > 0) & ~selected)
        mixed = per_patient[candidates].sum(axis=1) > 0  # patients with labelled images too: after the pure ones
        candidates = candidates[np.lexsort((priority[candidates], mixed))]
        selected[_take(candidates, no_finding[candidates], need)] = True

    mask = selected[inverse]
    reached = {label: int(per_patient[selected, j].sum()) for j, label in enumerate(labels)}
    reached[NO_FINDING] = int(no_finding[selected].sum())
    available = {label: int(totals[j]) for j, label in enumerate(labels)}
    available[NO_FINDING] = int(no_finding.sum())
    wanted = {label: targets["labels"].get(label, targets["per_label"]) for label in labels}
    wanted[NO_FINDING] = targets["no_finding"]
    report = {
        "spec": _spec_text(targets), "seed": int(seed), "order": order,
        "targets": wanted, "available": available, "reached": reached,
        "all_taken": sorted(k for k, t in wanted.items() if t is not None and available[k] <= t),
        "short": sorted(k for k, t in wanted.items() if t is not None and reached[k] < min(t, available[k])),
        "images": int(mask.sum()), "patients": int(selected.sum()),
        "of": {"images": int(len(table)), "patients": int(n_pat)},
        "method": "whole patients; labels rarest first, patients in seeded random order until each label has its "
                  "target (all its images when fewer); then 'No Finding' images, patients without labelled images "
                  "first",
    }
    return mask, report


def _spec_text(targets):
    parts = [f"per-label={targets['per_label']}"] if targets["per_label"] is not None else []
    parts += [f"{label}={n}" for label, n in targets["labels"].items()]
    parts += [f"no-finding={targets['no_finding']}"] if targets["no_finding"] is not None else []
    return ",".join(parts)
