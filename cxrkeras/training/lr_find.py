"""The learning-rate finder: fastai's `lr_find` on a Keras model, its "valley" and "steep" suggestions, the plot.

As fastai's LRFinder (fastai/callback/schedule.py): step i of `steps` trains one batch at
lr_i = start_lr * (end_lr / start_lr) ** (i / steps), the same rate for every layer group; the loss is smoothed as
fastai's Recorder does (exponential moving average, beta 0.98, debiased); the sweep stops early once the smoothed
loss exceeds 4x its minimum. The weights are restored afterwards. The suggestions are read from the smoothed losses
without the first steps // 10 points and the last 5, as `Learner.lr_find` does:
- valley: the longest valley (fastai's longest strictly decreasing run of losses), 1/3 + 1/6 of the way along it;
- steep: the point where the loss falls fastest per log-lr (the left end of the steepest segment).
"""

import dataclasses
import math
import os

import numpy as np

SMOOTH_BETA = 0.98
DIVERGENCE_FACTOR = 4.0
SKIP_END = 5


@dataclasses.dataclass
class LRFinderResult:
    lrs: list  # the learning rate of each step
    losses: list  # smoothed (debiased) training loss after each step
    raw_losses: list
    suggestions: dict  # {"valley": lr | None, "steep": lr | None}
    points: dict  # {"valley": (lr, loss), ...}: where the suggestions sit on the curve
    stopped: str  # why the sweep ended
    note: str = ""
    weights_restored: bool = None  # checked by `cxrkeras lr-find` (weights fingerprint before = after)
    files: tuple = None  # (png, json) once written

    def summary(self):
        return {"steps": len(self.lrs), "start_lr": self.lrs[0] if self.lrs else None,
                "end_lr": self.lrs[-1] if self.lrs else None, "stopped": self.stopped,
                "suggestions": dict(self.suggestions), "note": self.note or None}


def exp_lr(i, steps, start_lr, end_lr):
    """fastai's SchedExp at position i / steps."""
    return start_lr * (end_lr / start_lr) ** (i / steps)


def valley(lrs, losses):
    """fastai's `valley` rule: (lr, index). The longest run found by its O(n^2) longest-decreasing-subsequence loop
    (vectorised over j, with the same bookkeeping of where the run starts), then 1/3 + 1/6 of the way along."""
    losses = np.asarray(losses, dtype=np.float64)
    n = len(losses)
    if n == 0:
        return None, None
    lds = np.ones(n, dtype=np.int64)
    max_start = max_end = 0
    for i in range(1, n):
        candidate = np.where(losses[i] < losses[:i], lds[:i] + 1, 1)
        running = np.maximum.accumulate(np.maximum(candidate, 1))  # lds[i] after each j of fastai's inner loop
        lds[i] = running[-1]
        above = np.flatnonzero(running > lds[max_end])
        if above.size:  # fastai moves max_end to i at the first j where lds[i] passes lds[max_end]
            max_end = i
            max_start = i - int(running[above[0]])
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), idx


def steep(lrs, losses):
    """fastai's `steep` rule: (lr, index) of the most negative slope d loss / d log(lr)."""
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(lrs) < 2:
        return None, None
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    idx = int(np.argmin(grads))
    return float(lrs[idx]), idx


def suggest(lrs, losses, steps):
    """({rule: lr}, {rule: (lr, loss)}) from a sweep of `steps` steps, on the points fastai uses (the first
    steps // 10 and the last 5 left out, cut before the first NaN)."""
    lrs, losses = list(lrs)[steps // 10:-SKIP_END], list(losses)[steps // 10:-SKIP_END]
    finite = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if finite:
        lrs, losses = lrs[:finite[0]], losses[:finite[0]]
    suggestions, points = {}, {}
    for name, rule in (("valley", valley), ("steep", steep)):
        lr, idx = rule(lrs, losses) if len(lrs) >= 2 else (None, None)
        suggestions[name] = lr
        points[name] = (lr, losses[idx]) if lr is not None else None
    return suggestions, points


def sweep_config(optim):
    """The optimiser settings of the sweep: the stage's optimiser at a constant, directly set learning rate."""
    return dataclasses.replace(optim, schedule="constant", lr_low=None)


def lr_sweep(model, dataset, loss, optim, steps=100, start_lr=1e-7, end_lr=10.0, stop_div=True, strategy=None):
    """Run the finder on `model` (compiled here with `loss` and the stage's optimiser type) over the batches of
    `dataset` (repeated if shorter), then restore the weights it had; an `LRFinderResult`."""
    import tensorflow as tf

    from cxrkeras.training.optim import make_optimizer, norm_and_bias_paths

    if not 0 < start_lr < end_lr:
        raise ValueError(f"the LR finder needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    saved = model.get_weights()
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    no_decay = norm_and_bias_paths(model) if optim.optimizer == "adamw" and not optim.wd_bn_bias else ()
    with scope:
        model.compile(optimizer=make_optimizer(sweep_config(optim), steps, lr=start_lr, no_decay=no_decay), loss=loss)
    lrs, losses, raw = [], [], []
    avg, best, stopped = 0.0, math.inf, f"{steps} steps"
    try:
        for i, batch in enumerate(dataset.repeat().take(steps)):
            lr = exp_lr(i, steps, start_lr, end_lr)
            model.optimizer.learning_rate = lr
            value = float(np.asarray(model.train_on_batch(batch[0], batch[1])).reshape(-1)[0])
            avg = SMOOTH_BETA * avg + (1 - SMOOTH_BETA) * value
            smooth = avg / (1 - SMOOTH_BETA ** (i + 1))
            lrs.append(lr)
            losses.append(smooth)
            raw.append(value)
            if not math.isfinite(smooth):
                stopped = f"the loss became {value} at step {i + 1}"
                break
            best = min(best, smooth)
            if stop_div and smooth > DIVERGENCE_FACTOR * best:
                stopped = f"diverged at step {i + 1} (smoothed loss over {DIVERGENCE_FACTOR:g}x its minimum)"
                break
    finally:
        model.set_weights(saved)
    suggestions, points = suggest(lrs, losses, steps)
    note = "" if len(lrs) > steps // 10 + SKIP_END + 1 else (
        f"only {len(lrs)} steps before the sweep ended ({stopped}): too few for a suggestion; lower end_lr or give "
        f"more steps")
    return LRFinderResult(lrs, losses, raw, suggestions, points, stopped, note)


def plot(result, path, title=None):
    """Loss vs learning rate (log x), without the last 5 points as fastai plots it, with the suggestions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lrs, losses = result.lrs[:-SKIP_END] or result.lrs, result.losses[:-SKIP_END] or result.losses
    ax.plot(lrs, losses, color="C0", label="smoothed training loss")
    for (name, point), color in zip(result.points.items(), ("C1", "C3")):
        if point:
            ax.plot(*point, "o", color=color, label=f"{name}: {point[0]:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or "LR finder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(result, out_dir, title=None, name="lr_find"):
    """<out_dir>/lr_find.png and lr_find.json (every step's lr and loss, the suggestions); their paths."""
    from cxrkeras.fileio import write_json

    os.makedirs(out_dir, exist_ok=True)
    png = plot(result, os.path.join(out_dir, f"{name}.png"), title)
    doc = {**result.summary(), "lrs": result.lrs, "losses": result.losses, "raw_losses": result.raw_losses,
           "points": result.points}
    return png, write_json(os.path.join(out_dir, f"{name}.json"), doc)
