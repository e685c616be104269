"""`cxrkeras serve` as a child process (tests, benchmarks, scripts): start it, wait until it listens, stop it."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

_URL = re.compile(r"page: http://(\[[^\]]+\]|[^/\s:]+):(\d+)/")


class ServerProcess:
    """`cxrkeras serve --model MODEL --port 0 ARGS` in its own process; a context manager.

    On entry it waits (at most `timeout` s: TensorFlow's import, the model's load and the warm-up) for the line
    with the page's URL; `host`, `port`, `url` and `startup_output` are then set. On exit it sends SIGTERM and
    waits for the process to end by itself (killed after `stop_timeout` s, and that is an error)."""

    def __init__(self, model, *args, env=None, cwd=None, log_path=None, timeout=240, stop_timeout=30):
        self.command = [sys.executable, "-m", "cxrkeras.cli", "serve", "--model", str(model), "--port", "0",
                        *map(str, args)]
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd, self.log_path, self.timeout, self.stop_timeout = cwd, log_path, timeout, stop_timeout
        self.proc = self.host = self.port = None
        self.startup_output = ""

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def log(self):
        """The server's standard error so far (TensorFlow's messages, tracebacks of internal errors)."""
        if not self.log_path or not os.path.isfile(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def __enter__(self):
        stderr = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True)
        finally:
            if stderr is not subprocess.DEVNULL:
                stderr.close()
        lines = queue.Queue()

        def pump():  # keep reading, so a chatty server never blocks on a full pipe
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        seen, deadline = [], time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            match = _URL.search(line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                self.startup_output = "".join(seen)
                return self
        self._stop(kill=True)
        why = "ended" if self.proc.poll() is not None else f"did not listen within {self.timeout} s"
        raise RuntimeError(f"cxrkeras serve {why}:\n{''.join(seen)}{self.log()[-3000:]}")

    def __exit__(self, *exc):
        self._stop()

    def _stop(self, kill=False):
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
            self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"cxrkeras serve did not stop within {self.stop_timeout} s of SIGTERM") from None
