"""`StageRun`: one training stage in its run folder: model, callbacks and fit phases, each in its own method.

`train()` prepares a `StageContext` (checked records, the stage folder and its resume state, stage 2's starting
weights) and calls `StageRun(context).run()`. A training recipe changes one piece by overriding its method:
`plan_phases` (the epochs, what is frozen and the learning rates of each), `build_optimizer` (per phase),
`build_loss`, `build_callbacks` (its list, which values survive a resume) and `monitor` (train.monitor: the value
that picks best.keras and drives early stopping and the plateau schedule).

Recipes (train.recipe): "fit" runs one schedule over all epochs, the first train.freeze_backbone_epochs with the
backbone frozen; "fine_tune" is fastai's `fine_tune(epochs, base_lr, freeze_epochs, lr_mult)`: freeze, then
`fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99)`; base_lr /= 2, unfreeze, then
`fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=0.3, div=5)`, each cycle with fresh Adam state
(fastai's unfreeze clears it). Batch norm stays trainable while frozen (train.train_bn, fastai's train_bn).
"""

import dataclasses
import os
import time

from cxrkeras.errors import CxrError
from cxrkeras.fileio import utc_now
from cxrkeras.runs import BEST_FILE, HISTORY_FILE, LAST_FILE, RESUME_DIR, TENSORBOARD_DIR, RunInfo
from cxrkeras.training import callbacks as cb
from cxrkeras.training import optim
from cxrkeras.training import rundir


@dataclasses.dataclass
class StageContext:
    """What `train()` has checked and prepared before any TensorFlow work."""

    config: object
    stage: int
    variant: object  # cxrkeras.models.registry.Variant
    labels: list
    counts: dict  # {split: images the stage reads}
    positives: dict  # {label: validation positives}
    manifest_sha: str
    preprocessor: object  # cxrkeras.data.preprocessor.Preprocessor of the stage's data
    build_options: dict  # build_model options of config.model (model_options)
    init_path: str = None  # stage 2: the .keras it starts from (None: model.weights)
    init_info: RunInfo = None
    stage_dir: str = None
    out_dir: str = None  # stage_dir on the chief, a scratch folder on other workers
    state: str = "new"  # new | resume
    chief: bool = True
    patient: object = None  # cxrkeras.data.patient.PatientEncoder of a model with patient features

    @property
    def datasets(self):
        """The source dataset names of a model with the FPSM dataset embedding (None: no dataset input)."""
        from cxrkeras.data.datasets import embedding_names

        return embedding_names(self.build_options.get("head_dataset_embedding"))


@dataclasses.dataclass
class Phase:
    """Epochs [begin, end) of one `model.fit`, with the backbone frozen or not, and its learning rates.

    lr: the phase's (maximum) learning rate, that of the last layer group (LKA + head); group_lrs: [early backbone,
    late backbone, LKA + head], None for lr everywhere; pct_start / div: its one-cycle shape (None: config, then
    fastai's defaults); restart: the phase is its own cycle from step 0 with fresh optimiser state (each
    fit_one_cycle of fine_tune), else it continues the stage's schedule."""

    begin: int
    end: int
    frozen: bool = False
    lr: float = None
    group_lrs: list = None
    pct_start: float = None
    div: float = None
    restart: bool = False


@dataclasses.dataclass
class Fitted:
    """What the fit left: the guard's verdict, the stateful callbacks and the time spent (prior runs included)."""

    guard: object
    best: object
    early: object
    seconds: float


def total_epochs(config):
    """Epochs of a whole stage: train.epochs (fit), freeze_backbone_epochs + epochs (fine_tune)."""
    t = config.train
    return t.freeze_backbone_epochs + t.epochs if t.recipe == "fine_tune" else t.epochs


