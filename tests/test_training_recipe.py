"""The paper's fastai recipe in Keras: one-cycle schedule and momentum against fastai's formula, layer-group Adam
against plain Keras Adam / AdamW per group and a NumPy transcription of fastai's Adam, fine_tune's phases, BN kept
training while frozen, the monitor's direction, the focal loss and its zero-weight trap, augmentation on/off."""

import glob
import math
import os

import keras
import numpy as np
import pytest

from cxrkeras.config import load_config
from cxrkeras.errors import ConfigError

THIN = {"blocks": [1, 1, 1, 1], "width_multiplier": 0.125}


def thin_densenet(num_classes=3):
    from cxrkeras.models import build_model

    return build_model("densenet121-lka-last2", num_classes=num_classes, weights=None, input_shape=(32, 32, 3), **THIN)


# --- one cycle ---

def test_one_cycle_lr_and_beta_1_follow_fastais_formula_on_known_points():
    """fit_one_cycle(lr_max=1e-3) over 200 steps: pct_start 0.25, div 25, div_final 1e5, moms (.95, .85, .95).
    sched_cos(a, b, p) = a + (1 + cos(pi (1 - p))) (b - a) / 2: p = 0 gives a, p = 1/2 the midpoint, p = 1 b."""
    from cxrkeras.training.optim import make_optimizer

    cfg = load_config(sets=["optim.schedule=one_cycle", "optim.lr=1e-3", "optim.optimizer=adam"])
    opt = make_optimizer(cfg.optim, 200)
    lr, beta_1 = opt._learning_rate, opt.beta_1
    expected = {  # step: (lr, beta_1), by hand
        0: (1e-3 / 25, 0.95),
        25: ((4e-5 + 1e-3) / 2, 0.90),  # halfway through the 50 warm-up steps
        50: (1e-3, 0.85),  # the peak
        125: ((1e-3 + 1e-8) / 2, 0.90),  # halfway through the 150 annealing steps
        200: (1e-8, 0.95),
    }
    for step, (want_lr, want_beta) in expected.items():
        assert float(lr(step)) == pytest.approx(want_lr, rel=1e-5), step
        assert float(beta_1(step)) == pytest.approx(want_beta, rel=1e-6), step
    # a quarter into the warm-up: (1 + cos(3 pi / 4)) / 2 of the way
    frac = (1 + math.cos(0.75 * math.pi)) / 2
    assert float(lr(12.5)) == pytest.approx(4e-5 + frac * (1e-3 - 4e-5), rel=1e-5)


def test_slice_spreads_learning_rates_geometrically_as_fastai():
    from cxrkeras.training.schedules import slice_lrs

    assert slice_lrs(8e-5, 3, 2e-5) == pytest.approx([2e-5, 4e-5, 8e-5])  # fastai's even_mults
    assert slice_lrs(1e-3, 3, 1e-5) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert slice_lrs(2e-3, 3) == pytest.approx([2e-4, 2e-4, 2e-3])  # slice(lr): lr/10 for the earlier groups


# --- layer-group Adam ---

def _variables(rng, shapes):
    return [keras.Variable(rng.normal(size=s).astype("float32"), name=f"v{i}") for i, s in enumerate(shapes)]


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_group_adam_step_equals_plain_keras_adam_per_group(kind):
    """Three groups with their own learning rates: two steps of GroupAdam equal, variable by variable, Keras'
    Adam (AdamW) run separately on each group at that group's learning rate."""
    from cxrkeras.training.adam import GroupAdam

    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2, 3), (3,), (5, 2), (2,)]
    group_of = [0, 0, 1, 1, 2, 2]
    lrs = [1e-4, 1e-3, 1e-2]
    base = lrs[2]
    ours = _variables(rng, shapes)
    init = [v.numpy().copy() for v in ours]
    grads = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(2)]
    wd = 0.05 if kind == "adamw" else None
    spared = ["v3"]  # e.g. a bias: no weight decay
    opt = GroupAdam(base, beta_1=0.9, beta_2=0.99, epsilon=1e-5, weight_decay=wd,
                    lr_multipliers={f"v{i}": lrs[g] / base for i, g in enumerate(group_of)},
                    no_decay=spared if wd else ())
    for step in grads:
        opt.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in step], ours))
    for g in range(3):
        idx = [i for i in range(len(shapes)) if group_of[i] == g]
        ref = [keras.Variable(init[i], name=f"r{i}") for i in idx]
        if kind == "adam":
            plain = keras.optimizers.Adam(lrs[g], beta_1=0.9, beta_2=0.99, epsilon=1e-5)
        else:
            plain = keras.optimizers.AdamW(lrs[g], weight_decay=wd, beta_1=0.9, beta_2=0.99, epsilon=1e-5)
            plain.exclude_from_weight_decay(var_list=[r for r, i in zip(ref, idx) if f"v{i}" in spared])
        for step in grads:
            plain.apply_gradients(zip([keras.ops.convert_to_tensor(step[i]) for i in idx], ref))
        for r, i in zip(ref, idx):
            np.testing.assert_allclose(ours[i].numpy(), r.numpy(), rtol=1e-6, atol=1e-8, err_msg=f"v{i}")


