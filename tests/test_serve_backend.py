"""`cxrkeras serve` inside: the model worker's batching and error attribution (with a stand-in model), and which
Keras model the heatmaps come from (an export's own .keras, checked by sha256, or a clear reason why none)."""

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from evalexport_helpers import png_bytes, sample_gray, tiny_model

from cxrkeras.serve.backend import Backend, ItemError
from cxrkeras.serve.worker import Busy, ModelWorker

pytestmark = pytest.mark.timeout(120)


class _Stand:
    """A model stand-in: item b"x<k>" gives probabilities k/10; b"bad" fails the call naming its batch index."""

    def __init__(self, hold=None):
        self.calls, self.hold = [], hold

    def predict(self, blobs):
        self.calls.append(list(blobs))
        if self.hold is not None and len(self.calls) == 1:
            self.hold.wait(10)
        if b"bad" in blobs:
            raise ItemError(blobs.index(b"bad"), "not a PNG or JPEG image")
        if b"nameless" in blobs:
            raise ItemError(None, "decoder failed somewhere")
        probs = np.array([[int(b[1:]) / 10.0] * 2 for b in blobs])
        return probs, probs >= 0.5


def _wait_queued(worker, n):
    deadline = time.monotonic() + 10
    while worker._queue.qsize() < n and time.monotonic() < deadline:  # noqa: SLF001
        time.sleep(0.005)


def test_worker_batches_queued_requests_and_blames_only_the_bad_one():
    hold = threading.Event()
    stand = _Stand(hold)
    worker = ModelWorker(stand, max_batch=5, max_wait_s=0.001)
    try:
        first = worker.predict([b"x1"])
        time.sleep(0.05)  # the worker holds `first` inside the model call
        jobs = [worker.predict([b"x2", b"x3"]), worker.predict([b"x4", b"bad", b"x5"]), worker.predict([b"x6"]),
                worker.predict([b"x7", b"x8"]), worker.predict([b"x9"])]
        _wait_queued(worker, len(jobs))
        hold.set()
        assert first.result(10)[0][:, 0].tolist() == [0.1]
        assert jobs[0].result(10)[0][:, 0].tolist() == pytest.approx([0.2, 0.3])
        with pytest.raises(ItemError) as info:
            jobs[1].result(10)
        assert info.value.index == 1 and info.value.reason == "not a PNG or JPEG image"  # its own index
        assert jobs[2].result(10)[0][:, 0].tolist() == pytest.approx([0.6])
        assert jobs[3].result(10)[1][:, 0].tolist() == [True, True]
        assert jobs[4].result(10)[0][:, 0].tolist() == pytest.approx([0.9])
    finally:
        worker.close()
    # 1, then the queued requests joined up to max_batch=5 images: [2 + 3], the bad one dropped and the rest run
    # again ([2]), then [1 + 2 + 1]
    assert [len(c) for c in stand.calls] == [1, 5, 2, 4]
    assert stand.calls[2] == [b"x2", b"x3"] and stand.calls[3] == [b"x6", b"x7", b"x8", b"x9"]


