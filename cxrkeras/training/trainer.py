"""`train(config, stage)`: one training stage (1: BCE on abnormal images; 2: focal loss on all, from stage 1).

This module checks the inputs and prepares the stage folder before any TensorFlow work; `StageRun`
(cxrkeras.training.stage) builds the model and callbacks and runs the fit phases.
"""

import dataclasses
import os
import shutil
import tempfile

from cxrkeras.errors import ConfigError, CxrError, DataError
from cxrkeras.hashing import sha256_file
from cxrkeras.training import rundir
from cxrkeras.training.callbacks import MONITOR, read_history
from cxrkeras.training.optim import HEAD_LAYERS, make_optimizer, set_backbone_trainable  # noqa: F401 (their old home)
from cxrkeras.training.summary import best_row, format_summary


@dataclasses.dataclass
class TrainResult:
    stage: int
    stage_dir: str
    best_path: str | None
    best_epoch: int | None
    val_auc_mean: float
    val_auc: dict
    epochs_run: int
    seconds: float
    resumed_from: int = 0
    stopped_early: int | None = None


def _check_data(config, stage):
    """Manifest, splits, shards (as the manifest lists them: sizes, sha256) and stage image counts; clear errors
    before any TensorFlow work and before the run folder is made."""
    from cxrkeras.data.manifest import load_manifest, split_info, stage_images, verify_shards

    records = config.data.records
    manifest = load_manifest(records)
    for split in (config.data.train_split, config.data.val_split):
        split_info(manifest, split, records)
        verify_shards(manifest, records, split, config.data.verify_records)
    labels = list(manifest["labels"])
    counts = {}
    for split in (config.data.train_split, config.data.val_split):
        counts[split] = stage_images(manifest["splits"][split], stage)
        if counts[split] <= 0:
            raise DataError(f"{records}: split {split!r} has no images for stage {stage}"
                            + (" (all its images are 'No Finding')" if stage == 1 else ""))
    val = manifest["splits"][config.data.val_split]
    positives = {label: int(val.get("positives", {}).get(label, 0)) for label in labels}
    if config.data.no_finding_class:  # derived by the pipeline: stage 1 reads no 'No Finding' image
        from cxrkeras.labels import NO_FINDING, with_no_finding

        labels = with_no_finding(labels, where=f"the records {records}")
        positives[NO_FINDING] = int(val.get("no_finding", 0)) if stage == 2 else 0
    n_val = counts[config.data.val_split]
    if not any(0 < p < n_val for p in positives.values()):
        hint = ("with a single label every stage-1 image is positive: train stage 2 alone, "
                "`cxrkeras train --stage 2 --init none`" if stage == 1 and len(labels) == 1 else
                "build the records with a larger validation fraction")
        raise DataError(f"{records}: validation split {config.data.val_split!r} has no label with both positive and "
                        f"negative images for stage {stage}, so no validation AUC can be computed; {hint}")
    return manifest, labels, counts, positives


# --init none: stage 2 without stage 1 (the paper's one-stage ablation; single-label tasks)
INIT_NONE = "none"


def _stage2_init(config, init, manifest_sha, labels, variant):
    """Path of the stage-2 starting weights, after checking they come from the same records, labels and variant;
    (None, None) for `init == "none"`: one-stage training from model.weights. The info: the RunInfo of the
    checkpoint's stage folder."""
    if init == INIT_NONE:
        return None, None
    stage1 = rundir.stage_path(config, 1)
    path = init or os.path.join(stage1, rundir.BEST_FILE)
    if not os.path.isfile(path):
        if init:
            raise CxrError(f"--init {init!r} does not exist")
        raise CxrError(f"stage 2 starts from stage 1's best checkpoint, but {path} does not exist: run "
                       f"`cxrkeras train --config <same config> --stage 1 --name {config.run.name}` first "
                       f"(same --run-dir/--name), or pass --init PATH to a stage-1 .keras file, or --init none to "
                       f"train stage 2 alone from model.weights")
    from cxrkeras.models.keras_file import keras_file_info
    from cxrkeras.runs import RunInfo

    file_info = keras_file_info(path)
    problems = []
    if file_info["variant"] != variant:
        problems.append(f"variant {file_info['variant']!r} there, {variant!r} here")
    if file_info["labels"] != list(labels):
        problems.append(f"labels {file_info['labels']} there, {list(labels)} here (records label order)")
    if bool(file_info.get("patient_features")) != bool(config.model.patient_features):
        problems.append("patient features (model.patient_features) " + ("there, not here" if
                        file_info.get("patient_features") else "here, not there"))
    info = RunInfo.read(os.path.dirname(os.path.abspath(path))) or RunInfo()
    if info.manifest_sha256 and info.manifest_sha256 != manifest_sha:
        problems.append(f"records {info.records!r} (manifest sha256 {info.manifest_sha256[:12]}…) there, "
                        f"{config.data.records!r} (manifest sha256 {manifest_sha[:12]}…) here")
    if problems:
        raise ConfigError(f"stage 2 refuses to start from {path}: it was trained on different inputs "
                          f"({'; '.join(problems)}). Use the same records, labels and --variant as stage 1, or "
                          f"retrain stage 1")
    return path, info