class StageRun:
    def __init__(self, context, extra_callbacks=(), log=print):
        self.ctx = context
        self.config = context.config
        self.monitor = self.config.train.monitor
        self.extra_callbacks = list(extra_callbacks)
        self.log = log
        self.info_path = os.path.join(context.out_dir, rundir.RUN_INFO_FILE)
        self.history_path = os.path.join(context.out_dir, HISTORY_FILE)
        self.resume = cb.load_resume_state(os.path.join(context.stage_dir, RESUME_DIR)) \
            if context.state == "resume" else None
        self.start_epoch = int(self.resume["epoch"]) if self.resume else 0
        self.prior_seconds = float(self.resume.get("seconds", 0.0)) if self.resume else 0.0
        self.steps = self.config.train.steps_per_epoch or max(
            1, context.counts[self.config.data.train_split] // self.config.data.batch_size)
        self.base_lr = float(self.config.optim.lr)  # the LR finder's suggestion replaces it (optim.lr_find)
        if self.resume and self.resume.get("base_lr"):
            self.base_lr = float(self.resume["base_lr"])

    # --- the pieces a recipe may replace ---

    def total_epochs(self):
        return total_epochs(self.config)

    def all_phases(self):
        """[Phase] of the whole stage (see `Phase`), for train.recipe with the base learning rate `self.base_lr`."""
        from cxrkeras.training.schedules import FINE_TUNE_DEFAULTS, ONE_CYCLE_DEFAULTS, slice_lrs

        o, t, lr = self.config.optim, self.config.train, self.base_lr
        n = len(optim.GROUP_NAMES)
        if t.recipe == "fine_tune":
            freeze, half = t.freeze_backbone_epochs, lr / 2.0
            frozen = Phase(0, freeze, True, lr, slice_lrs(lr, n), FINE_TUNE_DEFAULTS["frozen_pct_start"],
                           ONE_CYCLE_DEFAULTS["div"], restart=True)
            unfrozen = Phase(freeze, freeze + t.epochs, False, half, slice_lrs(half, n, half / o.lr_mult),
                             FINE_TUNE_DEFAULTS["pct_start"] if o.pct_start is None else o.pct_start,
                             FINE_TUNE_DEFAULTS["div"] if o.div is None else o.div, restart=True)
            phases = [frozen, unfrozen]
        else:
            groups = slice_lrs(lr, n, o.lr_low) if o.lr_low is not None else None
            freeze = min(t.freeze_backbone_epochs, t.epochs)
            phases = [Phase(0, freeze, True, lr, groups), Phase(freeze, t.epochs, False, lr, groups)]
        return [p for p in phases if p.end > p.begin]

    def plan_phases(self):
        """The phases still to run: those ending after the epoch a resumed run stopped at."""
        return [p for p in self.all_phases() if p.end > self.start_epoch]

    def build_optimizer(self, phase, model=None):
        """The phase's optimiser: its learning rate and schedule (over the phase for a restarting phase, else over
        the stage), its layer-group rates and the variables weight decay spares."""
        o = self.config.optim
        epochs = phase.end - phase.begin if phase.restart else self.total_epochs()
        multipliers = optim.group_multipliers(model, phase.group_lrs, phase.lr) \
            if (model is not None and phase.group_lrs) else None
        no_decay = optim.norm_and_bias_paths(model) if (model is not None and o.optimizer == "adamw" and
                                                         not o.wd_bn_bias) else ()
        return optim.make_optimizer(o, epochs * self.steps, lr=phase.lr, lr_multipliers=multipliers,
                                    no_decay=no_decay, pct_start=phase.pct_start, div=phase.div)

    def build_loss(self):
        from cxrkeras.losses import make_loss

        return make_loss(self.config, self.ctx.stage)

    def build_model(self):
        """The stage's model inside the strategy's scope: model.weights for a new stage 1 (or --init none), no
        weights when a checkpoint follows (stage 2's start, a resume)."""
        from cxrkeras.models import build_model

        ctx, size = self.ctx, self.config.data.image_size
        weights = self.config.model.weights if (ctx.init_path is None and not self.resume) else None
        with self.strategy.scope():
            model = build_model(ctx.variant.name, num_classes=len(ctx.labels), weights=weights,
                                input_shape=(size, size, 3), label_names=ctx.labels, preprocessor=ctx.preprocessor,
                                patient_features=ctx.patient, **ctx.build_options)
            if getattr(model, "weights_report", None):
                self.log(model.weights_report)
            if ctx.init_path and not self.resume:
                try:
                    model.load_weights(ctx.init_path)
                except (ValueError, KeyError) as exc:
                    raise CxrError(f"cannot initialise stage 2 from {ctx.init_path}: its architecture differs from "
                                   f"this config's model ({exc}); use the same model settings as stage 1") from exc
        return model

    def build_callbacks(self, guard, loss, val_ds, t0):
        """(callbacks in order, {name: callback whose state a resume restores})."""
        import keras

        config, out_dir, monitor = self.config, self.ctx.out_dir, self.monitor
        auc = cb.ValidationAUC(val_ds, self.ctx.labels, guard, loss_fn=loss)
        best = cb.BestCheckpoint(os.path.join(out_dir, BEST_FILE), guard, monitor=monitor)
        early = cb.EarlyStop(config.train.early_stopping_patience, monitor=monitor)
        stateful = {"best": best, "early_stopping": early}
        callbacks = [cb.NanGuard(guard), auc]
        if config.optim.schedule == "plateau":
            plateau = cb.PlateauLR(config.optim.factor, config.optim.patience, config.optim.min_lr, monitor=monitor,
                                   log=self.log)
            stateful["plateau"] = plateau
            callbacks.append(plateau)
        callbacks += [best, early]
        tb_dir = os.path.join(out_dir, TENSORBOARD_DIR)
        if config.train.gradcam_every:
            from cxrkeras.explain.callback import GradCAMCallback

            callbacks.append(GradCAMCallback(val_ds, None, os.path.join(tb_dir, "gradcam"),
                                             every=config.train.gradcam_every, max_images=config.train.gradcam_images))
        if _tensorboard_available():
            callbacks.append(keras.callbacks.TensorBoard(tb_dir, write_graph=False, profile_batch=0))
        else:
            self.log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard); history.csv has all")
        callbacks.append(cb.HistoryCSV(self.history_path, guard))
        if config.train.verbose:
            callbacks.append(cb.EpochLog(self.total_epochs(), self.log))
        callbacks.append(cb.ResumeSnapshot(
            os.path.join(out_dir, RESUME_DIR), os.path.join(out_dir, LAST_FILE), guard, stateful,
            lambda epoch: {"seconds": self.prior_seconds + time.time() - t0, "base_lr": self.base_lr}))
        return callbacks + self.extra_callbacks, stateful

    # --- the run ---

    def run_info(self, mixed):
        """run_info.json of this stage as the run starts (a resumed run keeps what it had)."""
        from cxrkeras.hashing import sha256_file
        from cxrkeras.training.strategy import describe_devices

        ctx, config = self.ctx, self.config
        info = (RunInfo.read(ctx.out_dir) if self.resume else None) or RunInfo(created=utc_now())
        batch, replicas = config.data.batch_size, int(self.strategy.num_replicas_in_sync)
        pre = ctx.preprocessor
        info.created = info.created or utc_now()
        updates = dict(
            stage=ctx.stage, run=config.run.name, updated=utc_now(), records=os.path.abspath(config.data.records),
            manifest_sha256=ctx.manifest_sha,
            records_image_size=list(pre.stored_size) if pre.stored_size else None, records_channels=pre.channels,
            variant=ctx.variant.name, labels=ctx.labels, image_size=config.data.image_size,
            preprocessing=pre.preprocessing, equalize=pre.equalize, preprocessor=pre.to_config(),
            patient_features=ctx.patient.to_config() if ctx.patient else None,
            git_commit=rundir.git_commit(), versions=rundir.versions(), devices=describe_devices(self.strategy),
            mixed_precision=mixed, xla=config.train.xla, global_batch_size=batch,
            per_replica_batch_size=batch // replicas if batch % replicas == 0 else None,
            steps_per_epoch=self.steps, train_images=ctx.counts[config.data.train_split],
            val_images=ctx.counts[config.data.val_split], epochs_requested=config.train.epochs,
            epochs_total=self.total_epochs(), recipe=config.train.recipe, monitor=self.monitor, finished=False,
            init={"path": os.path.abspath(ctx.init_path), "sha256": sha256_file(ctx.init_path),
                  "stage1_best_epoch": ctx.init_info.best_epoch if ctx.init_info else None}
            if ctx.init_path else None)
        for key, value in updates.items():
            setattr(info, key, value)
        if self.resume:
            info.resumes.append({"at": utc_now(), "from_epoch": self.start_epoch})
        return info

    def record_dadam(self, info):
        """info.dadam: online DADAM's options, donors and the images it made per pass so far (None when off)."""
        if getattr(self, "dadam", None) is not None:
            info.dadam = self.dadam.record(self.dadam_before, self.start_epoch or None)

    def write_info(self, info):
        if self.ctx.chief:
            info.write(self.ctx.out_dir)

    def run(self):
        from cxrkeras.training.strategy import (check_keras_patch_targets, choose_strategy, is_multi_worker,
                                                resolve_mixed_precision)

        # The strategy first: MultiWorkerMirroredStrategy must exist before other TensorFlow work starts.
        self.strategy = choose_strategy(self.config.train.strategy)
        if is_multi_worker(self.strategy):
            check_keras_patch_targets()  # before any work: a Keras the fix was not checked on is refused now
        ctx, config = self.ctx, self.config
        if ctx.chief:
            cb.truncate_history(self.history_path, self.start_epoch)
        mixed = resolve_mixed_precision(config.train.mixed_precision)
        info = self.run_info(mixed)
        self.write_info(info)
        replicas = int(self.strategy.num_replicas_in_sync)
        self.log(f"stage {ctx.stage}: {ctx.variant.name}, {ctx.counts[config.data.train_split]} training / "
                 f"{ctx.counts[config.data.val_split]} validation images, {config.data.image_size}px, global batch "
                 f"{config.data.batch_size} over {replicas} replica(s) ({type(self.strategy).__name__}), "
                 f"{self.steps} steps/epoch, mixed precision {'on' if mixed else 'off'}"
                 f"{', XLA' if config.train.xla else ''} -> {ctx.stage_dir}")
        self.log(f"preprocessing: {ctx.preprocessor.describe()}")
        if self.resume:
            self.log(f"resuming stage {ctx.stage} after epoch {self.start_epoch} from {self.resume['weights']}")
        fitted = self.fit(info, mixed)
        return self.finish(info, fitted)

    def fit(self, info, mixed):
        """Build everything and run the phases; returns a `Fitted`."""
        import keras

        from cxrkeras.training.strategy import precision_policy

        ctx, config = self.ctx, self.config
        t0 = time.time()
        guard = cb.Guard()
        with precision_policy(mixed):
            keras.utils.set_random_seed(config.train.seed + self.start_epoch)
            data_seed = config.train.seed + 1000 * self.start_epoch  # a resumed run does not replay epoch 1's order
            from cxrkeras.data.dadam_online import from_config
            from cxrkeras.training.trainer import make_datasets

            self.dadam = from_config(config, self.log)  # online DADAM (data.dadam.boxes), None when off
            self.dadam_before = info.dadam if self.resume else None
            train_ds, val_ds = make_datasets(config, ctx.stage, self.strategy, data_seed, verify="size",
                                             preprocessor=ctx.preprocessor, patient=ctx.patient,
                                             datasets=ctx.datasets, dadam=self.dadam)  # hashed by train()
            self.record_dadam(info)
            self.write_info(info)
            model = self.build_model()
            if ctx.init_path and not self.resume:
                from cxrkeras.training.trainer import weights_fingerprint

                info.init["weights_fingerprint"] = weights_fingerprint(model)
                self.write_info(info)
                init = ctx.init_info
                self.log(f"stage 2: initialised from {ctx.init_path}"
                         + (f" (stage 1 best epoch {init.best_epoch}, mean val AUC {init.val_auc_mean:.4f})"
                            if init and init.best_epoch and init.val_auc_mean is not None else "")
                         + f", weights fingerprint {info.init['weights_fingerprint'][:16]}")
            loss = self.build_loss()
            if self.config.optim.lr_find and not self.resume:
                self.base_lr = self.find_lr(model, loss, train_ds, info)
            callbacks, stateful = self.build_callbacks(guard, loss, val_ds, t0)
            if self.resume:
                for name, callback in stateful.items():
                    callback.set_state(self.resume.get("callbacks", {}).get(name))
            stopped_before = (self.resume or {}).get("callbacks", {}).get("early_stopping", {}).get("stopped_epoch")
            phases = [] if stopped_before else self.plan_phases()
            carried = None
            for i, phase in enumerate(phases):
                carried = self.fit_phase(model, phase, i, loss, train_ds, callbacks, carried)
                if guard.stopped or model.stop_training:
                    break
        return Fitted(guard, stateful["best"], stateful["early_stopping"],
                      self.prior_seconds + time.time() - t0)

    def compile_phase(self, model, phase, loss):
        """Freeze or unfreeze for `phase` and compile the model with the phase's fresh optimiser."""
        config = self.config
        optim.set_backbone_trainable(model, not phase.frozen, train_bn=config.train.train_bn)
        with self.strategy.scope():
            model.compile(optimizer=self.build_optimizer(phase, model), loss=loss, jit_compile=bool(config.train.xla))
            model.optimizer.build(model.trainable_variables)

    def fit_phase(self, model, phase, index, loss, train_ds, callbacks, carried):
        """One `model.fit` over the phase's epochs; returns (optimiser iterations, learning rate) to carry on."""
        import warnings

        import keras

        from cxrkeras.data.pipeline import data_errors
        from cxrkeras.training.strategy import fit_scope

        config = self.config
        first = max(phase.begin, self.start_epoch)
        self.compile_phase(model, phase, loss)
        if index == 0 and self.resume:
            with warnings.catch_warnings():  # a snapshot of another phase has another optimiser: handled below
                warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
                model.load_weights(self.resume["weights"])
            if phase.restart and first == phase.begin:  # the previous phase's end: this cycle starts afresh
                self.compile_phase(model, phase, loss)
            else:  # the position in the schedule and the current rate, even if the optimiser state did not load
                model.optimizer.iterations.assign((first - (phase.begin if phase.restart else 0)) * self.steps)
                if self.resume.get("learning_rate") is not None and not _scheduled(model.optimizer):
                    model.optimizer.learning_rate.assign(self.resume["learning_rate"])
        elif carried is not None and not phase.restart:  # after unfreezing: keep the schedule and the current rate
            model.optimizer.iterations.assign(carried[0])
            if not _scheduled(model.optimizer):
                model.optimizer.learning_rate.assign(carried[1])
        groups = (", layer-group learning rates " + " / ".join(f"{lr:.3g}" for lr in phase.group_lrs)) \
            if phase.group_lrs else f", learning rate {phase.lr:.3g}"
        self.log(f"epochs {first + 1}-{phase.end}: backbone {'frozen' if phase.frozen else 'trainable'}"
                 f"{' (batch norm trainable)' if phase.frozen and config.train.train_bn else ''}, "
                 f"{optim.count_params(model.trainable_variables):,} trainable parameters{groups}")
        with data_errors(), fit_scope(model, self.strategy):
            model.fit(train_ds, epochs=phase.end, initial_epoch=first, steps_per_epoch=self.steps,
                      callbacks=callbacks, shuffle=False, verbose=1 if config.train.verbose == 1 else 0)
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations)), cb.current_lr(model.optimizer)

    def sweep(self, model, loss, train_ds, steps, start_lr=1e-7, end_lr=10.0):
        """The LR finder on the model as the stage's first phase trains it (frozen or not); weights restored."""
        from cxrkeras.training.lr_find import lr_sweep

        first = self.plan_phases()[0]
        optim.set_backbone_trainable(model, not first.frozen, train_bn=self.config.train.train_bn)
        return lr_sweep(model, train_ds, loss, self.config.optim, steps=steps, start_lr=start_lr, end_lr=end_lr,
                        strategy=self.strategy)

    def lr_find_only(self, steps, start_lr=1e-7, end_lr=10.0):
        """`cxrkeras lr-find`: build the stage's model, data and loss, sweep, write lr_find.png / .json into the
        output folder; the LRFinderResult, with `weights_restored` checked by fingerprint."""
        import keras

        from cxrkeras.training.lr_find import write_result
        from cxrkeras.training.strategy import choose_strategy, precision_policy, resolve_mixed_precision
        from cxrkeras.training.trainer import make_datasets, weights_fingerprint

        self.strategy = choose_strategy(self.config.train.strategy)
        mixed = resolve_mixed_precision(self.config.train.mixed_precision)
        with precision_policy(mixed):
            keras.utils.set_random_seed(self.config.train.seed)
            from cxrkeras.data.dadam_online import from_config

            train_ds, _ = make_datasets(self.config, self.ctx.stage, self.strategy, verify="size",
                                        preprocessor=self.ctx.preprocessor, patient=self.ctx.patient,
                                        datasets=self.ctx.datasets, dadam=from_config(self.config, self.log))
            model = self.build_model()
            before = weights_fingerprint(model)
            result = self.sweep(model, self.build_loss(), train_ds, steps, start_lr, end_lr)
            result.weights_restored = weights_fingerprint(model) == before
        result.files = write_result(result, self.ctx.out_dir,
                                    title=f"LR finder, stage {self.ctx.stage}: {self.ctx.variant.name}")
        return result

    def find_lr(self, model, loss, train_ds, info):
        """Run the LR finder (optim.lr_find) before the first epoch, write lr_find.png / lr_find.json into the
        stage folder, record the result in run_info.json; the suggestion, the stage's learning rate from then on."""
        from cxrkeras.training.lr_find import write_result

        o = self.config.optim
        result = self.sweep(model, loss, train_ds, o.lr_find_steps)
        lr = result.suggestions[o.lr_find]
        if lr is None:
            raise CxrError(f"the LR finder found no {o.lr_find} suggestion ({result.note}); set optim.lr and "
                           f"optim.lr_find: null")
        if self.ctx.chief:
            write_result(result, self.ctx.out_dir, title=f"stage {self.ctx.stage}: {self.ctx.variant.name}")
        info.lr_find = {"rule": o.lr_find, "lr": lr, **result.summary()}
        self.write_info(info)
        self.log(f"LR finder ({len(result.lrs)} steps): valley {_lr_text(result.suggestions['valley'])}, steep "
                 f"{_lr_text(result.suggestions['steep'])}; using the {o.lr_find} suggestion {lr:.3g} as the "
                 f"learning rate")
        return float(lr)

    def finish(self, info, fitted):
        """Record the outcome in run_info.json; raise for a NaN loss or a collapse, else the TrainResult."""
        from cxrkeras.training.summary import best_row
        from cxrkeras.training.trainer import summary_result

        ctx, guard = self.ctx, fitted.guard
        history = cb.read_history(self.history_path)
        self.record_dadam(info)
        if guard.stopped:
            kept = [f"{name} (epoch {e})" for name, e in ((BEST_FILE, fitted.best.best_epoch),
                                                         (LAST_FILE, len(history) or None)) if e]
            if guard.nan_at is not None:
                epoch, batch_index, value = guard.nan_at
                info.nan_at = {"epoch": epoch + 1, "batch": batch_index}
                what = f"the training loss became {value} at epoch {epoch + 1}, batch {batch_index}"
            else:
                epoch, reason = guard.collapsed
                info.collapsed_at = {"epoch": epoch + 1, "reason": reason}
                what = f"at epoch {epoch + 1} {reason}"
            info.seconds, info.updated = fitted.seconds, utc_now()
            self.write_info(info)
            raise CxrError(f"stage {ctx.stage}: {what}; training stopped. The last good checkpoints are kept in "
                           f"{ctx.stage_dir}: {', '.join(kept) or 'none (no good epoch)'}. Lower the learning rate "
                           f"(--lr) or turn mixed precision off, then retrain with --overwrite (or --name for a new "
                           f"run)")
        row = best_row(history, self.monitor)
        info.finished, info.updated, info.seconds = True, utc_now(), round(fitted.seconds, 2)
        info.epochs_run, info.stopped_early = len(history), fitted.early.stopped_epoch
        info.best_epoch = int(row["epoch"]) if row else None
        info.best_value = _float_or_none(row.get(self.monitor)) if row else None
        info.val_loss = _float_or_none(row.get("val_loss")) if row else None
        info.val_auc_mean = _float_or_none(row.get(cb.MONITOR)) if row else None
        info.val_auc = {label: float(row.get(f"val_auc_{label}") or "nan") for label in ctx.labels} if row else None
        info.resumed_from = self.start_epoch
        self.write_info(info)
        return summary_result(ctx.stage, ctx.stage_dir, ctx.labels, history, fitted.seconds, self.start_epoch,
                              fitted.early.stopped_epoch, ctx.positives, self.log, self.monitor)


def _scheduled(optimizer):
    """True when the learning rate is a schedule (cosine, one_cycle) rather than a variable one can assign."""
    import keras

    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer under mixed precision
    return isinstance(inner._learning_rate, keras.optimizers.schedules.LearningRateSchedule)


def _float_or_none(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value else None


def _lr_text(lr):
    return "none" if lr is None else f"{lr:.3g}"


def _tensorboard_available():
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
