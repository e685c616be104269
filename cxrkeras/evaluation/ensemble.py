"""`ensemble(members, out_dir, ...)`: average several runs' / models' probabilities into one model
(`<out>/ensemble.keras`), evaluated by `evaluate` itself, with each member's validation and test AUC beside it."""

import os

import numpy as np

from cxrkeras.errors import ConfigError, CxrError
from cxrkeras.evaluation import metrics, published
from cxrkeras.fileio import utc_now, write_json
from cxrkeras.runs import ENSEMBLE_FILE, EVALUATION_DIR, load_source

ENSEMBLE_INFO = "ensemble.json"
WEIGHTINGS = ("val-auc", "equal")


def parse_weights(text, n):
    """"val-auc" | "equal" | "w1,w2,..." -> (method, explicit weights or None)."""
    text = str(text).strip()
    if text in WEIGHTINGS:
        return text, None
    from cxrkeras.models.ensemble import normalise_weights

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: give val-auc, equal or one number per member (e.g. 0.6,0.4)") from None
    return "given", normalise_weights(values, n)


def _mean_auc(source, records_dir, split, batch_size, verify, n_boot=0, seed=0, keep=None,
              min_patients=metrics.MIN_PATIENTS):
    """{auc, ci_low, ci_high} of the mean AUC of one model on a whole split (evaluate's prediction and metrics);
    `keep`: a dict that receives the probabilities by image id."""
    from cxrkeras.evaluation.evaluate import predict_split

    probs, y, ids, patients = predict_split(source, records_dir, split, batch_size, verify=verify)
    if keep is not None:
        keep.update(zip(ids, probs))
    return metrics.auc_with_ci(y, probs, patients, source.labels, n_boot=n_boot, seed=seed,
                               min_patients=min_patients)["mean"]


def compare_with_best_member(rows, member_probs, out_dir, split, val_split, n_boot, seed, figures_on, log,
                             min_patients=metrics.MIN_PATIENTS):
    """`cxrkeras compare` of the ensemble (A) against its member with the best validation mean AUC (B; chosen on
    validation, as a user would choose one model) on `split`: paired patient bootstrap and DeLong per label."""
    from cxrkeras.evaluation.compare import load_predictions, paired_comparison, write_comparison

    scored = [i for i, r in enumerate(rows) if r[f"{val_split}_mean_auc"] is not None]
    if not scored:
        log(f"note: no member has a {val_split} AUC: the ensemble is not compared with a best member")
        return None
    best = max(scored, key=lambda i: rows[i][f"{val_split}_mean_auc"])
    ens = load_predictions(os.path.join(out_dir, EVALUATION_DIR, split), split)
    try:
        p_best = np.stack([member_probs[best][image_id] for image_id in ens["image_ids"]])
    except KeyError as exc:
        raise CxrError(f"the ensemble's {split} predictions and member {rows[best]['member']!r}'s differ in their "
                       f"images (e.g. {exc.args[0]!r}); re-run `cxrkeras ensemble`") from None
    result = paired_comparison(ens["y"], ens["probs"], p_best, ens["patients"], ens["labels"], n_boot=n_boot,
                               seed=seed, min_patients=min_patients)
    name = os.path.basename(os.path.normpath(rows[best]["member"]))
    result.update(split=split, a={"name": "ensemble", "predictions": ens["path"]},
                  b={"name": name, "member": rows[best]["member"], "chosen_by": f"{val_split} mean AUC"},
                  images_fingerprint=ens["fingerprint"])
    return write_comparison(result, os.path.join(out_dir, "comparisons", f"best-member-{split}"),
                            figure=figures_on, title=f"ensemble (A) vs its best member by {val_split} mean AUC, "
                            f"{name} (B): {split} split", log=log)


