"""`evaluate(...)`: predict a whole split deterministically and write metrics.json, predictions, figures, tables."""

import os

from cxrkeras.errors import CxrError, DataError
from cxrkeras.evaluation import figures, metrics, published, report
from cxrkeras.fileio import atomic_write, write_json
from cxrkeras.labels import NO_FINDING
from cxrkeras.runs import EVALUATION_DIR, load_source

THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"


def check_labels(model_labels, record_labels, where):
    """Refuse a model whose outputs are not the records' labels in the same order (or those plus the derived
    'No Finding' class); returns whether the model has that class (the pipeline then derives it)."""
    from cxrkeras.labels import derives_no_finding

    if list(model_labels) == list(record_labels):
        return False
    if derives_no_finding(model_labels, record_labels):
        return True
    missing = [lbl for lbl in record_labels if lbl not in model_labels]
    extra = [lbl for lbl in model_labels if lbl not in record_labels]
    if not missing and not extra:
        detail = "the same labels in a different order"
    else:
        detail = "; ".join(p for p in (f"records have {missing} that the model lacks" if missing else "",
                                       f"model has {extra} that the records lack" if extra else "") if p)
    raise DataError(f"label mismatch between the model ({len(model_labels)} outputs) and {where} "
                    f"({len(record_labels)} labels): {detail}. Evaluate a model trained on records with this label set "
                    f"(model: {list(model_labels)}; records: {list(record_labels)})")


def split_size(manifest, split, records_dir):
    """Images in `split`; a clear error for an unknown or empty split."""
    from cxrkeras.data.manifest import split_info

    info = split_info(manifest, split, records_dir)
    n = int(info.get("images", 0))
    if n == 0 or not info.get("shards"):
        raise DataError(f"split {split!r} of {records_dir} is empty (0 images): nothing to evaluate. Choose a split "
                        f"with images ({', '.join(s for s, v in manifest['splits'].items() if v.get('images'))}) "
                        f"or rebuild the records with a non-empty {split!r} split")
    return n


MAX_BATCH_SIZE = 4096


def check_batch_size(batch_size):
    if not 1 <= int(batch_size) <= MAX_BATCH_SIZE:
        raise CxrError(f"--batch-size {batch_size}: must be 1 to {MAX_BATCH_SIZE}")
    return int(batch_size)


def predict_split(source, records_dir, split, batch_size=32, progress=None, verify="sha256"):
    """(probabilities [N, L], labels [N, L], image ids, patient ids) over EVERY image of the split, in record order.

    Deterministic eval preprocessing only (pipeline.build_dataset(training=False)); shards that are not the files
    the manifest lists are refused (`verify`: "sha256" or "size", see build_dataset), and the count is checked
    against the manifest so no image is silently dropped or counted twice.
    """
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.data.pipeline import build_dataset, data_errors
    from cxrkeras.inference import predict_dataset

    manifest = load_manifest(records_dir)
    no_finding = check_labels(source.labels, manifest["labels"], f"the records {records_dir}")
    expected = split_size(manifest, split, records_dir)
    ds = build_dataset(records_dir, split, stage=2, batch_size=check_batch_size(batch_size), training=False,
                       preprocessor=source.preprocessor, drop_remainder=False, deterministic=True, return_ids=True,
                       verify=verify, patient=source.patient, no_finding_class=no_finding,
                       datasets=source.datasets)
    with data_errors():
        probs, labels, ids = predict_dataset(source.model, ds,
                                             progress=(lambda n: progress(n, expected)) if progress else None)
    got = len(ids["image_id"]) if ids else 0
    if got != expected:
        raise DataError(f"{records_dir}: split {split!r} yielded {got} images but manifest.json lists "
                        f"{expected}; re-build the records")
    return probs, labels, ids["image_id"], ids["patient_id"]


def write_predictions_csv(path, labels, probs, y, image_ids, patient_ids, thresholds=None):
    """Per-image CSV: image index, patient, true labels, probabilities (and findings at `thresholds`)."""
    import pandas as pd

    cols = {"image_index": image_ids, "patient_id": patient_ids}
    for j, lbl in enumerate(labels):
        cols[f"true_{lbl}"] = y[:, j].astype(int)
    for j, lbl in enumerate(labels):
        cols[f"prob_{lbl}"] = probs[:, j]
    if thresholds is not None:
        for j, lbl in enumerate(labels):
            cols[f"finding_{lbl}"] = (probs[:, j] >= thresholds[j]).astype(int)
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def default_out_dir(source, split):
    if source.run_dir:
        return os.path.join(source.run_dir, EVALUATION_DIR, split)
    raise CxrError("give an output folder (--out) when evaluating a model file rather than a run folder")


