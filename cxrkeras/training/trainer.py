"""`train(config, stage)`: one training stage (1: BCE on abnormal images; 2: focal loss on all, from stage 1)."""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import zipfile

from cxrkeras.errors import ConfigError, CxrError, DataError
from cxrkeras.hashing import sha256_file
from cxrkeras.losses import make_loss
from cxrkeras.training import rundir
from cxrkeras.training.callbacks import (MONITOR, BestCheckpoint, EarlyStop, EpochLog, Guard, HistoryCSV, NanGuard,
                                         PlateauLR, ResumeSnapshot, ValidationAUC, current_lr, load_resume_state,
                                         read_history, truncate_history)
from cxrkeras.training.summary import best_row, format_summary

HEAD_LAYERS = ("avg_pool", "head_dropout", "predictions")


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
    n_val = counts[config.data.val_split]
    if not any(0 < p < n_val for p in positives.values()):
        hint = ("with a single label every stage-1 image is positive: train stage 2 alone, "
                "`cxrkeras train --stage 2 --init none`" if stage == 1 and len(labels) == 1 else
                "build the records with a larger validation fraction")
        raise DataError(f"{records}: validation split {config.data.val_split!r} has no label with both positive and "
                        f"negative images for stage {stage}, so no validation AUC can be computed; {hint}")
    return manifest, labels, counts, positives


