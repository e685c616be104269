"""`reproduce --dry-run`: the plan (every run's steps, epochs, steps per epoch and state) and its device time,
from a training step and an inference step measured here for each distinct model and batch (random inputs, the
run's precision policy), and from the epochs the run folders already hold.

The estimate is an upper bound: early stopping usually ends a stage before its last epoch.
"""

import dataclasses
import math
import os
import time

from cxrkeras.data.manifest import load_manifest, stage_images


@dataclasses.dataclass
class StepTimes:
    train: float  # seconds per training step
    infer: float  # seconds per inference batch
    setup: float  # building the model, compiling it and tracing the first training step
    setup_infer: float  # tracing the first inference batch


def measure_step(config, steps=3):
    """StepTimes of `config`'s model at its batch size and input size on this machine's first device: building,
    compiling and the first (tracing) step timed apart, then the mean of `steps` steps."""
    import keras
    import numpy as np

    from cxrkeras.losses import make_loss
    from cxrkeras.models import build_model
    from cxrkeras.training.optim import make_optimizer
    from cxrkeras.training.strategy import precision_policy, resolve_mixed_precision
    from cxrkeras.training.trainer import model_options

    size, batch = config.data.image_size, config.data.batch_size
    keras.backend.clear_session()
    t_setup = time.perf_counter()
    with precision_policy(resolve_mixed_precision(config.train.mixed_precision)):
        options = model_options(config)
        model = build_model(config.model.variant, num_classes=14, weights=None, input_shape=(size, size, 3),
                            **options)
        model.compile(optimizer=make_optimizer(config.optim, 1), loss=make_loss(config, 2),
                      jit_compile=bool(config.train.xla))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(batch, size, size, 3)).astype("float32")
        y = (rng.random((batch, 14)) < 0.2).astype("float32")
        model.train_on_batch(x, y)
        setup = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        train_s = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        model.predict_on_batch(x)
        setup_infer = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            model.predict_on_batch(x)
        infer_s = (time.perf_counter() - t0) / steps
    keras.backend.clear_session()
    return StepTimes(train_s, infer_s, setup, setup_infer)


def _key(config):
    return (config.model.variant, config.data.image_size, config.data.batch_size, config.train.mixed_precision,
            repr(sorted(config.model.overrides.items())), config.train.xla)


def device_name():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"{len(gpus)} GPU(s), {details.get('device_name', 'GPU')}", True
        except Exception:  # details are optional
            return f"{len(gpus)} GPU(s)", True
    return "CPU (no GPU visible)", False


def step_counts(config, stage, manifest):
    """(epochs, training steps per epoch, validation batches, LR-finder steps) of one training step."""
    from cxrkeras.training.stage import total_epochs

    d = config.data
    train_images = stage_images(manifest["splits"][d.train_split], stage)
    val_images = stage_images(manifest["splits"][d.val_split], stage)
    per_epoch = config.train.steps_per_epoch or max(1, train_images // d.batch_size)
    return (total_epochs(config), per_epoch, math.ceil(val_images / d.batch_size),
            config.optim.lr_find_steps if config.optim.lr_find else 0)


def epochs_done(config, stage):
    """Epochs a stage folder already holds (its history.csv)."""
    from cxrkeras.training.callbacks import read_history
    from cxrkeras.training.rundir import stage_path

    return len(read_history(os.path.join(stage_path(config, stage), "history.csv")))


def plan_text(plan, records, measure_steps=3, log=print):
    """(text, summary) of the dry run: a table of runs and steps with states and hours."""
    from cxrkeras.reproduce.queue import run_state

    manifest = load_manifest(records)
    eval_images = sum(int(manifest["splits"][s]["images"]) for s in ("val", "test") if s in manifest["splits"])
    device, is_gpu = device_name()
    timings = {}
    if measure_steps:
        for planned in plan:
            for step, config in planned.steps:
                if config is not None and _key(config) not in timings:
                    log(f"measuring a training step of {config.model.variant} ({config.data.image_size} px, batch "
                        f"{config.data.batch_size}) on {device} ...")
                    timings[_key(config)] = measure_step(config, measure_steps)
    lines = [f"plan: {len(plan)} run(s), records {records} ({manifest['splits']['test']['images']} test images)",
             "", "| run | state | step | epochs (done) | steps/epoch | estimate (h) |", "|---|---|---|---|---|---|"]
    total = remaining = 0.0
    for planned in plan:
        state, states, _ = run_state(planned)
        first = True
        step_states = states if state != "conflict" else [None] * len(planned.steps)
        model_times = timings.get(_key(planned.steps[0][1]))
        for (step, config), step_state in zip(planned.steps, step_states):
            if config is not None:
                epochs, per_epoch, val_batches, finder = step_counts(config, step.stage, manifest)
                done = epochs_done(config, step.stage)
                t = timings.get(_key(config))
                hours = hours_left = None
                if t is not None:
                    epoch_s = per_epoch * t.train + val_batches * t.infer
                    # each phase builds and traces its model (2 with a frozen phase), validation traces once
                    setup = t.setup * (1 + (config.train.freeze_backbone_epochs > 0)) + t.setup_infer + \
                        (t.setup + finder * t.train if finder else 0.0)
                    hours = (epochs * epoch_s + setup) / 3600
                    hours_left = 0.0 if step_state == "finished" else \
                        (max(0, epochs - done) * epoch_s + setup) / 3600
                cells = [f"{step.name}", f"{epochs} ({done})", str(per_epoch), _h(hours, hours_left)]
            else:
                batch = planned.steps[0][1].data.batch_size
                hours = (eval_images / batch * model_times.infer + model_times.setup + 2 * model_times.setup_infer) \
                    / 3600 if model_times is not None else None
                hours_left = 0.0 if step_state == "finished" else hours
                cells = [step.name, "", f"{math.ceil(eval_images / batch)} batches", _h(hours, hours_left)]
            total += hours or 0.0
            remaining += hours_left or 0.0
            lines.append(f"| {planned.spec.run if first else ''} | {(state if first else '')} | " + " | ".join(cells)
                         + " |")
            first = False
        if state == "conflict":
            lines.append(f"| | | {states[0]} | | | |")
    unit = "GPU-hours" if is_gpu else "hours on this CPU (run the dry run on the training machine for GPU-hours)"
    lines += ["", f"measured on {device}: " + ("; ".join(
        f"{k[0]} {k[1]} px batch {k[2]}: {v.train:.3f} s/training step, {v.infer:.3f} s/inference batch, "
        f"{v.setup:.1f} s to build and trace" for k, v in timings.items()) or "no measurement (--measure-steps 0)"),
        f"estimate: at most {total:.3g} {unit} of compute for the whole plan, {remaining:.3g} still to run (early stopping "
        f"usually ends stages sooner; one run at a time on this device)."]
    return "\n".join(lines), {"runs": len(plan), "hours": total, "hours_left": remaining, "gpu": is_gpu,
                              "timings": {" ".join(map(str, k[:3])): dataclasses.asdict(v) for k, v in timings.items()}}


def _h(hours, left):
    if hours is None:
        return "–"
    return f"{hours:.3g}" + (f" ({left:.3g} left)" if left is not None and abs(left - hours) > 1e-9 else "")