def test_group_adam_fastai_style_equals_a_numpy_transcription_of_fastai_adam():
    """fastai's Adam (optimizer.py: weight_decay, average_grad with dampening, average_sqr_grad, step_stat,
    adam_step) written out in NumPy, with beta_1 changing every step as the one-cycle momentum does."""
    from cxrkeras.training.adam import GroupAdam

    rng = np.random.default_rng(1)
    shapes = [(4, 3), (3,)]
    ours = _variables(rng, shapes)
    p = [v.numpy().astype(np.float64) for v in ours]
    moms = [0.95, 0.9, 0.85]
    beta_1 = keras.optimizers.schedules.PiecewiseConstantDecay([0.5, 1.5], moms)  # step 0, 1, 2
    lr, sqr_mom, eps, wd = 3e-3, 0.99, 1e-5, 0.01
    mult = {"v0": 0.1, "v1": 1.0}
    opt = GroupAdam(lr, beta_1=beta_1, beta_2=sqr_mom, epsilon=eps, eps_style="fastai", weight_decay=wd,
                    lr_multipliers=mult, no_decay=["v1"])
    grad_avg = [np.zeros(s) for s in shapes]
    sqr_avg = [np.zeros(s) for s in shapes]
    for step, mom in enumerate(moms, start=1):
        g = [rng.normal(size=s) for s in shapes]
        opt.apply_gradients(zip([keras.ops.convert_to_tensor(x.astype("float32")) for x in g], ours))
        for i in range(len(shapes)):
            lr_i = lr * mult[f"v{i}"]
            if i == 0:  # do_wd
                p[i] = p[i] * (1 - lr_i * wd)
            grad_avg[i] = mom * grad_avg[i] + (1 - mom) * g[i]
            sqr_avg[i] = sqr_mom * sqr_avg[i] + (1 - sqr_mom) * g[i] ** 2
            debias1 = (1 - mom) * (1 - mom ** step) / (1 - mom)
            debias2 = (1 - sqr_mom) * (1 - sqr_mom ** step) / (1 - sqr_mom)
            p[i] = p[i] - lr_i / debias1 * grad_avg[i] / (np.sqrt(sqr_avg[i] / debias2) + eps)
    for v, want in zip(ours, p):
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-7)


def test_layer_groups_follow_fastais_split_and_map_learning_rates():
    from cxrkeras.models import build_model
    from cxrkeras.training.optim import group_multipliers, layer_groups, norm_and_bias_paths

    model = thin_densenet()
    early, late, new = ([layer.name for layer in g] for g in layer_groups(model))
    # torchvision features[:7] = conv0 .. denseblock2 (Keras conv1_*, conv2_*, pool2_* = transition 1, conv3_*)
    assert early[0] == "conv1_conv" and all(not n.startswith(("pool3", "conv4", "conv5")) for n in early)
    assert "pool2_conv" in early and late[0] == "pool3_bn" and "bn" in late  # transition 2 .. norm5
    assert new == ["conv4_lka", "conv5_lka", "predictions"]
    mult = group_multipliers(model, [1e-5, 1e-4, 1e-3], 1e-3)
    assert mult["conv1_conv/kernel"] == pytest.approx(0.01) and mult["pool3_conv/kernel"] == pytest.approx(0.1)
    assert mult["conv4_lka/conv1/kernel"] == 1.0 and mult["predictions/bias"] == 1.0
    assert set(mult) == {v.path for v in model.trainable_variables}
    spared = set(norm_and_bias_paths(model))
    assert "conv1_bn/gamma" in spared and "predictions/bias" in spared and "conv1_conv/kernel" not in spared
    vgg = build_model("vgg16-lka-last3", num_classes=3, weights=None, input_shape=(32, 32, 3), width_multiplier=0.0625)
    early, late, new = ([layer.name for layer in g] for g in layer_groups(vgg))
    # fastai's _vgg_split at features[22]: blocks 1-3 (with block 3's last conv + BN), then blocks 4-5
    assert early[-1] == "block3_conv3_bn" and late[0] == "block4_conv1" and late[-1] == "block5_conv3_bn"
    assert new == ["block3_lka", "block4_lka", "block5_lka", "predictions"]


