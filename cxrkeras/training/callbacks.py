"""Training callbacks whose state survives a resume: exact validation AUC, best/last checkpoints, early stopping,
reduce-on-plateau, NaN and collapse guards, history CSV and the resume snapshot.

Keras's own EarlyStopping/ReduceLROnPlateau/ModelCheckpoint reset their counters in `on_train_begin`, which would
forget them when training resumes or when the backbone is unfrozen (a second `fit`); these keep their state in
`get_state()/set_state()`, saved with the weights after every finished epoch.
"""

import csv
import glob
import math
import os
import time

import keras
import numpy as np

from cxrkeras.evaluation.metrics import per_label_auc

MONITOR = "val_auc_mean"  # the default monitored value; every callback here takes `monitor`


def lower_is_better(monitor):
    """A loss is minimised (val_loss), anything else maximised (val_auc_mean)."""
    return str(monitor).endswith("loss")


def improves(value, best, monitor):
    """True when `value` is strictly better than `best` for `monitor`."""
    return value < best if lower_is_better(monitor) else value > best


def worst(monitor):
    return math.inf if lower_is_better(monitor) else -math.inf


def _finite(value):
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def current_lr(optimizer):
    """The learning rate in use now (evaluates a schedule at the current iteration)."""
    lr = optimizer.learning_rate
    if callable(lr) and not hasattr(lr, "numpy"):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


class Guard:
    """Shared flag: set when the loss went NaN/inf or the model collapsed, so the savers keep the last good files
    untouched."""

    def __init__(self):
        self.nan_at = None  # (epoch, batch, loss)
        self.collapsed = None  # (epoch, reason)

    @property
    def stopped(self):
        return self.nan_at is not None or self.collapsed is not None


# A model whose loss is this many times that of predicting 0.5 for everything is diverging, not learning.
EXPLODED_LOSS_FACTOR = 10.0


def collapse_reason(y_true, y_score, losses, reference_loss):
    """Why the model has collapsed, or None: validation predictions that are not finite; exactly the same float32
    value for every validation image, for every label (saturated outputs or dead features: each AUC is exactly
    0.5; a weak model whose outputs still differ, if only in the last bit, is not stopped); or a training/validation
    loss above EXPLODED_LOSS_FACTOR x `reference_loss` (the loss of predicting 0.5). `losses`: {name: value|None}."""
    if not np.all(np.isfinite(y_score)):
        return "the validation predictions are not finite (NaN or inf)"
    scores = np.asarray(y_score, dtype=np.float32)
    if len(scores) > 1 and np.all(scores == scores[:1]):
        return ("the model gives every validation image exactly the same predictions (every AUC is 0.5): "
                "it has collapsed")
    for name, value in losses.items():
        if value is not None and math.isfinite(reference_loss) and reference_loss > 0 and \
                value > EXPLODED_LOSS_FACTOR * reference_loss:
            return (f"the {name} exploded to {value:.4g}, over {EXPLODED_LOSS_FACTOR:g} x the {reference_loss:.3g} "
                    f"of predicting 0.5 for everything")
    return None


class NanGuard(keras.callbacks.Callback):
    """Stop at the first non-finite training loss (TerminateOnNaN that also tells the other callbacks)."""

    def __init__(self, guard):
        super().__init__()
        self.guard = guard
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.guard.nan_at = (self._epoch, batch, float(loss))
            self.model.stop_training = True