def evaluate(model_or_run, records_dir=None, split="test", val_split="val", out_dir=None, batch_size=32,
             n_boot=1000, seed=0, n_bins=10, threshold_method="youden", figures_on=True, log=print,
             verify_records="sha256", min_patients=metrics.MIN_PATIENTS):
    """Evaluate a run folder / .keras file / keras.Model on a whole records split; returns the metrics dict.

    Thresholds are chosen on `val_split` (Youden J and F1-max) and applied unchanged to `split`; without a
    validation split they are 0.5 and the reason is recorded. Writes into `out_dir` (default
    <run>/evaluation/<split>): metrics.json, thresholds.json, predictions_<split>.csv (and _<val_split>.csv),
    roc_<split>.png, pr_<split>.png, reliability_<split>.png, comparison_<split>.md (AUCs beside the published
    columns, and each label's accuracy, sensitivity, specificity, precision, F1 and confusion counts at the
    `threshold_method` thresholds; a binary task's confusion matrix).
    `verify_records`: "sha256" (default) or "size": how shards are checked against the manifest before reading.
    `min_patients`: a label whose positives come from fewer patients is not estimable (no CI, out of the mean).
    """
    if threshold_method not in metrics.THRESHOLD_METHODS:
        raise CxrError(f"unknown threshold method {threshold_method!r}: choose "
                       f"{' or '.join(metrics.THRESHOLD_METHODS)}")
    check_batch_size(batch_size)
    source = load_source(model_or_run)
    if source.note:
        log(source.note)
    records_dir = records_dir or source.records_dir
    if not records_dir:
        raise CxrError("no records folder: pass --records DIR (the run folder does not say which records it used)")
    out_dir = out_dir or default_out_dir(source, split)
    os.makedirs(out_dir, exist_ok=True)
    labels = source.labels

    log(f"evaluating {source.model_path or 'model'} on {records_dir} split {split!r} "
        f"({source.image_size}px, {source.preprocessing} preprocessing)")
    _note_other_records(source.preprocessor, records_dir, log)
    probs, y, image_ids, patient_ids = predict_split(source, records_dir, split, batch_size, verify=verify_records)

    thresholds, val_summary = None, None
    if val_split and val_split != split:
        from cxrkeras.data.manifest import load_manifest

        manifest = load_manifest(records_dir)
        if val_split in manifest["splits"] and int(manifest["splits"][val_split].get("images", 0)) > 0:
            p_val, y_val, val_ids, val_patients = predict_split(source, records_dir, val_split, batch_size,
                                                                verify=verify_records)
            thresholds = metrics.choose_thresholds(y_val, p_val, labels)
            write_predictions_csv(os.path.join(out_dir, f"predictions_{val_split}.csv"), labels, p_val, y_val,
                                  val_ids, val_patients)
            val_auc = metrics.auc_with_ci(y_val, p_val, val_patients, labels, n_boot=0)
            val_summary = {"split": val_split, "n_images": len(val_ids), "mean_auc": val_auc["mean"]["auc"],
                           "per_label_auc": {k: v["auc"] for k, v in val_auc["per_label"].items()}}
        else:
            log(f"warning: no images in validation split {val_split!r}: thresholds default to 0.5")
    if thresholds is None:
        reason = f"no validation split ({val_split!r}) to choose thresholds on: default 0.5 used"
        thresholds = {m: {lbl: {"threshold": metrics.DEFAULT_THRESHOLD, "reason": reason} for lbl in labels}
                      for m in metrics.THRESHOLD_METHODS}

    result = metrics.compute_all(y, probs, patient_ids, labels, thresholds=thresholds, n_boot=n_boot, seed=seed,
                                 n_bins=n_bins, min_patients=min_patients)
    from cxrkeras.hashing import images_fingerprint, sha256_file

    result.update(split=split, val_split=val_split, validation=val_summary, records=os.path.abspath(records_dir),
                  manifest_sha256=sha256_file(os.path.join(records_dir, "manifest.json")),
                  images_fingerprint=images_fingerprint(image_ids, y),
                  model=source.model_path, model_sha256=source.model_sha256, variant=source.variant,
                  image_size=source.image_size, preprocessing=source.preprocessing, equalize=source.equalize,
                  preprocessor=source.preprocessor.to_config(),
                  default_threshold_method=threshold_method,
                  protocol="whole split, deterministic eval preprocessing (central square, resize), no TTA")
    compared, auc_compared = labels, result["auc"]
    if labels and labels[-1] == NO_FINDING:  # the derived class is evaluated, but no published table has it
        compared = labels[:-1]
        auc_compared = metrics.auc_with_ci(y[:, :-1], probs[:, :-1], patient_ids, compared, n_boot=n_boot, seed=seed,
                                            min_patients=min_patients)
        result["auc_without_no_finding"] = auc_compared
    write_json(os.path.join(out_dir, METRICS_FILE), result)
    thr_doc = {"labels": labels, "default_method": threshold_method, "chosen_on": val_split if val_summary else None,
               "model_sha256": source.model_sha256, "model": source.model_path,
               "methods": {m: {lbl: v["threshold"] for lbl, v in t.items()} for m, t in thresholds.items()},
               "reasons": {m: {lbl: v["reason"] for lbl, v in t.items() if v.get("reason")}
                           for m, t in thresholds.items()}}
    write_json(os.path.join(out_dir, THRESHOLDS_FILE), thr_doc)
    tvec = metrics.threshold_vector(thresholds[threshold_method], labels)
    write_predictions_csv(os.path.join(out_dir, f"predictions_{split}.csv"), labels, probs, y, image_ids,
                          patient_ids, tvec)
    if figures_on:
        figures.roc_figure(y, probs, labels, os.path.join(out_dir, f"roc_{split}.png"), result["auc"],
                           title=f"ROC curves — {split} split ({len(y)} images)")
        # a binary task's PR curve also marks the decision point at the validation-chosen threshold
        operating = result["at_thresholds"][threshold_method]["per_label"] if len(labels) == 1 else None
        figures.pr_figure(y, probs, labels, os.path.join(out_dir, f"pr_{split}.png"), result["average_precision"],
                          title=f"Precision–recall — {split}", operating=operating)
        figures.reliability_figure(result["calibration"], os.path.join(out_dir, f"reliability_{split}.png"))
    table = published.comparison_markdown(auc_compared, compared,
                                          title=f"Per-label test AUC: {split} split, {len(y)} images")
    if compared is not labels:
        nf = result["auc"]["per_label"][NO_FINDING]
        table += (f"\n{NO_FINDING} (the derived class, not in the published comparison; the mean above is over "
                  f"the {len(compared)} other labels): AUC {published.format_ci(nf)}\n")
    table += "\n" + report.threshold_markdown(result, threshold_method)
    atomic_write(os.path.join(out_dir, f"comparison_{split}.md"), table)
    log(table)
    log(summary_text(result, threshold_method))
    binary = report.binary_summary(result, threshold_method)
    if binary:
        log(binary)
    log(f"written to {out_dir}")
    result["out_dir"] = out_dir
    return result


