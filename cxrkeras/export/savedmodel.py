"""`export(run_or_model, out_base)`: a TF Serving SavedModel in the next numbered version folder, checked after."""

import os
import re
import shutil
import tempfile

from cxrkeras.constants import THRESHOLD_METHODS
from cxrkeras.errors import CxrError
from cxrkeras.evaluation import metrics
from cxrkeras.fileio import atomic_write, json_text, utc_now, yaml_text
from cxrkeras.runs import load_source


def version_dirs(out_base):
    """{version: path} of the numbered version folders under out_base."""
    if not os.path.isdir(out_base):
        return {}
    return {int(d): os.path.join(out_base, d) for d in os.listdir(out_base)
            if re.fullmatch(r"\d+", d) and os.path.isdir(os.path.join(out_base, d))}


def next_version(out_base):
    return max(version_dirs(out_base), default=0) + 1


def _thresholds_from_evaluation(source, method, log):
    """Thresholds of this very model from a previous `cxrkeras evaluate --run` (matched by the .keras sha256)."""
    for path, doc, ours in source.evaluation_files("thresholds.json"):
        if not ours:
            log(f"note: {path} belongs to another model file (sha256 differs): not used")
            continue
        if doc.get("labels") != source.labels or method not in doc.get("methods", {}):
            continue
        values = [doc["methods"][method][lbl] for lbl in source.labels]
        return values, {"source": "evaluation", "path": os.path.abspath(path), "chosen_on": doc.get("chosen_on"),
                        "reasons": doc.get("reasons", {}).get(method, {})}
    return None


def _test_metrics_from_evaluation(source):
    """The metrics.json of a previous test-split evaluation of this model file, or None."""
    for path, doc, ours in source.evaluation_files("metrics.json"):
        if ours and doc.get("split") == "test":
            return path
    return None


def resolve_thresholds(source, records_dir=None, method="youden", val_split="val", batch_size=32, log=print):
    """(thresholds [L], info): the run's evaluation, else chosen on the validation split of `records_dir`, else
    0.5 with a warning recorded in info["warning"]."""
    if method not in THRESHOLD_METHODS:
        raise CxrError(f"unknown threshold method {method!r}: choose {' or '.join(THRESHOLD_METHODS)}")
    found = _thresholds_from_evaluation(source, method, log)
    if found:
        log(f"thresholds ({method}) from {found[1]['path']}")
        return found
    if records_dir:
        from cxrkeras.data.manifest import load_manifest
        from cxrkeras.evaluation.evaluate import predict_split

        manifest = load_manifest(records_dir)
        if val_split in manifest["splits"] and int(manifest["splits"][val_split].get("images", 0)) > 0:
            log(f"choosing {method} thresholds on {records_dir} split {val_split!r}")
            p_val, y_val, _, _ = predict_split(source, records_dir, val_split, batch_size)
            chosen = metrics.choose_thresholds(y_val, p_val, source.labels, methods=(method,))[method]
            return [chosen[lbl]["threshold"] for lbl in source.labels], {
                "source": "validation", "records": os.path.abspath(records_dir), "chosen_on": val_split,
                "reasons": {k: v["reason"] for k, v in chosen.items() if v["reason"]}}
    warning = ("no evaluation of this model and no records given: findings use threshold 0.5 for every label; "
               "re-export after `cxrkeras evaluate --run ...`, or pass --records to choose thresholds on validation")
    log(f"warning: {warning}")
    return [metrics.DEFAULT_THRESHOLD] * len(source.labels), {"source": "default", "warning": warning}


def _write_assets(folder, source, thresholds, thr_info, method, test_metrics_path):
    from cxrkeras import __version__

    paths = {}

    def put(name, text):
        paths[os.path.splitext(name)[0]] = atomic_write(os.path.join(folder, name), text)

    put("labels.txt", "\n".join(source.labels) + "\n")
    put("thresholds.json", json_text({"labels": source.labels, "thresholds": thresholds, "method": method,
                                      **thr_info}))
    config = source.config.to_dict() if source.config else {
        "data": {"image_size": source.image_size, "equalize": source.equalize}, "model": {"variant": source.variant}}
    put("config.yaml", yaml_text(config))
    if test_metrics_path:
        shutil.copyfile(test_metrics_path, os.path.join(folder, "test_metrics.json"))
        paths["test_metrics"] = os.path.join(folder, "test_metrics.json")
    extra = (", age: float32 [batch] (years; -1 unknown), sex: string [batch] (M/F), view: string [batch] (PA/AP)"
             if source.patient else "")
    if source.datasets:
        extra += f", dataset: string [batch] (the source dataset's name: {', '.join(source.datasets)})"
    info = {"created": utc_now(), "cxrkeras": __version__, "model": source.model_path,
            "model_sha256": source.model_sha256, "variant": source.variant, "labels": source.labels,
            "image_size": source.image_size, "preprocessing": source.preprocessing, "equalize": source.equalize,
            "preprocessor": source.preprocessor.to_config(), "threshold_method": method,
            "thresholds_source": thr_info.get("source"), "warning": thr_info.get("warning"),
            "patient_features": source.patient.to_config() if source.patient else None,
            "datasets": source.datasets,
            "signatures": {"serving_default": f"image_bytes: string [batch] (PNG/JPEG){extra} -> probabilities "
                                              "float32 [batch, labels], findings bool [batch, labels]",
                           "predict_images": f"images: float32 [batch, {source.image_size}, {source.image_size}, 3] "
                                             f"(preprocessed){extra} -> probabilities, findings"}}
    put("export_info.json", json_text(info))
    return paths


