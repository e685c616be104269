"""`serve(model, host, port)`: load the model once, warm it up, and run the app under uvicorn until stopped."""

import ipaddress
import os
import re
import shutil
import socket
import tempfile

from cxrkeras.errors import ConfigError, CxrError

MAX_UPLOAD_MB = 4096


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host, port):
    """A listening socket (port 0: a free one), so the URL printed is the one bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise CxrError(f"port {port} on {host} is in use: choose another --port (0 picks a free one)") from None
        raise CxrError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _require_web_stack():
    try:
        import python_multipart  # noqa: F401 - Starlette's form parser (the uploads)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CxrError(f"`cxrkeras serve` needs the web server packages, which are not installed ({exc.name} "
                       f"is missing): pip install 'cxrkeras[serve]'") from None


def serve(model, host="127.0.0.1", port=8080, name=None, keras_model=None, max_upload_mb=32, max_images=16,
          max_batch=32, log=print):
    """Serve `model` (an export folder, a SavedModel version folder, a run folder or a .keras file) until stopped."""
    _require_web_stack()
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"--port {port}: must be 0 to 65535")
    if not 0 < float(max_upload_mb) <= MAX_UPLOAD_MB:
        raise ConfigError(f"--max-upload-mb {max_upload_mb}: must be over 0 and at most {MAX_UPLOAD_MB}")
    if not 1 <= int(max_images) <= 1024 or not 1 <= int(max_batch) <= 1024:
        raise ConfigError("--max-images and --max-batch must be 1 to 1024")
    if not os.path.exists(model):
        raise CxrError(f"--model {model!r} does not exist: give an export folder (exports/<name>), a run folder or "
                       f"a .keras file")
    import uvicorn

    from cxrkeras.serve.app import Limits, create_app
    from cxrkeras.serve.backend import NOTICE, Backend, model_name
    from cxrkeras.serve.worker import ModelWorker

    name = name or model_name(model)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ConfigError(f"--name {name[:100]!r}: use letters, digits and '._-' (it is part of the API's paths)")
    sock = _bind(host, int(port))  # before loading the model: a busy port fails at once
    upload_root = tempfile.mkdtemp(prefix="cxrkeras-serve-")
    worker = None
    try:
        backend = Backend(model, keras_model=keras_model, log=log)
        if backend.note:
            log(backend.note)
        if backend.warning:
            log(f"warning: {backend.warning}")
        if backend.heatmap_reason:
            log(f"heatmaps unavailable: {backend.heatmap_reason}")
        backend.warm_up()
        worker = ModelWorker(backend, max_batch=max_batch)
        limits = Limits(max_body_bytes=int(float(max_upload_mb) * (1 << 20)), max_images=int(max_images))
        app = create_app(backend, worker, name, limits, upload_root=upload_root)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if not _is_loopback(host):
            log(f"warning: listening on {host}, not only this machine: anyone who can reach it can upload images "
                f"and there is no authentication; keep it behind a firewall or an authenticating proxy")
        log(f"model {name!r} version {backend.version} ({len(backend.labels)} labels, "
            f"{'SavedModel' if backend.is_export else 'Keras model'} {backend.predictor.path})")
        log(NOTICE)
        log(f"page: http://{shown}:{bound_port}/   API: POST http://{shown}:{bound_port}/v1/models/{name}:predict")
        config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                limit_concurrency=256, timeout_keep_alive=5, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if worker is not None:
            worker.close()
        sock.close()
        shutil.rmtree(upload_root, ignore_errors=True)
