"""Encoding processes of build-records: results in order with bounded memory, a dead worker reported at once
(never a hang), quiet workers that never outlive the build, SIGTERM turned into a clean stop."""

import collections
import contextlib
import multiprocessing
import os
import signal
import threading
import time

from cxrkeras.errors import CxrError, Interrupted

CHUNK = 4  # tasks sent to a worker at a time
AHEAD = 2  # chunks in flight per worker: bounds the results waiting in memory


class WorkerDied(CxrError):
    """An encoding process ended abruptly (killed, most often by the kernel's out-of-memory killer)."""


def available_memory():
    """Bytes of memory this process may still use: MemAvailable, lowered by a cgroup (container) limit; None if
    unknown."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _run_chunk(fn, chunk):
    return [fn(task) for task in chunk]


def _worker_init(parent):
    # Ctrl-C signals the whole process group: the parent stops the build, the workers must stay quiet
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()


def exit_with_parent(parent):
    """Leave when the parent is gone (kill -9 gives it no chance to stop us): no orphan keeps running."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def describe_exit(code):
    """"killed by SIGKILL" / "exited with status 1" for a process exit code (negative: the signal)."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class EncoderPool:
    """`fn` over tasks in spawn processes, results in task order, at most AHEAD chunks in flight per worker (so
    memory stays bounded). A worker that dies raises WorkerDied at once: multiprocessing.Pool would replace it and
    wait forever for the task it lost. `fn` travels by name: a module-level function."""

    def __init__(self, workers):
        from concurrent.futures import ProcessPoolExecutor

        # spawn: workers import only PIL/numpy (never TF), safe whatever threads the parent has started
        context = multiprocessing.get_context("spawn")
        self.workers = workers
        self.executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                            initargs=(os.getpid(),))
        self.processes = {}

    def imap(self, fn, tasks):
        from concurrent.futures.process import BrokenProcessPool

        chunks = (tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK))
        pending = collections.deque()

        def submit():
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(self.executor.submit(_run_chunk, fn, chunk))
                # the executor has no public list of its processes; kept to say which one died and how
                self.processes.update(getattr(self.executor, "_processes", None) or {})

        try:
            for _ in range(self.workers * AHEAD):
                submit()
            while pending:
                results = pending.popleft().result()
                submit()
                yield from results
        except BrokenProcessPool:
            raise WorkerDied(self._death()) from None

    def _death(self):
        for proc in self.processes.values():
            proc.join(timeout=1.0)
        dead = [p for p in self.processes.values() if p.exitcode not in (None, 0)]
        # the executor SIGTERMs the survivors once one has died: name the one that died first
        first = [p for p in dead if p.exitcode != -signal.SIGTERM] or dead
        what = ", ".join(f"pid {p.pid} {describe_exit(p.exitcode)}" for p in first) or "it ended abruptly"
        oom = any(p.exitcode == -signal.SIGKILL for p in first) or not first
        return (f"an encoding worker process died ({what})"
                + ("; most likely the kernel's out-of-memory killer stopped it" if oom else ""))

    def close(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
        for proc in self.processes.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.processes.values():
            proc.join(timeout=5.0)
        # Let the executor's manager thread finish closing its wakeup pipe now: left running, it races
        # concurrent.futures' exit hook, which then writes to the closed pipe and prints an OSError traceback
        # after our one-line message (seen after a worker was SIGKILLed). Private attribute: no public handle.
        manager = getattr(self.executor, "_executor_manager_thread", None)
        if manager is not None:
            manager.join(timeout=10.0)


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises Interrupted in the main thread, so a stopped build cleans up (temporary file, workers) and
    ends with one line instead of the workers' BrokenPipeError tracebacks."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted("stopped by SIGTERM", signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
