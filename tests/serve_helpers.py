"""Helpers of the `cxrkeras serve` tests: a server started as its own process on a loopback port, HTTP calls."""

import base64
import contextlib
import http.client
import json
import os
import uuid

SAMPLE_IMAGES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "cxrkeras", "sample_data",
                                             "nih-512px", "images"))


class Server:
    """Client calls against a running ServerProcess, plus the folders it was given (TMPDIR, working folder)."""

    def __init__(self, process, tmp, cwd):
        self.process, self.tmp, self.cwd = process, tmp, cwd
        self.host, self.port, self.url = process.host, process.port, process.url
        self.startup_output = process.startup_output

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


def instances(blobs):
    return {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}} for b in blobs]}


def multipart(files, fields=None):
    """(body, content type) of a multipart/form-data upload: files = [(name, bytes)] under the field 'files';
    fields: a dict, or [(name, value)] (a name may repeat)."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields.items() if isinstance(fields, dict) else fields or ()):  # a list repeats fields
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
    """`cxrkeras serve --model MODEL --port 0 ARGS` in its own process, with TMPDIR and its working folder under
    tmp_path (so what it leaves behind can be seen); stopped with SIGTERM, and it must end by itself."""
    from cxrkeras.serve.process import ServerProcess

    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir(), cwd.mkdir()
    with ServerProcess(model, *args, env={"TMPDIR": str(tmp)}, cwd=str(cwd),
                       log_path=str(tmp_path / "server.log")) as process:
        yield Server(process, tmp, cwd)