def _keras_file_info(path):
    """(variant, labels) from a .keras file's config.json, without loading the model."""
    try:
        with zipfile.ZipFile(path) as zf:
            cfg = json.loads(zf.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CxrError(f"{path}: not a readable .keras model file ({exc})") from exc
    for layer in cfg.get("config", {}).get("layers", []):
        if layer.get("config", {}).get("name") == "predictions":
            return layer["config"].get("variant"), list(layer["config"].get("labels") or [])
    raise CxrError(f"{path}: not a cxrkeras model (no 'predictions' layer); build it with cxrkeras")


# --init none: stage 2 without stage 1 (the paper's one-stage ablation; single-label tasks)
INIT_NONE = "none"


def _stage2_init(config, init, manifest_sha, labels, variant):
    """Path of the stage-2 starting weights, after checking they come from the same records, labels and variant;
    (None, {}) for `init == "none"`: one-stage training from model.weights."""
    if init == INIT_NONE:
        return None, {}
    stage1 = rundir.stage_path(config, 1)
    path = init or os.path.join(stage1, rundir.BEST_FILE)
    if not os.path.isfile(path):
        if init:
            raise CxrError(f"--init {init!r} does not exist")
        raise CxrError(f"stage 2 starts from stage 1's best checkpoint, but {path} does not exist: run "
                       f"`cxrkeras train --config <same config> --stage 1 --name {config.run.name}` first "
                       f"(same --run-dir/--name), or pass --init PATH to a stage-1 .keras file, or --init none to "
                       f"train stage 2 alone from model.weights")
    file_variant, file_labels = _keras_file_info(path)
    problems = []
    if file_variant != variant:
        problems.append(f"variant {file_variant!r} there, {variant!r} here")
    if file_labels != list(labels):
        problems.append(f"labels {file_labels} there, {list(labels)} here (records label order)")
    info_path = os.path.join(os.path.dirname(os.path.abspath(path)), rundir.RUN_INFO_FILE)
    info = rundir.read_json(info_path) if os.path.isfile(info_path) else {}
    if info.get("manifest_sha256") and info["manifest_sha256"] != manifest_sha:
        problems.append(f"records {info.get('records')!r} (manifest sha256 {info['manifest_sha256'][:12]}…) there, "
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


def make_datasets(config, stage, strategy=None, seed=None, verify=None):
    """(training dataset: shuffled, augmented, repeated, global batches; validation dataset: the whole split,
    deterministic eval transform, last partial batch kept). Stage 1 reads no 'No Finding' image.
    `verify`: how shards are checked against the manifest (default data.verify_records)."""
    from cxrkeras.data.pipeline import build_dataset

    common = dict(stage=stage, image_size=config.data.image_size, equalize=config.data.equalize,
                  preprocessing=model_options(config)["preprocessing"],
                  verify=verify or config.data.verify_records)
    train_ds = build_dataset(config.data.records, config.data.train_split, batch_size=config.data.batch_size,
                             training=True, shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache,
                             seed=config.train.seed if seed is None else seed, repeat=True, strategy=strategy,
                             **common)
    val_ds = build_dataset(config.data.records, config.data.val_split, batch_size=config.data.batch_size,
                           training=False, drop_remainder=False, **common)
    return train_ds, val_ds


def make_optimizer(optim, total_steps):
    import keras

    lr = optim.lr
    if optim.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(optim.lr, decay_steps=max(1, total_steps), alpha=optim.cosine_alpha)
    kw = {"clipnorm": optim.clipnorm} if optim.clipnorm else {}
    if optim.optimizer == "adam":
        return keras.optimizers.Adam(lr, **kw)
    if optim.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=optim.weight_decay, **kw)
    return keras.optimizers.SGD(lr, momentum=optim.momentum, nesterov=optim.nesterov, **kw)


def set_backbone_trainable(model, trainable):
    """Freeze/unfreeze the backbone: every layer with weights except the LKA blocks and the head."""
    from cxrkeras.models import LargeKernelAttention

    for layer in model.layers:
        if layer.name in HEAD_LAYERS or isinstance(layer, LargeKernelAttention) or not layer.weights:
            continue
        layer.trainable = trainable


def weights_fingerprint(model):
    """sha256 over all weights in model order: shows which weights a stage really started from."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return h.hexdigest()


def _tensorboard_available():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _count(variables):
    return int(sum(math.prod(v.shape) for v in variables))


def _summary_result(stage, stage_dir, labels, history, seconds, resumed_from, stopped_early, positives, log):
    row = best_row(history)
    log(format_summary(stage, labels, history, positives, seconds, stage_dir, stopped_early))
    best_path = os.path.join(stage_dir, rundir.BEST_FILE)
    return TrainResult(
        stage=stage, stage_dir=stage_dir, best_path=best_path if os.path.isfile(best_path) else None,
        best_epoch=int(row["epoch"]) if row else None,
        val_auc_mean=float(row[MONITOR]) if row else float("nan"),
        val_auc={label: float(row.get(f"val_auc_{label}", "nan") or "nan") for label in labels} if row else {},
        epochs_run=len(history), seconds=seconds, resumed_from=resumed_from, stopped_early=stopped_early)


def train(config, stage, init=None, callbacks=(), log=print):
    """Train one stage into `<run.root>/<run.name>/stage<stage>/` and return a TrainResult.

    Re-running the same command after a kill resumes after the last finished epoch (weights, optimiser state,
    learning rate, epoch, callback counters); re-running a finished stage only prints its summary.
    `callbacks`: extra keras callbacks (run after the resume snapshot of each epoch).
    """
    from cxrkeras.config import validate
    from cxrkeras.training.strategy import is_chief

    stage = int(stage)
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 (BCE, abnormal images) or 2 (focal loss, all images), got {stage}")
    validate(config)
    from cxrkeras.models.registry import get_variant

    variant = get_variant(config.model.variant)
    manifest, labels, counts, positives = _check_data(config, stage)
    manifest_sha = rundir.manifest_sha256(config.data.records)
    init_path, init_info = (None, {})
    if stage == 2:
        init_path, init_info = _stage2_init(config, init, manifest_sha, labels, variant.name)
    elif init:
        raise ConfigError("--init is for stage 2 (stage 1 starts from model.weights, e.g. imagenet)")

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

    if stage == 2 and state != "new" and os.path.isfile(info_path):
        before = (rundir.read_json(info_path).get("init") or {}).get("sha256")
        now = sha256_file(init_path) if init_path else None
        if before != now:
            was = "model.weights (--init none)" if before is None else "another stage-1 checkpoint"
            given = "model.weights (--init none)" if now is None else init_path
            raise ConfigError(f"{stage_dir} was started from {was}, not from {given} as now (stage 1 retrained?): "
                              f"pass --overwrite to train stage 2 again")
    if state == "finished":
        info = rundir.read_json(info_path)
        log(f"stage {stage} of run {config.run.name!r} already finished ({stage_dir}); "
            f"pass --overwrite to train it again")
        return _summary_result(stage, stage_dir, labels, read_history(history_path), info.get("seconds", 0.0),
                               info.get("resumed_from", 0), info.get("stopped_early"), positives, log)
    if chief:
        rundir.write_config(stage_dir, config)
    try:
        return _run(config, stage, variant, manifest, labels, counts, positives, manifest_sha, init_path,
                    init_info, stage_dir, out_dir, state, chief, list(callbacks), log)
    finally:
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)


def _run(config, stage, variant, manifest, labels, counts, positives, manifest_sha, init_path, init_info,
         stage_dir, out_dir, state, chief, extra_callbacks, log):
    from cxrkeras.training.strategy import (choose_strategy, describe_devices, fit_scope, precision_policy,
                                            resolve_mixed_precision)

    # The strategy first: MultiWorkerMirroredStrategy must exist before other TensorFlow work starts.
    strategy = choose_strategy(config.train.strategy)
    import keras
    import tensorflow as tf

    from cxrkeras.data.pipeline import data_error_from
    from cxrkeras.models import build_model

    info_path = os.path.join(out_dir, rundir.RUN_INFO_FILE)
    history_path = os.path.join(out_dir, rundir.HISTORY_FILE)
    resume_dir = os.path.join(stage_dir, rundir.RESUME_DIR)
    resume = load_resume_state(resume_dir) if state == "resume" else None
    start_epoch = int(resume["epoch"]) if resume else 0
    if chief:
        truncate_history(history_path, start_epoch)
    prior_seconds = float(resume.get("seconds", 0.0)) if resume else 0.0
    epochs = config.train.epochs
    batch = config.data.batch_size
    replicas = int(strategy.num_replicas_in_sync)
    steps = config.train.steps_per_epoch or max(1, counts[config.data.train_split] // batch)
    mixed = resolve_mixed_precision(config.train.mixed_precision)
    image_size = config.data.image_size

    info = rundir.read_json(info_path) if (resume and os.path.isfile(info_path)) else {}
    info.update({
        "stage": stage, "run": config.run.name, "created": info.get("created", rundir.now()), "updated": rundir.now(),
        "records": os.path.abspath(config.data.records), "manifest_sha256": manifest_sha,
        "variant": variant.name, "labels": labels, "image_size": image_size,
        "preprocessing": model_options(config)["preprocessing"],
        "equalize": config.data.equalize, "git_commit": rundir.git_commit(), "versions": rundir.versions(),
        "devices": describe_devices(strategy), "mixed_precision": mixed, "xla": config.train.xla,
        "global_batch_size": batch, "per_replica_batch_size": batch // replicas if batch % replicas == 0 else None,
        "steps_per_epoch": steps, "train_images": counts[config.data.train_split],
        "val_images": counts[config.data.val_split], "epochs_requested": epochs, "finished": False,
        "init": {"path": os.path.abspath(init_path), "sha256": sha256_file(init_path),
                 "stage1_best_epoch": init_info.get("best_epoch")} if init_path else None,
    })
    if resume:
        info.setdefault("resumes", []).append({"at": rundir.now(), "from_epoch": start_epoch})
    if chief:
        rundir.write_json(info_path, info)
    log(f"stage {stage}: {variant.name}, {counts[config.data.train_split]} training / "
        f"{counts[config.data.val_split]} validation images, {image_size}px, global batch {batch} over {replicas} "
        f"replica(s) ({type(strategy).__name__}), {steps} steps/epoch, mixed precision {'on' if mixed else 'off'}"
        f"{', XLA' if config.train.xla else ''} -> {stage_dir}")
    if resume:
        log(f"resuming stage {stage} after epoch {start_epoch} from {resume['weights']}")

    t0 = time.time()
    guard = Guard()
    with precision_policy(mixed):
        keras.utils.set_random_seed(config.train.seed + start_epoch)
        data_seed = config.train.seed + 1000 * start_epoch  # a resumed run does not replay epoch 1's order
        train_ds, val_ds = make_datasets(config, stage, strategy, data_seed, verify="size")  # hashed in _check_data

        overrides = model_options(config)
        weights = config.model.weights if (init_path is None and not resume) else None
        with strategy.scope():
            model = build_model(variant.name, num_classes=len(labels), weights=weights,
                                input_shape=(image_size, image_size, 3), label_names=labels, **overrides)
            if getattr(model, "weights_report", None):
                log(model.weights_report)
            if init_path and not resume:
                try:
                    model.load_weights(init_path)
                except (ValueError, KeyError) as exc:
                    raise CxrError(f"cannot initialise stage 2 from {init_path}: its architecture differs from "
                                   f"this config's model ({exc}); use the same model settings as stage 1") from exc
        if init_path and not resume:
            info["init"]["weights_fingerprint"] = weights_fingerprint(model)
            if chief:
                rundir.write_json(info_path, info)
            log(f"stage 2: initialised from {init_path}"
                + (f" (stage 1 best epoch {init_info['best_epoch']}, mean val AUC {init_info['val_auc_mean']:.4f})"
                   if init_info.get("best_epoch") and init_info.get("val_auc_mean") is not None else "")
                + f", weights fingerprint {info['init']['weights_fingerprint'][:16]}")

        loss = make_loss(config, stage)
        auc_cb = ValidationAUC(val_ds, labels, guard, loss_fn=loss)
        best_cb = BestCheckpoint(os.path.join(out_dir, rundir.BEST_FILE), guard)
        early_cb = EarlyStop(config.train.early_stopping_patience)
        stateful = {"best": best_cb, "early_stopping": early_cb}
        cbs = [NanGuard(guard), auc_cb]
        if config.optim.schedule == "plateau":
            plateau_cb = PlateauLR(config.optim.factor, config.optim.patience, config.optim.min_lr)
            stateful["plateau"] = plateau_cb
            cbs.append(plateau_cb)
        cbs += [best_cb, early_cb]
        tb_dir = os.path.join(out_dir, rundir.TENSORBOARD_DIR)
        if config.train.gradcam_every:
            from cxrkeras.explain.callback import GradCAMCallback

            cbs.append(GradCAMCallback(val_ds, None, os.path.join(tb_dir, "gradcam"),
                                       every=config.train.gradcam_every, max_images=config.train.gradcam_images))
        if _tensorboard_available():
            cbs.append(keras.callbacks.TensorBoard(tb_dir, write_graph=False, profile_batch=0))
        else:
            log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard); history.csv has all")
        cbs.append(HistoryCSV(history_path, guard))
        if config.train.verbose:
            cbs.append(EpochLog(epochs, log))
        if resume:
            for name, cb in stateful.items():
                cb.set_state(resume.get("callbacks", {}).get(name))

        freeze = min(config.train.freeze_backbone_epochs, epochs)
        phases = []
        if start_epoch < freeze:
            phases.append((start_epoch, freeze, True))
        if max(start_epoch, freeze) < epochs:
            phases.append((max(start_epoch, freeze), epochs, False))
        snapshot = ResumeSnapshot(
            os.path.join(out_dir, rundir.RESUME_DIR), os.path.join(out_dir, rundir.LAST_FILE), guard, stateful,
            lambda epoch: {"seconds": prior_seconds + time.time() - t0})
        cbs += [snapshot] + extra_callbacks

        stopped_before = (resume or {}).get("callbacks", {}).get("early_stopping", {}).get("stopped_epoch")
        if stopped_before:
            phases = []
        carried = None
        for i, (begin, end, frozen) in enumerate(phases):
            set_backbone_trainable(model, not frozen)
            with strategy.scope():
                model.compile(optimizer=make_optimizer(config.optim, epochs * steps), loss=loss,
                              jit_compile=bool(config.train.xla))
                model.optimizer.build(model.trainable_variables)
            if i == 0 and resume:
                model.load_weights(resume["weights"])
            elif carried is not None:  # after unfreezing: keep the schedule position and the current rate
                model.optimizer.iterations.assign(carried[0])
                if config.optim.schedule != "cosine":
                    model.optimizer.learning_rate.assign(carried[1])
            log(f"epochs {begin + 1}-{end}: backbone {'frozen' if frozen else 'trainable'}, "
                f"{_count(model.trainable_variables):,} trainable parameters")
            try:
                with fit_scope(model, strategy):
                    model.fit(train_ds, epochs=end, initial_epoch=begin, steps_per_epoch=steps, callbacks=cbs,
                              shuffle=False, verbose=1 if config.train.verbose == 1 else 0)
            except tf.errors.OpError as exc:
                err = data_error_from(exc)
                if err is not None:
                    raise err from None
                raise
            if guard.stopped or model.stop_training:
                break
            carried = (int(keras.ops.convert_to_numpy(model.optimizer.iterations)), current_lr(model.optimizer))

    seconds = prior_seconds + time.time() - t0
    history = read_history(history_path)
    if guard.stopped:
        kept = [f"{name} (epoch {e})" for name, e in (("best.keras", best_cb.best_epoch),
                                                     ("last.keras", len(history) or None)) if e]
        if guard.nan_at is not None:
            epoch, batch_index, value = guard.nan_at
            info["nan_at"] = {"epoch": epoch + 1, "batch": batch_index}
            what = f"the training loss became {value} at epoch {epoch + 1}, batch {batch_index}"
        else:
            epoch, reason = guard.collapsed
            info["collapsed_at"] = {"epoch": epoch + 1, "reason": reason}
            what = f"at epoch {epoch + 1} {reason}"
        info.update({"seconds": seconds, "updated": rundir.now()})
        if chief:
            rundir.write_json(info_path, info)
        raise CxrError(f"stage {stage}: {what}; training stopped. The last good checkpoints are kept in {stage_dir}: "
                       f"{', '.join(kept) or 'none (no good epoch)'}. Lower the learning rate (--lr) or turn "
                       f"mixed precision off, then retrain with --overwrite (or --name for a new run)")
    stopped_early = early_cb.stopped_epoch
    row = best_row(history)
    info.update({"finished": True, "updated": rundir.now(), "seconds": round(seconds, 2),
                 "epochs_run": len(history), "stopped_early": stopped_early,
                 "best_epoch": int(row["epoch"]) if row else None,
                 "val_auc_mean": float(row[MONITOR]) if row else None,
                 "val_auc": {label: float(row.get(f"val_auc_{label}") or "nan") for label in labels} if row else None,
                 "resumed_from": start_epoch})
    if chief:
        rundir.write_json(info_path, info)
    return _summary_result(stage, stage_dir, labels, history, seconds, start_epoch, stopped_early, positives, log)
