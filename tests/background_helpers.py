"""Fresh-process checks that need no fixture, started in a thread as soon as the session's tests are known."""

import shutil
import subprocess
import tempfile
import threading


class BackgroundCheck:
    """`work(tmp, run)` in a thread: tmp is its own folder, run(args, env, timeout) runs one process and returns
    (exit code, stdout, stderr). A test module sets BACKGROUND = BackgroundCheck(...); conftest starts it once the
    tests are collected (a check takes about one core, which the mostly single-threaded in-process tests leave
    free) and stops it at the session's end; the module's fixture waits for `result()`."""

    def __init__(self, name, work):
        self.name, self.work = name, work
        self.thread = self.tmp = self.proc = self.value = self.error = None

    def start(self):
        if self.thread is not None:
            return
        self.tmp = tempfile.mkdtemp(prefix=f"cxrkeras-{self.name}-")

        def target():
            try:
                self.value = self.work(self.tmp, self._run)
            except BaseException as exc:  # re-raised by result(), in the test
                self.error = exc

        self.thread = threading.Thread(target=target, name=self.name, daemon=True)
        self.thread.start()

    def _run(self, args, env=None, timeout=400):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            err += f"\n(killed after {timeout} s)"
        return self.proc.returncode, out, err

    def result(self, timeout):
        """The work's return value (it is started here when conftest did not); its exception re-raised."""
        self.start()
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), f"the {self.name} check did not finish within {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value

    def stop(self):
        """No process outlives the session (an interrupted run, or one whose test was not reached)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