def model_options(config):
    """build_model options of config.model: the defaults its initial weights give (preprocessing, batch norm), then
    its keys. The same for stage 1, stage 2 and a resumed run, which build with weights=None and load a checkpoint."""
    from cxrkeras.models import build_options

    overrides = dict(config.model.overrides)
    if config.model.dropout is not None:
        overrides["dropout"] = config.model.dropout
    if config.model.preprocessing is not None:
        overrides["preprocessing"] = config.model.preprocessing
    return build_options(config.model.variant, config.model.weights, **overrides)


def stage_preprocessor(config, manifest=None):
    """The Preprocessor of a run's data: the model size, the model's normalisation, data.equalize, and the records'
    stored size and channels (from `manifest`, else the records' manifest)."""
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.data.preprocessor import Preprocessor

    manifest = manifest or load_manifest(config.data.records)
    return Preprocessor.for_records(manifest, config.data.image_size, model_options(config)["preprocessing"],
                                    config.data.equalize)


def make_datasets(config, stage, strategy=None, seed=None, verify=None, preprocessor=None, patient=None,
                  datasets=None, dadam=None):
    """(training dataset: shuffled, augmented, repeated, global batches; validation dataset: the whole split,
    deterministic eval transform, last partial batch kept). Stage 1 reads no 'No Finding' image.
    `verify`: how shards are checked against the manifest (default data.verify_records). `patient`: the model's
    PatientEncoder (inputs are then (images, patient features)); `datasets`: the source dataset names of a model
    with the FPSM dataset embedding (inputs are then (images, dataset index)). `dadam`: the OnlineDadam of
    data.dadam (cxrkeras.data.dadam_online.from_config), training dataset only."""
    from cxrkeras.data.pipeline import build_dataset

    preprocessor = preprocessor or stage_preprocessor(config)
    common = dict(stage=stage, preprocessor=preprocessor, verify=verify or config.data.verify_records,
                  patient=patient, no_finding_class=config.data.no_finding_class, datasets=datasets)
    d = config.data
    augmentation = dict(augment=d.augment, max_rotation=d.max_rotation, crop_scale=tuple(d.crop_scale), flip=d.flip,
                        fill_mode=d.fill_mode)
    train_ds = build_dataset(config.data.records, config.data.train_split, batch_size=config.data.batch_size,
                             training=True, shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache,
                             seed=config.train.seed if seed is None else seed, repeat=True, strategy=strategy,
                             dadam=dadam, **augmentation, **common)
    val_ds = build_dataset(config.data.records, config.data.val_split, batch_size=config.data.batch_size,
                           training=False, drop_remainder=False, **common)
    return train_ds, val_ds


def weights_fingerprint(model):
    """sha256 over all weights in model order: shows which weights a stage really started from."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return h.hexdigest()


def summary_result(stage, stage_dir, labels, history, seconds, resumed_from, stopped_early, positives, log,
                   monitor=MONITOR):
    row = best_row(history, monitor)
    log(format_summary(stage, labels, history, positives, seconds, stage_dir, stopped_early, monitor))
    best_path = os.path.join(stage_dir, rundir.BEST_FILE)
    return TrainResult(
        stage=stage, stage_dir=stage_dir, best_path=best_path if os.path.isfile(best_path) else None,
        best_epoch=int(row["epoch"]) if row else None,
        val_auc_mean=float(row[MONITOR]) if row else float("nan"),
        val_auc={label: float(row.get(f"val_auc_{label}", "nan") or "nan") for label in labels} if row else {},
        epochs_run=len(history), seconds=seconds, resumed_from=resumed_from, stopped_early=stopped_early)


def stage_inputs(config, stage, init=None):
    """Everything a stage needs checked before any TensorFlow work: the variant, the records (manifest, labels,
    image counts, validation positives, manifest sha256) and stage 2's starting checkpoint."""
    from cxrkeras.config import validate
    from cxrkeras.models.registry import get_variant

    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (BCE, abnormal images) or 2 (focal loss, all images), got {stage}")
    validate(config)
    variant = get_variant(config.model.variant)
    manifest, labels, counts, positives = _check_data(config, stage)
    manifest_sha = rundir.manifest_sha256(config.data.records)
    init_path, init_info = None, None
    if stage == 2:
        init_path, init_info = _stage2_init(config, init, manifest_sha, labels, variant.name)
    elif init:
        raise ConfigError("--init is for stage 2 (stage 1 starts from model.weights, e.g. imagenet)")
    return {"variant": variant, "manifest": manifest, "labels": labels, "counts": counts, "positives": positives,
            "manifest_sha": manifest_sha, "init_path": init_path, "init_info": init_info}


