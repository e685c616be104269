"""fastai's one-cycle policy as Keras schedules: cosine warm-up then cosine annealing, for the learning rate and
for Adam's beta_1 (fastai's "moms"), and fastai's `slice(lo, hi)` spread of learning rates over layer groups.

Read against fastai's `fit_one_cycle` (fastai/callback/schedule.py): for a training position pos = step / total in
[0, 1), `combined_cos(pct_start, start, middle, end)` goes from `start` to `middle` over the first `pct_start` of the
steps and from `middle` to `end` over the rest, each part along `sched_cos(a, b, p) = a + (1 + cos(pi (1 - p))) (b
- a) / 2`. The learning rate uses (lr / div, lr, lr / div_final), beta_1 uses moms (0.95, 0.85, 0.95).
"""

import math

import keras

ONE_CYCLE_DEFAULTS = {"pct_start": 0.25, "div": 25.0, "div_final": 1e5, "moms": (0.95, 0.85, 0.95)}
FINE_TUNE_DEFAULTS = {"pct_start": 0.3, "div": 5.0, "frozen_pct_start": 0.99, "lr_mult": 100.0}


def sched_cos(start, end, pos):
    """fastai's `sched_cos`: cosine from `start` (pos 0) to `end` (pos 1)."""
    return start + (1.0 + math.cos(math.pi * (1.0 - pos))) * (end - start) / 2.0


def combined_cos_value(pos, pct_start, start, middle, end):
    """The value of fastai's `combined_cos(pct_start, start, middle, end)` at training position `pos` (a float, for
    tests and plots; the Keras schedule below computes the same in the graph)."""
    pos = min(max(float(pos), 0.0), 1.0)
    if pct_start > 0 and pos < pct_start:
        return sched_cos(start, middle, pos / pct_start)
    return sched_cos(middle, end, (pos - pct_start) / (1.0 - pct_start) if pct_start < 1 else 1.0)


def even_mults(start, stop, n):
    """fastai's `even_mults`: `n` values from `start` to `stop`, evenly spaced on a log scale (slice(lo, hi))."""
    if n == 1:
        return [float(stop)]
    step = (stop / start) ** (1.0 / (n - 1))
    return [float(start * step ** i) for i in range(n)]


def slice_lrs(stop, n, start=None):
    """fastai's `set_hyper('lr', slice(start, stop))` over `n` layer groups: `even_mults(start, stop, n)`, or
    without a start [stop / 10] * (n - 1) + [stop] (what `fit_one_cycle(…, slice(lr))` gives the frozen groups)."""
    if start:
        return even_mults(start, stop, n)
    return [stop / 10.0] * (n - 1) + [float(stop)]


@keras.saving.register_keras_serializable(package="cxrkeras")
class CombinedCosine(keras.optimizers.schedules.LearningRateSchedule):
    """fastai's `combined_cos(pct_start, start, middle, end)` over `total_steps` optimiser steps counted from
    `first_step` (the step at which this cycle starts); steps past the end hold `end`."""

    def __init__(self, start, middle, end, total_steps, pct_start=0.25, first_step=0, name="combined_cosine"):
        self.start, self.middle, self.end = float(start), float(middle), float(end)
        self.total_steps, self.pct_start, self.first_step = int(total_steps), float(pct_start), int(first_step)
        self.name = name

    def __call__(self, step):
        ops = keras.ops
        # float64 inside: lr / div_final is ~1e-8 of lr, which float32 would lose to cancellation
        pos = (ops.cast(step, "float64") - float(self.first_step)) / float(max(1, self.total_steps))
        pos = ops.clip(pos, 0.0, 1.0)
        pct = self.pct_start

        def cos_between(a, b, p):
            w = (1.0 + ops.cos(math.pi * (1.0 - p))) / 2.0  # sched_cos as a weight: exactly a at 0, b at 1
            return a * (1.0 - w) + b * w

        warm = cos_between(self.start, self.middle, ops.clip(pos / pct, 0.0, 1.0)) if pct > 0 else None
        anneal = cos_between(self.middle, self.end, ops.clip((pos - pct) / (1.0 - pct), 0.0, 1.0)) if pct < 1 else None
        if warm is None:
            value = anneal
        elif anneal is None:
            value = warm
        else:
            value = ops.where(pos < pct, warm, anneal)
        return ops.cast(value, "float32")

    def get_config(self):
        return {"start": self.start, "middle": self.middle, "end": self.end, "total_steps": self.total_steps,
                "pct_start": self.pct_start, "first_step": self.first_step, "name": self.name}


def one_cycle_lr(lr_max, total_steps, pct_start=0.25, div=25.0, div_final=1e5, first_step=0):
    """The learning rate of `fit_one_cycle(lr_max, div, div_final, pct_start)`: lr_max/div -> lr_max -> lr_max/div_final."""
    return CombinedCosine(lr_max / div, lr_max, lr_max / div_final, total_steps, pct_start, first_step,
                          name="one_cycle_lr")


def one_cycle_beta_1(moms, total_steps, pct_start=0.25, first_step=0):
    """Adam's beta_1 of `fit_one_cycle(moms=...)`: moms[0] -> moms[1] -> moms[2] (fastai: 0.95 -> 0.85 -> 0.95)."""
    return CombinedCosine(moms[0], moms[1], moms[2], total_steps, pct_start, first_step, name="one_cycle_beta_1")
