"""<out>/tables.md: the paper's Tables 2, 4 and 5 with our test AUCs (95 % patient-bootstrap CIs) beside the
published numbers, and a paired comparison (`cxrkeras compare`'s) for every claim the tables support.

Every finished run of the grid in <out>/runs counts, whichever invocation ran it; a run not finished is shown as
such, never estimated.
"""

import os

from cxrkeras.evaluation import compare, published
from cxrkeras.fileio import atomic_write, read_json_or, write_json
from cxrkeras.reproduce import grid as grid_lib
from cxrkeras.reproduce.queue import MARKER, TABLES_FILE, evaluation_dir, evaluation_is_current


def finished_evaluation(out, run):
    """metrics.json of a finished run of <out>/runs whose evaluation scored its current best model, or None."""
    run_dir = os.path.join(out, "runs", run)
    marker = read_json_or(os.path.join(run_dir, MARKER)) or {}
    if marker.get("status") != "finished" or not evaluation_is_current(run_dir):
        return None
    return read_json_or(os.path.join(evaluation_dir(run_dir), "metrics.json"))


def _mean_text(doc):
    if doc is None:
        return "not run"
    m = doc["auc"]["mean"]
    if m.get("auc") is None:
        return "n/a"
    ci = f" ({m['ci_low']:.4f}–{m['ci_high']:.4f})" if m.get("ci_low") is not None else ""
    excluded = f" [{len(m['labels_used'])} labels]" if m.get("excluded") else ""
    return f"{m['auc']:.4f}{ci}{excluded}"


def _paper(x):
    return "" if x is None else f"{x:.4f}"


def table4(specs, docs):
    rows = {}
    for s in specs:
        if s.table4_model:
            rows.setdefault(s.table4_model, {})[s.regime] = s
    head = "| model | " + " | ".join(f"{grid_lib.REGIME_TITLES[r]}: ours | paper" for r in grid_lib.REGIMES) + " |"
    lines = [head, "|---|" + "---|---|" * len(grid_lib.REGIMES)]
    for model, by_regime in rows.items():
        cells = []
        for regime in grid_lib.REGIMES:
            s = by_regime.get(regime)
            cells += [_mean_text(docs.get(s.run)) if s else "", _paper(s.paper_mean_auc) if s else ""]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def table5(specs, docs):
    lines = ["| backbone | LKA placement | ours | paper |", "|---|---|---|---|"]
    for s in specs:
        if s.table5_backbone:
            lines.append(f"| {s.table5_backbone} | {s.table5_placement} | {_mean_text(docs.get(s.run))} | "
                         f"{_paper(s.paper_mean_auc)} |")
    return lines


def _verdict(mean, paper_delta):
    """Whether our paired CI of ΔAUC agrees with the sign of the paper's difference."""
    if mean.get("ci_low") is None or paper_delta is None:
        return "–"
    sign = 1 if paper_delta > 0 else -1
    if sign * mean["ci_low"] > 0 and sign * mean["ci_high"] > 0:
        return "supported"
    if sign * mean["ci_low"] < 0 and sign * mean["ci_high"] < 0:
        return "contradicted"
    return "not resolved (CI spans 0)"


