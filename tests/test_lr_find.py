"""The LR finder: fastai's exponential sweep and smoothing, its valley and steep rules against a transcription of
fastai's code and hand values, the weights restored, and `cxrkeras lr-find` on the bundled sample."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.training import lr_find


def fastai_valley(lrs, losses):
    """fastai/callback/schedule.py `valley`, as written there (pure Python loops)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def test_exponential_sweep_points():
    assert lr_find.exp_lr(0, 100, 1e-7, 10) == pytest.approx(1e-7)
    assert lr_find.exp_lr(50, 100, 1e-7, 10) == pytest.approx(1e-3)  # halfway on the log scale
    assert lr_find.exp_lr(25, 100, 1e-7, 10) == pytest.approx(1e-5)


def test_valley_and_steep_rules():
    rng = np.random.default_rng(0)
    for trial in range(20):  # noisy U-shaped curves of several lengths, as a sweep gives
        n = int(rng.integers(8, 120))
        lrs = np.logspace(-7, 1, n)
        losses = (np.log10(lrs) + 3) ** 2 / 10 + 1 + rng.normal(scale=0.05, size=n)
        assert lr_find.valley(lrs, losses)[0] == fastai_valley(lrs, list(losses)), trial
    # by hand: a clean descent over points 0..4 then a rise; fastai's bookkeeping starts the valley at -1,
    # so idx = -1 + int(5/3) + int(5/6) = 0
    assert lr_find.valley([1, 2, 3, 4, 5, 6, 7], [5, 4, 3, 2, 1, 2, 3]) == (1.0, 0)
    # steep: slopes per log-lr 0, -0.5/ln10, -0.05/ln10, +1.55/ln10 -> the segment starting at lr 10
    assert lr_find.steep([1, 10, 100, 1000, 1e4], [1, 1, 0.5, 0.45, 2]) == (10.0, 1)


def test_suggestions_skip_fastais_ends():
    lrs = list(np.logspace(-7, 1, 100))
    losses = [1.0] * 100
    losses[3] = 0.1  # inside the first steps // 10: ignored, as fastai ignores it
    losses[97] = -5.0  # inside the last 5: ignored
    losses[50:95] = [0.5] * 45  # the one drop: the segment from point 49 to 50
    suggestions, _ = lr_find.suggest(lrs, losses, 100)
    assert suggestions["steep"] == pytest.approx(lrs[49])


def test_sweep_restores_the_weights_and_stops_when_the_loss_diverges():
    from cxrkeras.config import load_config

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(2, activation="sigmoid")])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    y = (x[:, :2] > 0).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    before = [w.copy() for w in model.get_weights()]  # moving statistics of the batch norm included
    optim = load_config(sets=["optim.optimizer=adam"]).optim
    result = lr_find.lr_sweep(model, ds, keras.losses.BinaryCrossentropy(), optim, steps=60, start_lr=1e-5,
                              end_lr=1e4)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert result.lrs[:3] == pytest.approx([1e-5 * 1e9 ** (i / 60) for i in range(3)])
    assert len(result.lrs) < 60 and result.stopped.startswith("diverged")  # lr 1e4 blows the loss up
    raw, smooth = result.raw_losses, result.losses
    assert smooth[0] == pytest.approx(raw[0])  # debiased: the first smoothed value is the first loss
    assert smooth[1] == pytest.approx((0.98 * 0.02 * raw[0] + 0.02 * raw[1]) / (1 - 0.98 ** 2))
    assert result.suggestions["valley"] is not None and 1e-5 <= result.suggestions["valley"] <= 1e4


def test_lr_find_command_on_the_sample(tiny_records, tmp_path):
    out = tmp_path / "lr"
    res = CliRunner().invoke(cli, [
        "lr-find", "--stage", "1", "--records", tiny_records, "--out", str(out), "--steps", "30",
        "--set", "model.weights=null", "--set", "data.image_size=32", "--set", "data.batch_size=4",
        "--set", "model.overrides={blocks: [1, 1, 1, 1], width_multiplier: 0.125}",
        "--set", "train.recipe=fine_tune", "--set", "optim.schedule=one_cycle",
        "--set", "train.freeze_backbone_epochs=1", "--set", "data.shuffle_buffer=64"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "weights restored: yes" in res.output and "valley:" in res.output and "steep:" in res.output
    doc = json.load(open(out / "lr_find.json"))
    assert doc["steps"] == len(doc["lrs"]) <= 30 and doc["lrs"][0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(doc["lrs"], doc["lrs"][1:]))
    assert os.path.getsize(out / "lr_find.png") > 5000
    assert math.isfinite(doc["losses"][0])