def test_layer_groups_of_the_attention_study_models():
    """att-A's gates and the patient branch are new layers (last group, never frozen); ResNet-50 splits as fastai's
    `_resnet_split`: conv1 .. layer2, then layer3 (Keras conv4_*) and layer4."""
    import warnings

    from cxrkeras.models import build_model
    from cxrkeras.models.parts import added_layers
    from cxrkeras.training.optim import layer_groups, set_backbone_trainable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # softmax over 1x1 maps in the tiny gates
        gated = build_model("densenet121-att-a", num_classes=3, weights=None, input_shape=(64, 64, 3),
                            patient_features=True, **THIN)
    early, late, new = ([layer.name for layer in g] for g in layer_groups(gated))
    assert new == added_layers(gated) and any(n.startswith("att1_") for n in new)
    assert any(n.startswith("patient_") for n in new) and new[-1] == "predictions"
    assert early[0] == "conv1_conv" and late[0] == "pool3_bn"
    set_backbone_trainable(gated, False, train_bn=True)
    assert all(layer.trainable for layer in layer_groups(gated)[2])
    assert not gated.get_layer("conv1_conv").trainable and gated.get_layer("conv1_bn").trainable
    resnet = build_model("resnet50", num_classes=3, weights=None, input_shape=(32, 32, 3), width_multiplier=0.0625)
    early, late, new = ([layer.name for layer in g] for g in layer_groups(resnet))
    assert early[0] == "conv1_conv" and early[-1].startswith("conv3_block4") and late[0].startswith("conv4_block1")
    assert late[-1].startswith("conv5_block3") and new == ["predictions"]


# --- fine_tune ---

def _stage_run(config, start_epoch=0, steps=10):
    from cxrkeras.training.stage import StageRun

    run = StageRun.__new__(StageRun)  # the phase plan needs only the config, the resume epoch and the steps
    run.config, run.start_epoch, run.steps, run.base_lr = config, start_epoch, steps, float(config.optim.lr)
    return run


def test_fine_tune_phase_boundaries_and_learning_rates():
    from cxrkeras.training.stage import Phase

    cfg = load_config("configs/paper/densenet121_lka_last2_stage1.yaml", sets=["optim.lr_find=null"])
    frozen, unfrozen = _stage_run(cfg).plan_phases()
    # fine_tune(freeze_epochs=3, epochs=20, base_lr=2e-3, lr_mult=100)
    assert frozen == Phase(0, 3, True, 2e-3, pytest.approx([2e-4, 2e-4, 2e-3]), 0.99, 25.0, restart=True)
    assert (unfrozen.begin, unfrozen.end, unfrozen.frozen, unfrozen.restart) == (3, 23, False, True)
    assert unfrozen.lr == pytest.approx(1e-3) and unfrozen.group_lrs == pytest.approx([1e-5, 1e-4, 1e-3])
    assert (unfrozen.pct_start, unfrozen.div) == (0.3, 5.0)
    assert _stage_run(cfg).total_epochs() == 23
    assert [p.begin for p in _stage_run(cfg, start_epoch=5).plan_phases()] == [3]  # resumed in phase 2
    assert _stage_run(cfg, start_epoch=3).plan_phases() == [unfrozen]
    # each phase is its own cycle: phase 2's schedule starts at base_lr / 2 / div
    run = _stage_run(cfg, steps=10)
    opt = run.build_optimizer(unfrozen)
    assert float(opt._learning_rate(0)) == pytest.approx(1e-3 / 5) and opt._learning_rate.total_steps == 200
    fit = load_config(sets=["optim.lr_low=1e-5", "optim.lr=1e-3", "train.freeze_backbone_epochs=2",
                            "train.epochs=5"])
    phases = _stage_run(fit).plan_phases()
    assert [(p.begin, p.end, p.frozen, p.restart) for p in phases] == [(0, 2, True, False), (2, 5, False, False)]
    assert phases[0].group_lrs == pytest.approx([1e-5, 1e-4, 1e-3])