def ensemble(members, out_dir, records_dir=None, split="test", val_split="val", weights="val-auc", batch_size=32,
             n_boot=1000, seed=0, threshold_method="youden", figures_on=True, verify_records="sha256", log=print,
             min_patients=metrics.MIN_PATIENTS):
    """Build, save and evaluate the ensemble of `members` (run folders, stage folders or .keras files).

    weights: "val-auc" (each member's weight proportional to its mean AUC on `val_split`), "equal", or one number
    per member (normalised). Writes <out_dir>/ensemble.keras (one model: the members on one input, their
    probabilities averaged; `cxrkeras export --run <out_dir>` exports it), ensemble.json (members, sha256, weights,
    each member's validation and test mean AUC) and evaluate's files in <out_dir>/evaluation/<split>/.
    Returns evaluate's metrics dict with "members" added.
    """
    from cxrkeras.evaluation.evaluate import check_batch_size, evaluate
    from cxrkeras.models.ensemble import build_ensemble, check_members

    members = [os.fspath(m) for m in members]
    check_batch_size(batch_size)
    if os.path.isfile(out_dir):
        raise CxrError(f"--out {out_dir!r} is a file: give a folder")
    if split == val_split:
        raise ConfigError(f"--split and --val-split are both {split!r}: the weights, thresholds and best member would "
                          f"be chosen on the images being scored; choose them on another split")
    method, given = parse_weights(weights, len(members))
    sources = [load_source(m) for m in members]
    check_members(sources, members)
    records_dir = records_dir or sources[0].records_dir
    if not records_dir:
        raise CxrError("no records folder: pass --records DIR (the first member does not say which records it used)")
    others = sorted({s.records_dir for s in sources if s.records_dir} - {records_dir})
    if others:
        log(f"note: members were trained on other records too ({', '.join(others)}); all are scored on {records_dir}")
    rows, member_probs = [], []
    for member, source in zip(members, sources):
        log(f"member {member}: {source.variant}, {source.model_path}")
        val = _mean_auc(source, records_dir, val_split, batch_size, verify_records, min_patients=min_patients)
        member_probs.append({})
        test = _mean_auc(source, records_dir, split, batch_size, verify_records, n_boot=n_boot, seed=seed,
                         keep=member_probs[-1], min_patients=min_patients)
        rows.append({"member": member, "model": source.model_path, "model_sha256": source.model_sha256,
                     "variant": source.variant, f"{val_split}_mean_auc": val["auc"], f"{split}_mean_auc": test})
    if method == "val-auc":
        aucs = [r[f"{val_split}_mean_auc"] for r in rows]
        if any(a is None for a in aucs):
            raise CxrError(f"--weights val-auc: a member has no validation mean AUC on split {val_split!r} (no label "
                           f"whose positives and negatives each come from at least {min_patients} patients, "
                           f"--min-patients); use --weights equal or numbers, or a lower --min-patients")
        given = aucs
    elif method == "equal":
        given = [1.0] * len(members)
    from cxrkeras.models.ensemble import normalise_weights

    given = normalise_weights(given, len(members))
    for row, w in zip(rows, given):
        row["weight"] = w
    os.makedirs(out_dir, exist_ok=True)
    model = build_ensemble(sources, given, names=members, build_args={
        "weighting": method, "members": [{k: r[k] for k in ("member", "model", "model_sha256", "variant")}
                                         for r in rows]})
    path = os.path.join(out_dir, ENSEMBLE_FILE)
    from cxrkeras.training.callbacks import save_model

    save_model(model, path)
    log(f"ensemble of {len(members)} ({method} weights {', '.join(f'{w:.4f}' for w in given)}) -> {path}")
    result = evaluate(path, records_dir, split=split, val_split=val_split,
                      out_dir=os.path.join(out_dir, EVALUATION_DIR, split), batch_size=batch_size, n_boot=n_boot,
                      seed=seed, threshold_method=threshold_method, figures_on=figures_on, log=log,
                      verify_records=verify_records, min_patients=min_patients)
    write_json(os.path.join(out_dir, ENSEMBLE_INFO), {
        "created": utc_now(), "records": os.path.abspath(records_dir), "split": split, "val_split": val_split,
        "weighting": method, "weights": given, "members": rows, "ensemble": {
            "model": os.path.abspath(path), f"{split}_mean_auc": result["auc"]["mean"]}})
    log(members_table(rows, result["auc"]["mean"], split, val_split))
    result["members"] = rows
    result["best_member_comparison"] = compare_with_best_member(rows, member_probs, out_dir, split, val_split,
                                                                n_boot, seed, figures_on, log, min_patients)
    return result


def members_table(rows, ensemble_mean, split, val_split):
    """Markdown: each member's weight, validation and test mean AUC (95% CI), then the ensemble's."""
    lines = [f"| model | weight | {val_split} mean AUC | {split} mean AUC (95% CI) |", "|---|---|---|---|"]
    for r in rows:
        val = r[f"{val_split}_mean_auc"]
        lines.append(f"| {r['member']} | {r['weight']:.4f} | {'n/a' if val is None else f'{val:.4f}'} | "
                     f"{published.format_ci(r[f'{split}_mean_auc'])} |")
    lines.append(f"| **ensemble** | 1 | | {published.format_ci(ensemble_mean)} |")
    return "\n".join(lines)