def stage_context(config, stage, inputs, log, **where):
    """The StageContext of `stage_inputs` (with the patient encoder of a model with patient features, fitted on the
    training split); `where`: stage_dir, out_dir, state, chief."""
    from cxrkeras.training.stage import StageContext

    patient = None
    if config.model.patient_features:  # the age normalisation of the training split, stored with the model
        from cxrkeras.data.patient import fit_encoder

        patient = fit_encoder(config.data.records, config.data.train_split, config.data.patient_missing, log)
        log(f"patient features: {patient.describe()}")
    if config.data.no_finding_class and stage == 1:
        log("note: stage 1 reads only images with a finding, so the 'No Finding' output sees no positive image "
            "before stage 2 (or train one stage: --stage 2 --init none)")
    build_options = model_options(config)
    if build_options.get("head_dataset_embedding") is True:  # one embedding row per source of the training records
        from cxrkeras.data.datasets import manifest_names

        build_options["head_dataset_embedding"] = manifest_names(inputs["manifest"])
        log(f"dataset embedding: {len(build_options['head_dataset_embedding'])} source dataset(s) of the records "
            f"({', '.join(build_options['head_dataset_embedding'])})")
    return StageContext(config=config, stage=stage, variant=inputs["variant"], labels=inputs["labels"],
                        counts=inputs["counts"], positives=inputs["positives"], manifest_sha=inputs["manifest_sha"],
                        preprocessor=stage_preprocessor(config, inputs["manifest"]),
                        build_options=build_options, init_path=inputs["init_path"],
                        init_info=inputs["init_info"], patient=patient, **where)


def train(config, stage, init=None, callbacks=(), log=print):
    """Train one stage into `<run.root>/<run.name>/stage<stage>/` and return a TrainResult.

    Re-running the same command after a kill resumes after the last finished epoch (weights, optimiser state,
    learning rate, epoch, callback counters); re-running a finished stage only prints its summary.
    `callbacks`: extra keras callbacks (run after the resume snapshot of each epoch).
    """
    from cxrkeras.training.strategy import is_chief

    stage = int(stage)
    inputs = stage_inputs(config, stage, init)
    labels, positives, init_path = inputs["labels"], inputs["positives"], inputs["init_path"]
    chief = is_chief()
    if chief:
        stage_dir, state = rundir.prepare_stage_dir(config, stage, overwrite=config.run.overwrite)
        out_dir = stage_dir
    else:  # other workers read the chief's resume state but write their copies to a scratch folder
        stage_dir = rundir.stage_path(config, stage)
        state = "new" if config.run.overwrite else "resume"
        out_dir = tempfile.mkdtemp(prefix="cxrkeras-worker-")
    info_path = os.path.join(out_dir, rundir.RUN_INFO_FILE)
    history_path = os.path.join(out_dir, rundir.HISTORY_FILE)

    from cxrkeras.runs import RunInfo

    if stage == 2 and state != "new" and os.path.isfile(info_path):
        before = ((RunInfo.read(out_dir) or RunInfo()).init or {}).get("sha256")
        now = sha256_file(init_path) if init_path else None
        if before != now:
            was = "model.weights (--init none)" if before is None else "another stage-1 checkpoint"
            given = "model.weights (--init none)" if now is None else init_path
            raise ConfigError(f"{stage_dir} was started from {was}, not from {given} as now (stage 1 retrained?): "
                              f"pass --overwrite to train stage 2 again")
    if state == "finished":
        info = RunInfo.read(out_dir)
        log(f"stage {stage} of run {config.run.name!r} already finished ({stage_dir}); "
            f"pass --overwrite to train it again")
        return summary_result(stage, stage_dir, labels, read_history(history_path), info.seconds or 0.0,
                              info.resumed_from or 0, info.stopped_early, positives, log, config.train.monitor)
    if chief:
        rundir.write_config(stage_dir, config)
    from cxrkeras.training.stage import StageRun

    context = stage_context(config, stage, inputs, log, stage_dir=stage_dir, out_dir=out_dir, state=state,
                            chief=chief)
    try:
        return StageRun(context, callbacks, log).run()
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def find_learning_rate(config, stage, out_dir, init=None, steps=None, start_lr=1e-7, end_lr=10.0, log=print):
    """`cxrkeras lr-find`: the LR finder on the stage's model, data, loss and optimiser as its first phase trains
    them (frozen backbone included); writes lr_find.png / lr_find.json into `out_dir`, returns the LRFinderResult
    (with `weights_restored`: the weights after the sweep are those before it)."""
    from cxrkeras.training.stage import StageRun

    stage = int(stage)
    inputs = stage_inputs(config, stage, init)
    os.makedirs(out_dir, exist_ok=True)
    context = stage_context(config, stage, inputs, log, stage_dir=out_dir, out_dir=out_dir, state="new", chief=True)
    return StageRun(context, log=log).lr_find_only(int(steps or config.optim.lr_find_steps), start_lr, end_lr)