class ValidationAUC(keras.callbacks.Callback):
    """After each epoch: predictions over the WHOLE validation split, exact per-label AUC (scikit-learn), their
    mean and the validation loss, added to the epoch logs (history CSV, TensorBoard, checkpoint monitor).
    A collapsed model (see `collapse_reason`) stops training, like a NaN loss: the guard keeps the savers off."""

    def __init__(self, dataset, labels, guard, loss_fn=None):
        super().__init__()
        self.dataset = dataset
        self.labels = list(labels)
        self.guard = guard
        self.loss_fn = loss_fn
        self.last = None  # (per-label dict, mean)

    @staticmethod
    def key(label):
        return f"val_auc_{label}"

    def predict(self):
        """(labels, probabilities) over the whole validation split (cxrkeras.inference's one loop)."""
        from cxrkeras.inference import predict_dataset

        probs, labels, _ = predict_dataset(self.model, self.dataset)
        return labels, probs

    def _loss(self, y, p):
        return float(keras.ops.convert_to_numpy(self.loss_fn(y.astype("float32"), p.astype("float32"))))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.guard.stopped:
            return
        y, p = self.predict()
        logs["learning_rate"] = current_lr(self.model.optimizer)
        finite = bool(np.all(np.isfinite(p)))
        if finite:
            per_label, mean = per_label_auc(y, p, self.labels)
            self.last = (per_label, mean)
            if self.loss_fn is not None:
                logs["val_loss"] = self._loss(y, p)
            logs[MONITOR] = mean
            for label, value in per_label.items():
                logs[self.key(label)] = value
        else:
            logs[MONITOR] = float("nan")
        reference = self._loss(y, np.full(p.shape, 0.5)) if self.loss_fn is not None else float("nan")
        reason = collapse_reason(y, p, {"training loss": logs.get("loss"), "validation loss": logs.get("val_loss")},
                                 reference)
        if reason is not None:
            self.guard.collapsed = (epoch, reason)
            self.model.stop_training = True


class _Stateful(keras.callbacks.Callback):
    STATE = ()

    def get_state(self):
        return {k: getattr(self, k) for k in self.STATE}

    def set_state(self, state):
        for k in self.STATE:
            if k in (state or {}):
                setattr(self, k, state[k])
        if getattr(self, "best", 0) is None:  # +-inf is written to JSON as null
            self.best = worst(self.monitor)


class BestCheckpoint(_Stateful):
    """Save the whole model to `path` whenever the monitored value improves (a loss falls, an AUC rises)."""

    STATE = ("best", "best_epoch")

    def __init__(self, path, guard, monitor=MONITOR, enabled=True):
        super().__init__()
        self.path, self.guard, self.monitor, self.enabled = path, guard, monitor, enabled
        self.best, self.best_epoch = worst(monitor), None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if self.guard.stopped or not _finite(value) or not improves(value, self.best, self.monitor):
            return
        self.best, self.best_epoch = float(value), epoch + 1
        if self.enabled:
            save_model(self.model, self.path)


class _Patience(_Stateful):
    """Counts the epochs since the monitored value last improved; the count survives a resume."""

    STATE = ("best", "wait")

    def __init__(self, patience, monitor=MONITOR):
        super().__init__()
        self.patience, self.monitor = patience, monitor
        self.best, self.wait = worst(monitor), 0

    def _stalled(self, logs):
        """True when this epoch brought no improvement (the wait grows); a non-finite value is not counted."""
        value = (logs or {}).get(self.monitor)
        if not _finite(value):
            return False
        if improves(value, self.best, self.monitor):
            self.best, self.wait = float(value), 0
            return False
        self.wait += 1
        return True


class EarlyStop(_Patience):
    """Stop when the monitored value has not improved for `patience` epochs (0: never stop early)."""

    STATE = _Patience.STATE + ("stopped_epoch",)

    def __init__(self, patience, monitor=MONITOR):
        super().__init__(patience, monitor)
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        if self._stalled(logs) and self.patience and self.wait >= self.patience:
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True


class PlateauLR(_Patience):
    """Multiply the learning rate by `factor` after `patience` epochs without a better monitored value."""

    def __init__(self, factor, patience, min_lr, monitor=MONITOR, log=print):
        super().__init__(patience, monitor)
        self.factor, self.min_lr, self.log = factor, min_lr, log

    def on_epoch_end(self, epoch, logs=None):
        if not (self._stalled(logs) and self.wait >= self.patience):
            return
        lr = current_lr(self.model.optimizer)
        new = max(lr * self.factor, self.min_lr)
        if new < lr:
            self.model.optimizer.learning_rate.assign(new)
            self.log(f"epoch {epoch + 1}: {self.monitor} has not improved for {self.wait} epochs; "
                  f"learning rate {lr:.3g} -> {new:.3g}")
        self.wait = 0