def comparisons(specs, out, docs, n_boot, seed, min_patients=5):
    """Rows of the paired comparisons of every claim whose two runs finished (their details in
    <out>/comparisons/<a>__vs__<b>.json)."""
    by_run = {s.run: s for s in specs}
    lines = ["| claim | A | B | mean ΔAUC A − B (95% CI) | bootstrap p | labels A > B / B > A (Holm DeLong p < 0.05) | "
             "paper Δ | our CI vs the paper's sign |", "|---|---|---|---|---|---|---|---|"]
    for claim in grid_lib.claims(specs):
        a, b = by_run[claim.a], by_run[claim.b]
        paper_delta = a.paper_mean_auc - b.paper_mean_auc if None not in (a.paper_mean_auc, b.paper_mean_auc) \
            else None
        if docs.get(a.run) is None or docs.get(b.run) is None:
            missing = ", ".join(r for r in (a.run, b.run) if docs.get(r) is None)
            lines.append(f"| {claim.group} | {a.run} | {b.run} | not run ({missing}) | | | "
                         f"{_paper_delta(paper_delta)} | |")
            continue
        pa = compare.load_predictions(evaluation_dir(os.path.join(out, "runs", a.run)))
        pb = compare.load_predictions(evaluation_dir(os.path.join(out, "runs", b.run)))
        result = compare.paired_comparison(pa["y"], pa["probs"], compare.check_same_images(pa, pb, "test"),
                                           pa["patients"], pa["labels"], n_boot=n_boot, seed=seed,
                                           min_patients=min_patients)
        result.update(split="test", a={"name": a.run}, b={"name": b.run})
        os.makedirs(os.path.join(out, "comparisons"), exist_ok=True)
        write_json(os.path.join(out, "comparisons", f"{a.run}__vs__{b.run}.json"), result)
        wins_a = [n for n in result["significant_labels"] if result["per_label"][n]["delta"] > 0]
        wins_b = [n for n in result["significant_labels"] if result["per_label"][n]["delta"] < 0]
        m = result["mean"]
        lines.append(f"| {claim.group} | {a.run} | {b.run} | {compare.delta_text(m)} | {compare._p(m['p_bootstrap'])} "
                     f"| {len(wins_a)} / {len(wins_b)} of {len(m['labels_used'])} | {_paper_delta(paper_delta)} | "
                     f"{_verdict(m, paper_delta)} |")
    return lines


def _paper_delta(x):
    return "" if x is None else f"{x:+.4f}"


def write_tables(out, grid="paper", n_boot=1000, seed=0, min_patients=5):
    """Write <out>/tables.md from every finished run of the grid; its path."""
    specs = grid_lib.load_grid(grid)
    docs = {s.run: finished_evaluation(out, s.run) for s in specs}
    done = [s.run for s in specs if docs[s.run] is not None]
    any_doc = next((d for d in docs.values() if d), None)
    lines = [f"# The paper's tables, reproduced ({grid} grid)", "",
             f"{len(done)} of {len(specs)} runs finished in {os.path.abspath(out)}/runs. Test AUCs over the whole test "
             f"split with 95 % percentile CIs from {n_boot} patient resamples; the paper's numbers are as published "
             f"(its splits and test protocol differ from ours, see README)."]
    if any_doc:
        lines.append(f"Records: {any_doc.get('records')} (manifest sha256 {str(any_doc.get('manifest_sha256'))[:12]}…), "
                     f"{any_doc.get('n_images')} test images, {any_doc['auc'].get('n_patients')} patients.")
    best = next((s for s in specs if s.table2), None)
    lines += ["", f"## Table 2: per-class test AUC of {best.run if best else 'the best model'}", ""]
    doc = docs.get(best.run) if best else None
    if doc is None:
        lines.append("not run")
    else:
        lines.append(published.comparison_markdown(doc["auc"], doc["labels"]).rstrip())
        lines.append(f"Our run reproduces the published column '{best.table2}'.")
    lines += ["", "## Table 4: one stage or two, mean test AUC (95% CI)", ""] + table4(specs, docs)
    lines += ["", "## Table 5: LKA placement, two-stage, mean test AUC (95% CI)", ""] + table5(specs, docs)
    lines += ["", "## Paired comparisons of the paper's claims", "",
              "Each row compares two runs on the same test images: ΔAUC averaged over the estimable labels with a "
              "paired patient bootstrap (the same resamples for both runs), and per label DeLong's test with Holm's "
              "correction over the labels.", ""] + comparisons(specs, out, docs, n_boot, seed, min_patients)
    path = os.path.join(out, TABLES_FILE)
    atomic_write(path, "\n".join(lines) + "\n")
    return path
