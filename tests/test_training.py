"""Two-stage training end to end on the tiny real-sample records: CLI, run folder, stage-2 init, resume, NaN."""

import csv
import hashlib
import importlib.util
import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from cxrkeras.cli import cli
from cxrkeras.config import load_config
from cxrkeras.errors import ConfigError, CxrError

THIN = "{blocks: [1, 1, 1, 1], width_multiplier: 0.125}"


def tiny_args(records, root, name, epochs=2, image_size=32):
    return ["--records", records, "--run-dir", root, "--name", name, "--epochs", str(epochs), "--image-size",
            str(image_size),
            "--batch-size", "4", "--weights", "none", "--variant", "densenet121-lka-last2",
            "--set", f"model.overrides={THIN}", "--set", "train.steps_per_epoch=2", "--set", "data.shuffle_buffer=64"]


def tiny_config(records, root, name, epochs=2, **sections):
    overrides = {"data": {"records": records, "image_size": 32, "batch_size": 4, "shuffle_buffer": 64},
                 "model": {"variant": "densenet121-lka-last2", "weights": None,
                           "overrides": {"blocks": [1, 1, 1, 1], "width_multiplier": 0.125}},
                 "train": {"epochs": epochs, "steps_per_epoch": 2, "verbose": 0},
                 "run": {"root": root, "name": name}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_config(overrides=overrides)


def history(stage_dir):
    with open(os.path.join(stage_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def two_stage(tiny_records, tmp_path_factory):
    """Stage 1 then stage 2 of one run through the CLI (2 epochs each)."""
    root = str(tmp_path_factory.mktemp("runs"))
    runner = CliRunner()
    out = {}
    for stage in ("1", "2"):
        res = runner.invoke(cli, ["train", "--stage", stage] + tiny_args(tiny_records, root, "e2e"))
        assert res.exit_code == 0, res.output + repr(res.exception)
        out[stage] = res.output
    return root, os.path.join(root, "e2e"), out


def test_two_stages_through_the_cli(two_stage, tiny_records):
    from cxrkeras.data.manifest import load_manifest
    from cxrkeras.training.rundir import best_model_path

    root, run, out = two_stage
    manifest = load_manifest(tiny_records)
    train_info = manifest["splits"]["train"]
    for stage in (1, 2):
        d = os.path.join(run, f"stage{stage}")
        for name in ("config.yaml", "run_info.json", "history.csv", "best.keras", "last.keras"):
            assert os.path.exists(os.path.join(d, name)), (stage, name)
        if importlib.util.find_spec("tensorboard"):  # TensorBoard logs need the tensorboard package
            assert os.listdir(os.path.join(d, "tensorboard", "validation"))
        rows = history(d)
        assert [r["epoch"] for r in rows] == ["1", "2"]
        for r in rows:  # exact per-label AUC columns and their mean, every epoch
            aucs = [float(r[f"val_auc_{label}"]) for label in manifest["labels"]]
            defined = [a for a in aucs if np.isfinite(a)]
            assert defined and np.isclose(float(r["val_auc_mean"]), np.mean(defined))
        info = json.load(open(os.path.join(d, "run_info.json")))
        assert info["finished"] and info["stage"] == stage and info["variant"] == "densenet121-lka-last2"
        assert info["manifest_sha256"] == sha(os.path.join(tiny_records, "manifest.json"))
        assert info["labels"] == manifest["labels"] and info["image_size"] == 32
        assert info["preprocessing"] == "torch" and info["versions"]["keras"] == keras.__version__
        assert info["devices"]["replicas"] == 1
        expected = train_info["images"] - (train_info["no_finding"] if stage == 1 else 0)
        assert info["train_images"] == expected  # stage 1 = images with a finding only
        assert f"stage {stage} summary" in out[str(stage)] and "best epoch" in out[str(stage)]
    info2 = json.load(open(os.path.join(run, "stage2", "run_info.json")))
    stage1_best = os.path.join(run, "stage1", "best.keras")
    assert info2["init"]["path"] == os.path.abspath(stage1_best)
    assert "initialised from" in out["2"] and stage1_best in out["2"]
    assert best_model_path(run) == os.path.join(run, "stage2", "best.keras")
    model = keras.saving.load_model(best_model_path(run), compile=False)
    assert model.output_shape == (None, len(manifest["labels"]))
    # the model and run_info.json store the preprocessing of the data it was trained on (records of 64 px, grey)
    from cxrkeras.models import model_info

    stored = {"image_size": 32, "preprocessing": "torch", "equalize": None, "stored_size": [64, 64], "channels": 1}
    assert model_info(model)["preprocessor"] == stored == info2["preprocessor"]
    assert info2["records_image_size"] == [64, 64] and info2["records_channels"] == 1


def test_rerun_refusal_and_finished(two_stage, tiny_records):
    root, run, _ = two_stage
    runner = CliRunner()
    args = ["train", "--stage", "1"] + tiny_args(tiny_records, root, "e2e")
    before = sha(os.path.join(run, "stage1", "best.keras"))
    res = runner.invoke(cli, args + ["--lr", "0.5"])
    assert res.exit_code != 0 and "different config" in res.output and "optim.lr" in res.output
    assert "--overwrite" in res.output
    res = runner.invoke(cli, args)  # same command again: nothing retrained
    assert res.exit_code == 0 and "already finished" in res.output and "stage 1 summary" in res.output
    assert sha(os.path.join(run, "stage1", "best.keras")) == before


def test_bad_input_messages(tiny_records, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--stage", "2"] + tiny_args(tiny_records, str(tmp_path), "nostage1"))
    assert res.exit_code != 0 and "--stage 1" in res.output and "best.keras" in res.output
    res = runner.invoke(cli, ["train", "--stage", "1"] + tiny_args(str(tmp_path / "none"), str(tmp_path), "x"))
    assert res.exit_code != 0 and "does not exist" in res.output and "build-records" in res.output
    res = runner.invoke(cli, ["train", "--stage", "1", "--set", "optim.learning_rate=0.1"])
    assert res.exit_code != 0 and "did you mean 'optim.lr'" in res.output
    res = runner.invoke(cli, ["train", "--stage", "1", "--variant", "densenet121-lka-lst2"])
    assert res.exit_code != 0 and "densenet121-lka-last2" in res.output


class WeightsProbe(keras.callbacks.Callback):
    """Records the weights and optimiser iteration count when fit starts."""

    def __init__(self):
        super().__init__()
        self.weights = None

    def on_train_begin(self, logs=None):
        if self.weights is None:
            self.weights = [np.array(w) for w in self.model.get_weights()]
            self.iterations = int(self.model.optimizer.iterations.numpy())


def test_stage2_starts_from_stage1_weights_and_checks_its_origin(two_stage, tiny_records):
    from cxrkeras.training import train
    from cxrkeras.training.trainer import weights_fingerprint

    root, run, out = two_stage
    stage1_best = os.path.join(run, "stage1", "best.keras")
    stage1 = keras.saving.load_model(stage1_best, compile=False)
    stage2_last = keras.saving.load_model(os.path.join(run, "stage2", "last.keras"), compile=False)
    # the weights stage 2 had before its first step are exactly stage 1's best (fingerprint taken after loading)
    info2 = json.load(open(os.path.join(run, "stage2", "run_info.json")))
    assert info2["init"]["weights_fingerprint"] == weights_fingerprint(stage1)
    assert weights_fingerprint(stage1)[:16] in out["2"]
    assert weights_fingerprint(stage2_last) != weights_fingerprint(stage1)  # and then it trained
    other = tiny_config(tiny_records, root, "init-other")
    other.model.variant = "densenet121-lka-after"
    with pytest.raises(ConfigError, match="refuses to start.*variant 'densenet121-lka-last2' there"):
        train(other, 2, init=stage1_best)


def test_stage2_refuses_other_records(two_stage, tiny_records, tmp_path):
    import shutil

    from cxrkeras.training import train

    root, run, _ = two_stage
    records = str(tmp_path / "records")
    shutil.copytree(tiny_records, records)
    manifest = json.load(open(os.path.join(records, "manifest.json")))
    manifest["tool_version"] = "rebuilt"  # same images, but another build: another manifest sha256
    json.dump(manifest, open(os.path.join(records, "manifest.json"), "w"))
    cfg = tiny_config(records, root, "e2e")
    with pytest.raises(ConfigError, match="refuses to start.*manifest sha256"):
        train(cfg, 2)


def test_stage_datasets(tiny_records, tmp_path):
    from cxrkeras.training.trainer import make_datasets

    cfg = tiny_config(tiny_records, "unused", "unused", data={"cache": str(tmp_path / "cache")})
    for stage in (1, 2):
        train_ds, val_ds = make_datasets(cfg, stage)
        train_rows = np.concatenate([y.numpy() for _, y in train_ds.take(30)])
        val_rows = np.concatenate([y.numpy() for _, y in val_ds])
        assert train_rows.shape[1] == 14 and len(train_rows) == 120
        if stage == 1:  # no 'No Finding' image reaches stage 1, in training or validation
            assert train_rows.sum(axis=1).min() >= 1 and val_rows.sum(axis=1).min() >= 1
        else:
            assert (val_rows.sum(axis=1) == 0).any() and (train_rows.sum(axis=1) == 0).any()
        # data.cache as a folder: once a whole pass has been read, each stage's training images are cached on disk
        # there, each stage in its own file (stage 2 reads 187 images: 60 batches of 4 cover a pass)
        for _ in train_ds.take(60):
            pass
        assert any(f"-train-stage{stage}-" in name for name in os.listdir(tmp_path / "cache"))


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._current == self.epoch:
            raise KeyboardInterrupt("simulated kill in the middle of an epoch")


def test_resume_after_interruption_continues_epochs_and_schedule(tiny_records, tmp_path):
    from cxrkeras.training import train

    cfg = tiny_config(tiny_records, str(tmp_path), "resume", epochs=2)
    cfg.optim.schedule, cfg.optim.cosine_alpha = "cosine", 0.1
    stage_dir = os.path.join(str(tmp_path), "resume", "stage1")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, 1, callbacks=[Interrupt(epoch=1)], log=lambda *_: None)
    assert [r["epoch"] for r in history(stage_dir)] == ["1"]
    after_epoch1 = keras.saving.load_model(os.path.join(stage_dir, "last.keras"), compile=False).get_weights()

    probe = WeightsProbe()
    result = train(cfg, 1, callbacks=[probe], log=lambda *_: None)
    assert result.resumed_from == 1 and result.epochs_run == 2
    assert [r["epoch"] for r in history(stage_dir)] == ["1", "2"]
    assert probe.iterations == 2  # optimiser state restored: 1 epoch x 2 steps
    assert all(np.array_equal(a, b) for a, b in zip(after_epoch1, probe.weights))
    schedule = keras.optimizers.schedules.CosineDecay(1e-4, decay_steps=4, alpha=0.1)
    expected = [float(schedule(step)) for step in (2, 4)]
    logged = [float(r["learning_rate"]) for r in history(stage_dir)]
    assert np.allclose(logged, expected, rtol=1e-5)  # the cosine schedule continues from step 2, not 0
    info = json.load(open(os.path.join(stage_dir, "run_info.json")))
    assert info["finished"] and info["resumes"][0]["from_epoch"] == 1


class SetHeadKernel(keras.callbacks.Callback):
    """In epoch 2, set every weight of the head's kernel to `value`: at the epoch's start (NaN: the loss becomes
    NaN), or after each of its batches (0: the head sees no features any more, as with dead ReLUs)."""

    def __init__(self, value, after_batches=False):
        super().__init__()
        self.value, self.after_batches = value, after_batches

    def _set(self):
        layer = self.model.get_layer("predictions")
        layer.kernel.assign(np.full(layer.kernel.shape, self.value, dtype="float32"))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if epoch == 1 and not self.after_batches:
            self._set()

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == 1 and self.after_batches:
            self._set()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_records, tmp_path):
    from cxrkeras.training import train

    cfg = tiny_config(tiny_records, str(tmp_path), "nan", epochs=2)
    stage_dir = os.path.join(str(tmp_path), "nan", "stage1")
    with pytest.raises(CxrError) as exc:
        train(cfg, 1, callbacks=[SetHeadKernel(np.nan)], log=lambda *_: None)
    msg = str(exc.value)
    assert "became nan at epoch 2" in msg and "best.keras (epoch 1)" in msg and "--lr" in msg
    assert [r["epoch"] for r in history(stage_dir)] == ["1"]
    kept = keras.saving.load_model(os.path.join(stage_dir, "best.keras"), compile=False)
    assert all(np.isfinite(w).all() for w in kept.get_weights())


@pytest.mark.parametrize("label", ["Effusion", "Finding"])
def test_single_label_task_trains_stage2_alone_with_init_none(tmp_path, sample64, label):
    """A binary task straight from the NIH CSV (--labels Effusion, or Finding: any finding vs No Finding): stage 1
    would have no negatives, so it points to --init none."""
    from cxrkeras.data.records import build_records

    records = str(tmp_path / "rec")
    # 64 px: at 32 px the thin DenseNet's last maps are 1x1 and, after two steps, its moving BN statistics leave
    # every validation image with the same prediction to float32 precision (which the collapse check refuses)
    build_records(*sample64, records, labels=label, image_size=64, workers=1, progress=False)
    root = str(tmp_path / "runs")
    runner = CliRunner()
    args = tiny_args(records, root, "bin", epochs=1, image_size=64)
    res = runner.invoke(cli, ["train", "--stage", "1"] + args)
    assert res.exit_code != 0 and "--init none" in res.output
    res = runner.invoke(cli, ["train", "--stage", "2"] + args)
    assert res.exit_code != 0 and "--init none" in res.output  # no stage 1: says how to go on
    res = runner.invoke(cli, ["train", "--stage", "2", "--init", "none"] + args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    stage2 = os.path.join(root, "bin", "stage2")
    info = json.load(open(os.path.join(stage2, "run_info.json")))
    assert info["init"] is None and info["labels"] == [label]
    assert len(history(stage2)) == 1 and f"val_auc_{label}" in history(stage2)[0]
    model = keras.saving.load_model(os.path.join(stage2, "best.keras"), compile=False)
    assert model.output_shape == (None, 1)


def test_lr_1e3_collapse_stops_non_zero_without_a_best_checkpoint(tiny_records, tmp_path):
    """Issue 11 row 6: --lr 1e3 used to "succeed" (exit 0) and keep the collapsed model as best.keras."""
    root = str(tmp_path)
    for lr in ("1e3", "3"):  # 1e3: non-finite predictions; 3: an exploding loss or identical outputs, by the model
        res = CliRunner().invoke(cli, ["train", "--stage", "1", "--lr", lr] + tiny_args(tiny_records, root, f"lr{lr}"))
        assert res.exit_code == 1 and "training stopped" in res.output and "Traceback" not in res.output, res.output
        assert "none (no good epoch)" in res.output and "Lower the learning rate (--lr)" in res.output
        stage_dir = os.path.join(root, f"lr{lr}", "stage1")
        assert not os.path.exists(os.path.join(stage_dir, "best.keras"))
        info = json.load(open(os.path.join(stage_dir, "run_info.json")))
        assert not info["finished"] and info["collapsed_at"]["epoch"] == 1
    assert "not finite" in json.load(open(os.path.join(root, "lr1e3", "stage1", "run_info.json")))["collapsed_at"][
        "reason"]
    # which of the two finite collapses lr 3 reaches depends on the network (each has its own test)
    assert "the training loss exploded" in res.output or "exactly the same predictions" in res.output


def test_collapse_keeps_the_last_good_checkpoint(tiny_records, tmp_path):
    from cxrkeras.training import train

    cfg = tiny_config(tiny_records, str(tmp_path), "collapse", epochs=3)
    stage_dir = os.path.join(str(tmp_path), "collapse", "stage1")
    with pytest.raises(CxrError) as exc:
        train(cfg, 1, callbacks=[SetHeadKernel(0.0, after_batches=True)], log=lambda *_: None)
    msg = str(exc.value)
    assert "at epoch 2 the model gives every validation image exactly the same predictions" in msg
    assert "best.keras (epoch 1)" in msg and "last.keras (epoch 1)" in msg
    assert [r["epoch"] for r in history(stage_dir)] == ["1"]
    kept = keras.saving.load_model(os.path.join(stage_dir, "best.keras"), compile=False)
    assert np.abs(kept.get_layer("predictions").kernel.numpy()).max() > 0  # epoch 1's model, not the collapsed one


def test_collapse_reason_covers_exploding_loss():
    from cxrkeras.training.callbacks import collapse_reason

    y = np.array([[0, 1], [1, 0], [0, 0]], dtype=np.float32)
    alive = np.array([[0.2, 0.7], [0.6, 0.4], [0.1, 0.3]])
    assert collapse_reason(y, alive, {"training loss": 0.9, "validation loss": 0.8}, 0.693) is None
    assert "training loss exploded to 80" in collapse_reason(y, alive, {"training loss": 80.0}, 0.693)
    assert "exactly the same" in collapse_reason(y, np.full((3, 2), 1.0), {}, 0.693)
    assert collapse_reason(y, alive + np.array([[1e-7, 0]] * 3), {}, 0.693) is None  # weak, not constant
    assert "not finite" in collapse_reason(y, np.array([[np.nan, 0.5]] * 3), {}, 0.693)


def test_train_refuses_records_that_do_not_match_their_manifest(tiny_records, tmp_path):
    """Issue 11 row 3: a replaced shard used to end `train` with a 76-line TensorFlow traceback."""
    from records_helpers import replace_shard

    records, name = replace_shard(tiny_records, tmp_path, split="train")
    res = CliRunner().invoke(cli, ["train", "--stage", "1"] + tiny_args(records, str(tmp_path / "runs"), "bad"))
    assert res.exit_code == 1 and f"shard {name} has" in res.output and "Traceback" not in res.output