class _EpochTimer(keras.callbacks.Callback):
    """Times each epoch: `epoch_seconds()` in on_epoch_end is the wall time since the epoch began."""

    _t0 = None

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def epoch_seconds(self):
        return time.time() - (self._t0 or time.time())


class HistoryCSV(_EpochTimer):
    """Append one row per finished epoch to history.csv (columns fixed by the first row)."""

    def __init__(self, path, guard):
        super().__init__()
        self.path, self.guard = path, guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stopped:
            return
        row = {"epoch": epoch + 1, "seconds": round(self.epoch_seconds(), 2)}
        row.update({k: v for k, v in (logs or {}).items()})
        exists = os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        if exists:
            with open(self.path, newline="", encoding="utf-8") as f:
                columns = next(csv.reader(f))
        else:
            columns = ["epoch", "seconds", "loss", "val_loss", "learning_rate", MONITOR]
            columns += sorted(k for k in row if k not in columns)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            if not exists:
                writer.writeheader()
            writer.writerow(row)


class EpochLog(_EpochTimer):
    """One short line per epoch (the per-label AUCs go to history.csv and TensorBoard, not the console)."""

    def __init__(self, epochs, log=print):
        super().__init__()
        self.epochs, self.log = epochs, log

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"epoch {epoch + 1}/{self.epochs}", f"{self.epoch_seconds():.1f}s"]
        for key in ("loss", "val_loss", MONITOR, "learning_rate"):
            if key in logs:
                parts.append(f"{key} {logs[key]:.4g}")
        self.log(" - ".join(parts))


def read_history(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truncate_history(path, epochs):
    """Keep the header and the rows of the first `epochs` epochs (a kill between CSV and snapshot wrote more)."""
    rows = read_history(path)
    if not rows:
        return
    with open(path, newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f))
    keep = [r for r in rows if int(r["epoch"]) <= epochs]
    from cxrkeras.fileio import replacing

    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(keep)


def save_model(model, path):
    """model.save via a temporary file, so a kill mid-save keeps the previous file whole."""
    from cxrkeras.fileio import replacing

    with replacing(path, suffix=".keras") as tmp:  # Keras wants the extension
        model.save(tmp)


class ResumeSnapshot(keras.callbacks.Callback):
    """Last in the list: after each good epoch write last.keras and resume/epoch_NNNN.weights.h5 (weights and
    optimiser state, learning rate and iteration count included), then resume/state.json pointing at it."""

    def __init__(self, resume_dir, last_path, guard, stateful, extra_state, enabled=True):
        super().__init__()
        self.resume_dir, self.last_path, self.guard = resume_dir, last_path, guard
        self.stateful = stateful  # {name: _Stateful}
        self.extra_state = extra_state  # callable(epoch) -> dict
        self.enabled = enabled

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stopped or not self.enabled:
            return
        from cxrkeras.fileio import write_json

        save_model(self.model, self.last_path)
        os.makedirs(self.resume_dir, exist_ok=True)
        weights = os.path.join(self.resume_dir, f"epoch_{epoch + 1:04d}.weights.h5")
        self.model.save_weights(weights)
        state = {"epoch": epoch + 1, "weights": os.path.basename(weights),
                 "learning_rate": current_lr(self.model.optimizer),
                 "callbacks": {name: cb.get_state() for name, cb in self.stateful.items()}}
        state.update(self.extra_state(epoch))
        write_json(os.path.join(self.resume_dir, "state.json"), state)
        for old in glob.glob(os.path.join(self.resume_dir, "epoch_*.weights.h5")):
            if os.path.basename(old) != state["weights"]:
                os.remove(old)


def load_resume_state(resume_dir):
    """The snapshot written by ResumeSnapshot, or None (with the weights path made absolute)."""
    from cxrkeras.errors import CxrError
    from cxrkeras.fileio import read_json

    path = os.path.join(resume_dir, "state.json")
    try:
        state = read_json(path, missing_ok=True)
    except (OSError, ValueError) as exc:
        raise CxrError(f"{path}: the resume snapshot cannot be read ({exc}); pass --overwrite to train the stage "
                       f"again") from exc
    if state is None:
        return None
    state["weights"] = os.path.join(resume_dir, state["weights"])
    if not os.path.isfile(state["weights"]):
        return None
    return state
