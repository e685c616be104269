"""One thread owns the model: concurrent predict requests are batched into one call, other model work is queued.

TF Serving batches concurrent requests too (its `--enable_batching`); here a request waits at most `max_wait_s`
for others to join, up to `max_batch` images per model call. A bad item fails only the request it came from: the
error names the item's index in the whole batch, which maps back to one request; the others are run again.
"""

import concurrent.futures
import queue
import threading
import time

from cxrkeras.serve.backend import ItemError


class Busy(Exception):
    """The queue is full: the client should retry later (HTTP 503)."""


class _Job:
    __slots__ = ("kind", "payload", "future")

    def __init__(self, kind, payload):
        self.kind, self.payload, self.future = kind, payload, concurrent.futures.Future()


class ModelWorker:
    def __init__(self, backend, max_batch=32, max_wait_s=0.005, max_queue=256):
        self.backend = backend
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.batches = 0  # model calls made for predict jobs (the load test reads how much batching happened)
        self.items = 0
        self._queue = queue.Queue(maxsize=int(max_queue))
        self._held = None  # a job taken from the queue that did not fit into the last batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cxrkeras-model", daemon=True)
        self._thread.start()

    @property
    def alive(self):
        return self._thread.is_alive() and not self._stop.is_set()

    def predict(self, blobs):
        """A Future of (probabilities, findings) for a list of PNG/JPEG bytes; ItemError names the request's item."""
        return self._submit(_Job("predict", list(blobs)))

    def call(self, fn, *args):
        """A Future of fn(*args), run on the model thread after the work queued before it."""
        return self._submit(_Job("call", (fn, args)))

    def _submit(self, job):
        if not self.alive:
            raise RuntimeError("the model worker has stopped")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server has {self._queue.maxsize} requests waiting; retry in a moment") from None
        return job.future

    def close(self, timeout=10.0):
        """Stop after the model call under way; requests still queued fail with "the server is stopping"."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)  # wakes an idle thread; a full queue wakes it anyway
        except queue.Full:
            pass
        self._thread.join(timeout)
        pending = [self._held] if self._held is not None else []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is stopping"))

    # --- the model thread ---

    def _next(self, timeout=None):
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _loop(self):
        while not self._stop.is_set():
            job = self._next()
            if job is None:
                break
            if job.kind == "call":
                self._run_call(job)
                continue
            jobs, size = [job], len(job.payload)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_batch:
                try:
                    more = self._next(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None or more.kind != "predict" or size + len(more.payload) > self.max_batch:
                    self._held = more  # keep the order: it runs next
                    break
                jobs.append(more)
                size += len(more.payload)
            self._run_predict(jobs)
            if self._held is None and self._stop.is_set():
                break

    @staticmethod
    def _run_call(job):
        fn, args = job.payload
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - the request gets the error; the thread goes on serving
            job.future.set_exception(exc)

    def _run_predict(self, jobs):
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        while jobs:
            blobs = [b for j in jobs for b in j.payload]
            try:
                probs, found = self.backend.predict(blobs)
            except ItemError as exc:
                culprit = _owner(jobs, exc.index)
                if culprit is None:  # no index to go by: each request on its own
                    for j in jobs:
                        self._run_alone(j)
                    return
                job, local = culprit
                job.future.set_exception(ItemError(local, exc.reason))
                jobs = [j for j in jobs if j is not job]
                continue
            except BaseException as exc:  # noqa: BLE001 - an unexpected failure fails these requests, not the thread
                for j in jobs:
                    j.future.set_exception(exc)
                return
            self.batches += 1
            self.items += len(blobs)
            start = 0
            for j in jobs:
                n = len(j.payload)
                j.future.set_result((probs[start:start + n], found[start:start + n]))
                start += n
            return

    def _run_alone(self, job):
        try:
            job.future.set_result(self.backend.predict(job.payload))
            self.batches += 1
            self.items += len(job.payload)
        except BaseException as exc:  # noqa: BLE001
            job.future.set_exception(exc)


def _owner(jobs, index):
    """(job, index within it) of item `index` of the concatenated batch, or None."""
    if index is None or index < 0:
        return None
    for job in jobs:
        if index < len(job.payload):
            return job, index
        index -= len(job.payload)
    return None
