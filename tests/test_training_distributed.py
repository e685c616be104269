"""Distribution: MirroredStrategy over two logical CPUs matches one device; a 2-worker MultiWorkerMirrored run."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from background_helpers import BackgroundCheck

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")

MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from cxrkeras.config import load_config
    from cxrkeras.models import build_model
    from cxrkeras.losses import make_loss
    from cxrkeras.training.trainer import make_optimizer

    cfg = load_config(sets=["optim.optimizer=sgd", "optim.momentum=0.0", "optim.lr=0.5", "optim.schedule=constant"])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = (rng.random((4, 14)) < 0.3).astype("float32")
    ds = tf.data.Dataset.from_tensors((x, y))
    init = None

    def run(strategy):
        global init
        with strategy.scope():
            # no batch norm and no dropout: the per-replica half batches must give exactly the global result
            model = build_model("vgg16-plain-lka-after", input_shape=(32, 32, 3), width_multiplier=0.0625,
                                dropout=0.0)
            if init is None:
                init = model.get_weights()
            model.set_weights(init)
            model.compile(optimizer=make_optimizer(cfg.optim, 1), loss=make_loss(cfg, 2))
        evaluated = float(model.evaluate(ds, verbose=0))
        trained = float(model.fit(ds, epochs=1, verbose=0, shuffle=False).history["loss"][0])
        delta = np.concatenate([(a - b).ravel() for a, b in zip(model.get_weights(), init)])
        return strategy.num_replicas_in_sync, evaluated, trained, delta

    one = run(tf.distribute.get_strategy())
    two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"replicas": [one[0], two[0]], "eval": [one[1], two[1]], "train": [one[2], two[2]],
                      "delta_max": float(np.abs(one[3]).max()),
                      "delta_diff": float(np.abs(one[3] - two[3]).max())}))
""")


def _mirrored(tmp, run):
    code, stdout, stderr = run([sys.executable, "-c", MIRRORED_SCRIPT], env=ENV, timeout=300)
    assert code == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


BACKGROUND = BackgroundCheck("mirrored", _mirrored)  # its fresh process, started by conftest beside the other tests


@pytest.mark.timeout(330)
def test_mirrored_two_logical_cpus_gives_the_same_loss_as_one_device():
    out = BACKGROUND.result(timeout=320)
    assert out["replicas"] == [1, 2]
    assert out["eval"][0] == pytest.approx(out["eval"][1], rel=1e-5)
    assert out["train"][0] == pytest.approx(out["train"][1], rel=1e-5)
    # the update is the same too (a loss summed instead of averaged over replicas would double it)
    assert out["delta_max"] > 1e-4 and out["delta_diff"] < 1e-3 * out["delta_max"]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_worker_multi_worker_mirrored_run_completes(tiny_records, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    args = [sys.executable, "-m", "cxrkeras.cli", "train", "--stage", "1", "--records", tiny_records,
            "--run-dir", str(tmp_path), "--name", "mw", "--epochs", "1", "--image-size", "32", "--batch-size", "4",
            "--weights", "none", "--set", "model.overrides={blocks: [1, 1, 1, 1], width_multiplier: 0.125}",
            "--set", "train.steps_per_epoch=2"]
    procs = []
    for index in range(2):
        env = dict(ENV, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    info = json.load(open(tmp_path / "mw" / "stage1" / "run_info.json"))
    assert info["finished"] and info["devices"]["replicas"] == 2 and info["devices"]["tf_config"]["workers"] == 2
    assert info["global_batch_size"] == 4 and info["per_replica_batch_size"] == 2
    assert (tmp_path / "mw" / "stage1" / "best.keras").is_file()
    assert "over 2 replica(s)" in outputs[0] and "stage 1 summary" in outputs[0]


def test_the_multi_worker_patch_fits_the_installed_keras():
    """training/strategy.py replaces a private Keras function for multi-worker fit (keras-team/keras#20585). This
    fails, loudly, as soon as the installed Keras is outside the range the patch was checked on or its private
    trainer changed: extend KERAS_PATCH_RANGE only after checking the new Keras (and running `pytest -m slow`)."""
    import keras

    from cxrkeras.training import strategy

    low, high = strategy.KERAS_PATCH_RANGE
    assert low <= strategy.keras_version() <= high, (
        f"Keras {keras.__version__} is outside the range the multi-worker patch was checked on {low}-{high}")
    tf_trainer = strategy.check_keras_patch_targets()
    original = tf_trainer.reduce_per_replica
    try:
        strategy._patch_keras_multi_worker_reduce()
        assert tf_trainer.reduce_per_replica is not original and tf_trainer._cxrkeras_patched

        class MultiWorker:  # what the patch does under a multi-worker strategy: a mean over replicas, axis None
            seen = []

            def reduce(self, op, value, axis):
                self.seen.append((op, axis))
                return value

        saved = tf_trainer._collective_all_reduce_multi_worker
        tf_trainer._collective_all_reduce_multi_worker = lambda s: isinstance(s, MultiWorker)
        try:
            assert tf_trainer.reduce_per_replica({"loss": 1.5}, MultiWorker(), reduction="auto") == {"loss": 1.5}
            assert MultiWorker.seen == [("MEAN", None)]
        finally:
            tf_trainer._collective_all_reduce_multi_worker = saved
    finally:
        tf_trainer.reduce_per_replica = original
        tf_trainer._cxrkeras_patched = False


def test_an_unchecked_keras_is_refused_for_multi_worker_training(monkeypatch):
    from cxrkeras.errors import CxrError
    from cxrkeras.training import strategy

    monkeypatch.setattr(strategy, "keras_version", lambda: (3, 99))
    with pytest.raises(CxrError, match=r"not a version cxrkeras' multi-worker fix .* was checked on.*keras>=3.3,<3.16"):
        strategy.check_keras_patch_targets()
    monkeypatch.undo()
    from keras.src.backend.tensorflow import trainer as tf_trainer

    monkeypatch.setattr(tf_trainer, "reduce_per_replica", lambda values, strategy: values)
    with pytest.raises(CxrError, match=r"changed keras.src.backend.tensorflow.trainer.reduce_per_replica"):
        strategy.check_keras_patch_targets()