def export(run_or_model, out_base, records_dir=None, threshold_method="youden", val_split="val", verify=True,
           batch_size=32, log=print):
    """Write a SavedModel to out_base/<next version>/ and check it in a fresh process; returns a summary dict.

    run_or_model: a run folder, a stage folder, a .keras file or a keras.Model. Thresholds for `findings`: the
    run's evaluation (same .keras sha256), else chosen on `val_split` of `records_dir`, else 0.5 (warned).
    """
    from cxrkeras.data.datasets import dataset_input
    from cxrkeras.export.serving import build_archive
    from cxrkeras.export.verify import TOLERANCE, run_fresh, write_case

    if os.path.exists(out_base) and not os.path.isdir(out_base):
        raise CxrError(f"--out {out_base!r} is a file: give a folder (exports/<name>); versions go in its numbered "
                       f"subfolders")
    if re.fullmatch(r"\d+", os.path.basename(os.path.normpath(out_base))) and \
            os.path.isfile(os.path.join(out_base, "saved_model.pb")):
        raise CxrError(f"--out {out_base!r} is a version folder of an export: give its parent (the model base "
                       f"folder); the next version number is chosen there")
    source = load_source(run_or_model)
    for note in (source.note, source.preprocessor_note):
        if note:
            log(note)
    log(f"preprocessing: {source.preprocessor.describe()}")
    thresholds, thr_info = resolve_thresholds(source, records_dir, threshold_method, val_split, batch_size, log)
    os.makedirs(out_base, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-", dir=out_base)  # not numeric: TF Serving ignores it
    try:
        asset_dir = os.path.join(work, "_assets")
        os.makedirs(asset_dir)
        assets = _write_assets(asset_dir, source, thresholds, thr_info, threshold_method,
                               _test_metrics_from_evaluation(source))
        staged = os.path.join(work, "model")
        archive = build_archive(source.model, thresholds, source.preprocessor, asset_paths=assets,
                                patient=source.patient, datasets=dataset_input(source))
        archive.write_out(staged, verbose=False)
        # a numbered folder appears only complete (rename), so a polling TF Serving never loads half a model
        while True:
            version = next_version(out_base)
            target = os.path.join(out_base, str(version))
            try:
                os.rename(staged, target)
                break
            except OSError:
                if not os.path.exists(target):
                    raise
        log(f"SavedModel written to {target} (version {version})")
        result = {"version": version, "path": os.path.abspath(target), "thresholds": dict(zip(source.labels,
                  thresholds)), "threshold_method": threshold_method, "thresholds_info": thr_info,
                  "labels": source.labels, "warning": thr_info.get("warning")}
        if verify:
            case_dir = os.path.join(work, "case")
            write_case(case_dir, source.model, source.preprocessor, patient=source.patient,
                       datasets=dataset_input(source))
            check = run_fresh(target, case_dir)
            result["verification"] = check
            log(check["signatures"])
            worst = max(check["max_abs_diff_bytes"], check["max_abs_diff_images"], check["after_bad_max_abs_diff"])
            log(f"fresh-process check: max |SavedModel - Keras| = {check['max_abs_diff_bytes']:.2e} (image_bytes), "
                f"{check['max_abs_diff_images']:.2e} (predict_images); findings consistent: {check['findings_ok']}; "
                f"bad bytes -> InvalidArgument: {check['bad_bytes_error']!r}; next batch still served"
                + (f"; bad patient value -> InvalidArgument: {check['bad_patient_error']!r}" if source.patient else "")
                + (f"; unknown dataset -> InvalidArgument: {check['bad_dataset_error']!r}" if source.datasets else ""))
            patient_ok = (not source.patient or bool(check.get("bad_patient_error"))) and \
                (not source.datasets or bool(check.get("bad_dataset_error")))
            if worst > TOLERANCE or not check["findings_ok"] or not check["bad_bytes_error"] or not patient_ok:
                raise CxrError(f"exported model at {target} does not match the Keras model (max abs diff {worst:.2e} "
                               f"> {TOLERANCE}) or mishandles bad input: {check}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