def test_worker_without_an_index_runs_each_request_alone_and_serialises_calls():
    hold = threading.Event()
    stand = _Stand(hold)
    worker = ModelWorker(stand, max_batch=32, max_wait_s=0.001)
    order = []
    try:
        first = worker.predict([b"x1"])
        time.sleep(0.05)
        a, b = worker.predict([b"x2"]), worker.predict([b"nameless"])
        c = worker.call(lambda: order.append("call") or 42)
        d = worker.predict([b"x3"])
        _wait_queued(worker, 4)
        hold.set()
        first.result(10)
        assert a.result(10)[0][0, 0] == pytest.approx(0.2)
        with pytest.raises(ItemError):
            b.result(10)
        assert c.result(10) == 42 and d.result(10)[0][0, 0] == pytest.approx(0.3)
        err = worker.call(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            err.result(10)
        assert worker.predict([b"x4"]).result(10)[0][0, 0] == pytest.approx(0.4)  # the thread survived it
    finally:
        worker.close()
    sizes = [len(x) for x in stand.calls]
    assert sizes == [1, 2, 1, 1, 1, 1]  # [x2, nameless] fails without an index: each alone; the call ran between


def test_worker_full_queue_is_busy_not_a_hang():
    hold = threading.Event()
    worker = ModelWorker(_Stand(hold), max_batch=1, max_wait_s=0.0, max_queue=2)
    try:
        worker.predict([b"x1"])
        time.sleep(0.05)
        worker.predict([b"x1"]), worker.predict([b"x1"])
        with pytest.raises(Busy, match="requests waiting; retry"):
            worker.predict([b"x1"])
    finally:
        hold.set()
        worker.close()


def _copy_export(serve_export, tmp_path, **info_changes):
    base = tmp_path / "exports" / "copy"
    shutil.copytree(serve_export["base"], base)
    info_path = base / "1" / "assets" / "export_info.json"
    info = json.loads(info_path.read_text())
    info.update(info_changes)
    info_path.write_text(json.dumps(info))
    return str(base)


def test_heatmaps_come_from_the_exports_own_keras_model_or_say_why_not(serve_export, tmp_path):
    blob = png_bytes(sample_gray("00008386_000.png"))
    backend = Backend(serve_export["base"], log=lambda *_: None)
    assert backend.is_export and backend.version == 1 and backend.heatmap_reason is None
    assert backend.heatmap_model_path == os.path.abspath(serve_export["keras"])
    probs, _ = backend.predict([blob])
    keras_probs, _ = Backend(serve_export["keras"], log=lambda *_: None).predict([blob])
    np.testing.assert_allclose(probs, keras_probs, atol=1e-5, rtol=0)

    gone = _copy_export(serve_export, tmp_path / "a", model=str(tmp_path / "moved" / "best.keras"))
    b = Backend(gone, log=lambda *_: None)
    assert b.heatmap_source is None and "which no longer exists" in b.heatmap_reason
    assert "--keras-model" in b.heatmap_reason
    np.testing.assert_allclose(b.predict([blob])[0], probs, atol=1e-6, rtol=0)  # predictions are unaffected

    other = str(tmp_path / "other.keras")
    tiny_model(seed=1).save(other)
    b = Backend(_copy_export(serve_export, tmp_path / "b", model=other), log=lambda *_: None)
    assert b.heatmap_source is None and "sha256 differs" in b.heatmap_reason
    b = Backend(gone, keras_model=other, log=lambda *_: None)
    assert b.heatmap_source is None and "sha256 differs" in b.heatmap_reason

    moved = str(tmp_path / "moved.keras")
    shutil.copyfile(serve_export["keras"], moved)
    b = Backend(gone, keras_model=moved, log=lambda *_: None)
    assert b.heatmap_reason is None and b.heatmap_model_path == os.path.abspath(moved)

    b = Backend(_copy_export(serve_export, tmp_path / "c", model=None, model_sha256=None), log=lambda *_: None)
    assert b.heatmap_source is None and "does not record the .keras file" in b.heatmap_reason


def test_keras_model_serves_itself_with_heatmaps(serve_export, tmp_path):
    from cxrkeras.errors import CxrError

    backend = Backend(serve_export["keras"], log=lambda *_: None)
    assert not backend.is_export and backend.heatmap_source is not None and backend.threshold_info == {}
    assert "threshold 0.5" in backend.warning  # a bare .keras has no evaluation: said, not hidden
    path = str(tmp_path / "x.png")
    with open(path, "wb") as f:
        f.write(png_bytes(sample_gray("00008386_000.png")))
    maps = backend.heatmaps(path, ["Effusion", "Mass"], str(tmp_path / "out"))
    assert [m["label"] for m in maps] == ["Effusion", "Mass"] and all(m["png"][:4] == b"\x89PNG" for m in maps)
    with pytest.raises(CxrError, match="--keras-model is for an export"):
        Backend(serve_export["keras"], keras_model=serve_export["keras"], log=lambda *_: None)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("127.0.0.2", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("example.org", False)])
def test_only_loopback_hosts_listen_without_a_warning(host, loopback):
    from cxrkeras.serve.server import _is_loopback

    assert _is_loopback(host) is loopback