def _note_other_records(preprocessor, records_dir, log):
    """Say so when the records are not of the size or channels the model was trained on (legal, but the user
    should know: the scores then include that change of input)."""
    from cxrkeras.data.manifest import load_manifest

    manifest = load_manifest(records_dir)
    stored, size = preprocessor.stored_size, manifest.get("image_size")
    channels = int(manifest.get("channels", 1))
    if stored and size and tuple(size) != tuple(stored):
        log(f"note: the model was trained on {stored[0]}x{stored[1]} records; {records_dir} holds {size[0]}x{size[1]}")
    if preprocessor.channels and preprocessor.channels != channels:
        log(f"note: the model was trained on {preprocessor.channels}-channel records; {records_dir} holds "
            f"{channels}-channel images")


def summary_text(result, method="youden"):
    at = result["at_thresholds"][method]
    m = result["auc"]["mean"]
    ci = (f" (95% CI {m['ci_low']:.4f}–{m['ci_high']:.4f}, {m.get('n_boot_valid')} of "
          f"{result['auc'].get('n_boot')} patient resamples)") if m.get("ci_low") is not None else ""
    excluded = m.get("excluded") or {}
    ci += f" over {len(m.get('labels_used', []))} labels ({len(excluded)} left out)" if excluded else ""
    mean_auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}"
    mp = result["average_precision"]["map"]
    macro = "n/a" if at["macro_f1"] is None else f"{at['macro_f1']:.4f}"
    micro = "n/a" if at["micro_f1"] is None else f"{at['micro_f1']:.4f}"
    return (f"mean AUC {mean_auc}{ci}; mAP {'n/a' if mp is None else f'{mp:.4f}'}; at {method} thresholds: "
            f"micro-F1 {micro}, macro-F1 {macro}, Hamming loss {at['hamming_loss']:.4f}; "
            f"ECE {result['calibration']['ece']:.4f}")