def test_fine_tune_needs_one_cycle():
    with pytest.raises(ConfigError, match="fine_tune.*one_cycle"):
        load_config(sets=["train.recipe=fine_tune", "optim.schedule=cosine"])


class PerBatch(keras.callbacks.Callback):
    """Records, before each training batch, the learning rate, beta_1 and the trainable variable count."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_begin(self, batch, logs=None):
        from cxrkeras.training.callbacks import current_lr

        opt = self.model.optimizer
        self.rows.append((current_lr(opt), float(keras.ops.convert_to_numpy(opt.current_beta_1())),
                          len(self.model.trainable_variables), int(opt.iterations.numpy())))


def test_fine_tune_trains_bn_while_frozen_and_restarts_the_cycle(tiny_records, tmp_path):
    """End to end on the sample: 1 frozen epoch (LKA, head and batch norm train; BN statistics move), then 2
    unfrozen epochs whose own one-cycle starts at base_lr / 2 / 5 with fresh optimiser state."""
    from cxrkeras.training import train
    from test_training import tiny_config

    cfg = tiny_config(tiny_records, str(tmp_path), "ft", epochs=2,
                      train={"recipe": "fine_tune", "freeze_backbone_epochs": 1, "steps_per_epoch": 3},
                      optim={"schedule": "one_cycle", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01})
    probe = PerBatch()
    init = {}

    class Snapshot(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if not init:
                init["bn"] = self.model.get_layer("conv1_bn").moving_mean.numpy().copy()
                init["conv"] = self.model.get_layer("conv1_conv").kernel.numpy().copy()

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                init["bn_after"] = self.model.get_layer("conv1_bn").moving_mean.numpy().copy()
                init["conv_after"] = self.model.get_layer("conv1_conv").kernel.numpy().copy()

    result = train(cfg, 1, callbacks=[probe, Snapshot()], log=lambda *_: None)
    assert result.epochs_run == 3 and len(probe.rows) == 9
    frozen, unfrozen = probe.rows[:3], probe.rows[3:]
    assert frozen[0][2] < unfrozen[0][2]  # fewer trainable variables while frozen
    assert np.array_equal(init["conv"], init["conv_after"])  # the backbone's convolutions did not move
    assert not np.allclose(init["bn"], init["bn_after"])  # its batch norm kept updating its statistics
    assert frozen[0][0] == pytest.approx(1e-3 / 25, rel=1e-4) and frozen[0][3] == 0
    assert unfrozen[0][3] == 0  # a fresh cycle: the optimiser counts from 0 again
    assert unfrozen[0][0] == pytest.approx(1e-3 / 2 / 5, rel=1e-4) and unfrozen[0][1] == pytest.approx(0.95)
    assert max(r[0] for r in unfrozen) <= 1e-3 / 2 + 1e-12


# --- monitor ---

def test_monitor_val_loss_picks_the_lowest_loss_epoch():
    from cxrkeras.training.callbacks import BestCheckpoint, EarlyStop, Guard
    from cxrkeras.training.summary import best_row

    losses = [0.50, 0.40, 0.45, 0.30, 0.35, 0.36]
    aucs = [0.60, 0.70, 0.75, 0.65, 0.64, 0.63]
    best = BestCheckpoint("unused.keras", Guard(), monitor="val_loss", enabled=False)
    early = EarlyStop(2, monitor="val_loss")
    early.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    for epoch, (loss, auc) in enumerate(zip(losses, aucs)):
        logs = {"val_loss": loss, "val_auc_mean": auc}
        best.on_epoch_end(epoch, logs)
        early.on_epoch_end(epoch, logs)
    assert best.best_epoch == 4 and best.best == pytest.approx(0.30)  # epoch 4 (1-based) has the lowest loss
    assert early.stopped_epoch == 6  # epochs 5 and 6 brought no lower loss
    history = [{"epoch": str(i + 1), "val_loss": str(v), "val_auc_mean": str(a)}
               for i, (v, a) in enumerate(zip(losses, aucs))]
    assert best_row(history, "val_loss")["epoch"] == "4" and best_row(history, "val_auc_mean")["epoch"] == "3"
    state = best.get_state()
    fresh = BestCheckpoint("unused.keras", Guard(), monitor="val_loss", enabled=False)
    fresh.set_state({"best": None, "best_epoch": None})  # +inf written to JSON is null: read back as +inf
    assert fresh.best == math.inf and state["best"] == pytest.approx(0.30)


def test_training_on_val_loss_keeps_the_lowest_loss_checkpoint(tiny_records, tmp_path):
    import csv

    from cxrkeras.losses import make_loss
    from cxrkeras.runs import load_source
    from cxrkeras.training import train
    from cxrkeras.training.trainer import make_datasets
    from test_training import tiny_config

    cfg = tiny_config(tiny_records, str(tmp_path), "vl", epochs=3, train={"monitor": "val_loss"},
                      optim={"lr": 3e-3, "schedule": "constant"})
    result = train(cfg, 1, log=lambda *_: None)
    with open(os.path.join(result.stage_dir, "history.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["val_loss"]) for r in rows]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    # the kept model, scored afresh on the validation split, has the lowest loss of the history
    model = load_source(result.best_path).model
    _, val = make_datasets(cfg, 1)
    ys, ps = [], []
    for x, y in val:
        ys.append(y.numpy())
        ps.append(model(x, training=False).numpy())
    loss = float(make_loss(cfg, 1)(np.concatenate(ys), np.concatenate(ps)))
    assert loss == pytest.approx(min(losses), rel=1e-4)


# --- loss ---

def test_focal_loss_is_the_papers_and_the_zero_weight_trap_is_refused():
    from cxrkeras.losses import make_loss

    rng = np.random.default_rng(0)
    y = (rng.random((64, 14)) < 0.2).astype("float32")
    p = np.clip(rng.random((64, 14)), 1e-3, 1 - 1e-3).astype("float32")
    # the paper's FocalLoss(alpha=1, gamma=2): mean of alpha * (1 - p_t)^gamma * BCE
    p_t = np.where(y > 0.5, p, 1 - p)
    paper = np.mean(1.0 * (1 - p_t) ** 2 * -np.log(p_t))
    cfg = load_config(sets=["loss.gamma=2"])
    assert float(make_loss(cfg, 2)(y, p)) == pytest.approx(paper, rel=1e-5)
    for alpha, zero in ((1, "negative"), (0, "positive")):
        with pytest.raises(ConfigError, match=f"weights every {zero} label 0.*FocalLoss\\(alpha=1, gamma=2\\)"):
            load_config(sets=["loss.apply_class_balancing=true", f"loss.alpha={alpha}"])
    balanced = load_config(sets=["loss.apply_class_balancing=true"])  # null alpha: Lin et al.'s 0.25
    weights = np.where(y > 0.5, 0.25, 0.75)
    assert float(make_loss(balanced, 2)(y, p)) == pytest.approx(np.mean(weights * (1 - p_t) ** 2 * -np.log(p_t)),
                                                                 rel=1e-5)
    assert float(make_loss(load_config(sets=["loss.kind=bce"]), 2)(y, p)) == pytest.approx(
        np.mean(-np.log(p_t)), rel=1e-5)
    # no shipped config writes an alpha that has no effect
    for path in glob.glob("configs/*.yaml") + glob.glob("configs/paper/*.yaml"):
        cfg = load_config(path)
        assert cfg.loss.alpha is None or cfg.loss.apply_class_balancing, path


# --- augmentation ---

def test_augmentation_off_gives_training_batches_the_eval_transform(tiny_records):
    from cxrkeras.data.pipeline import build_dataset

    common = dict(stage=2, batch_size=8, image_size=32, return_ids=True, verify="size")
    evaluated = {}
    for x, _, ids in build_dataset(tiny_records, "train", training=False, **common):
        evaluated.update(zip(ids["image_id"].numpy(), x.numpy()))
    plain = build_dataset(tiny_records, "train", training=True, augment=False, seed=1, **common)
    augmented = build_dataset(tiny_records, "train", training=True, seed=1, **common)
    x, _, ids = next(iter(plain))
    np.testing.assert_allclose(x.numpy(), np.stack([evaluated[i] for i in ids["image_id"].numpy()]), atol=1e-5)
    x, _, ids = next(iter(augmented))
    assert np.abs(x.numpy() - np.stack([evaluated[i] for i in ids["image_id"].numpy()])).max() > 0.1
    cfg = load_config(sets=["data.augment=false", "data.max_rotation=0", "data.crop_scale=[1, 1]"])
    assert cfg.data.crop_scale == [1.0, 1.0] and not cfg.data.augment
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(sets=["data.crop_scale=[0.9, 0.5]"])
