"""Helpers of the `cxrkeras serve` tests: a server started as its own process on a loopback port, HTTP calls."""

import base64
import contextlib
import http.client
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

SAMPLE_IMAGES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data",
                                             "nih-512px", "images"))
START_TIMEOUT_S = 240  # TensorFlow's import, the model's load and the warm-up on 2 shared cores


class Server:
    def __init__(self, proc, host, port, log_path, tmp, cwd):
        self.proc, self.host, self.port, self.log_path, self.tmp, self.cwd = proc, host, port, log_path, tmp, cwd

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def request(self, method, path, body=None, headers=None, timeout=120):
        """(status, headers dict, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method, path, doc=None, headers=None):
        body = None if doc is None else (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})} if body is not None else headers
        status, _, data = self.request(method, path, body, hdrs)
        return status, json.loads(data)

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def instances(blobs):
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}} for b in blobs]}


def multipart(files, fields=None):
    """(body, content type) of a multipart/form-data upload: files = [(name, bytes)] under the field 'files'."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def read_sample(name):
    with open(os.path.join(SAMPLE_IMAGES, name), "rb") as f:
        return f.read()


@contextlib.contextmanager
def running_server(model, tmp_path, *args):
    """`cxrkeras serve --model MODEL --port 0 ARGS` in its own process, TMPDIR and working folder under tmp_path;
    yields a Server; stops it with SIGTERM and checks that it ends by itself."""
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir(), cwd.mkdir()
    log_path = str(tmp_path / "server.log")
    env = {**os.environ, "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cxrkeras.cli", "serve", "--model", str(model), "--port", "0",
                                 *args], cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen, deadline, host = [], time.monotonic() + START_TIMEOUT_S, None
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            match = re.search(r"page: http://([^/\s]+):(\d+)/", line)
            if match:
                host, port = match.group(1), int(match.group(2))
                break
        if host is None:
            proc.kill()
            raise AssertionError(f"the server did not start within {START_TIMEOUT_S} s:\n{''.join(seen)}\n"
                                 f"{open(log_path).read()[-3000:]}")
        server = Server(proc, host, port, log_path, tmp, cwd)
        server.startup_output = "".join(seen)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the server did not stop within 30 s of SIGTERM") from None
