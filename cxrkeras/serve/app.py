"""The Starlette app of `cxrkeras serve`: the page, its upload endpoint and TF Serving's REST API."""

import asyncio
import dataclasses
import datetime
import os
import re
import shutil
import sys
import tempfile
import traceback

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cxrkeras import __version__
from cxrkeras.errors import CxrError
from cxrkeras.serve import backend as bk
from cxrkeras.serve import rest
from cxrkeras.serve.worker import Busy

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# the page and its assets come from this server only: no CDN, no font or script from elsewhere
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                 b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                 b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_MODEL_PATH = re.compile(r"(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<verb>:[A-Za-z]+|/metadata)?")


@dataclasses.dataclass
class Limits:
    max_body_bytes: int = 32 << 20  # one request body (all its files together)
    max_images: int = 16  # images in one request
    timeout_s: float = 300.0  # how long a request may wait for the model


def _error(status, message):
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before the app sees it (by Content-Length
    when it is declared, else while it arrives); the security headers go on every response."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, send_with_headers, int(declared) if declared.isdigit() else None)
        chunks, size = [], 0
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    return await self._too_large(scope, send_with_headers, None)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send_with_headers)

    async def _too_large(self, scope, send, size):
        what = f"{size:,} bytes" if size is not None else f"over {self.max_bytes:,} bytes"
        response = _error(413, f"the request body ({what}) is over the limit of {self.max_bytes:,} bytes "
                               f"({self.max_bytes / (1 << 20):g} MiB, --max-upload-mb); send fewer or smaller files")
        await response(scope, None, send)


def create_app(backend, worker, name, limits=None, upload_root=None):
    """The app serving `backend` through `worker` under model name `name`. Uploads go to folders made under
    `upload_root` (default: the system's temporary folder) and are deleted when their request ends."""
    limits = limits or Limits()
    labels = backend.labels
    thresholds = [float(t) for t in backend.thresholds]
    inputs = [rest.INPUT] + (list(rest.PATIENT_INPUTS) if backend.takes_patient else [])
    patient_facts = _patient_facts(backend.patient_encoder()) if backend.takes_patient else None

    def status():
        return {"model_version_status": [{"version": str(backend.version), "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}

    def model_facts():
        return {"name": name, "version": backend.version, "labels": labels, "thresholds": thresholds,
                "threshold_info": backend.threshold_info, "warning": backend.warning,
                "served_from": "SavedModel" if backend.is_export else "Keras model",
                "heatmaps": backend.heatmap_source is not None, "heatmaps_unavailable": backend.heatmap_reason,
                "inputs": inputs, "patient_inputs": patient_facts, "cxrkeras": __version__, "notice": bk.NOTICE,
                "limits": {"max_upload_bytes": limits.max_body_bytes, "max_images": limits.max_images}}

    def metadata():
        dim = [{"size": "-1", "name": ""}]
        out_dim = dim + [{"size": str(len(labels)), "name": ""}]
        dtypes = {rest.INPUT: "DT_STRING", "age": "DT_FLOAT", "sex": "DT_STRING", "view": "DT_STRING"}
        spec = {"inputs": {k: {"dtype": dtypes[k], "tensor_shape": {"dim": dim, "unknown_rank": False},
                               "name": f"serving_default_{k}:0"} for k in inputs},
                "outputs": {o: {"dtype": dt, "tensor_shape": {"dim": out_dim, "unknown_rank": False},
                                "name": f"StatefulPartitionedCall:{i}"}
                            for i, (o, dt) in enumerate(zip(rest.OUTPUTS, ("DT_FLOAT", "DT_BOOL")))},
                "method_name": "tensorflow/serving/predict"}
        return {"model_spec": {"name": name, "signature_name": "", "version": str(backend.version)},
                "metadata": {"signature_def": {"signature_def": {rest.SIGNATURE: spec}}}}

    async def wait(future):
        return await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout_s)

    async def healthz(request):
        if not worker.alive:
            return JSONResponse({"status": "down", "error": "the model worker has stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": name, "version": backend.version,
                             "model_calls": worker.batches, "images": worker.items})

    async def models(request):
        match = _MODEL_PATH.fullmatch(request.path_params["rest"])
        if not match:
            return _error(404, f"unknown path {request.url.path[:200]!r}: use /v1/models/{name}, "
                               f"/v1/models/{name}/metadata or POST /v1/models/{name}:predict")
        wanted, version, verb = match.group("name"), match.group("version"), match.group("verb")
        spec = f"Latest({wanted})" if version is None else f"Specific({wanted}, {version})"
        if wanted != name or (version is not None and version != str(backend.version)):
            return _error(404, f"Servable not found for request: {spec[:200]} (this server serves {name!r} "
                               f"version {backend.version})")
        if verb == ":predict":
            if request.method != "POST":
                return _error(405, "predict takes POST with a JSON body")
            return await predict(request)
        if verb is not None and verb != "/metadata":
            return _error(404, f"{verb[1:][:32]!r} is not served: the signature is a predict signature "
                               f"(POST /v1/models/{name}:predict)")
        if request.method != "GET":
            return _error(405, f"use GET for {request.url.path[:200]}")
        return JSONResponse(metadata() | model_facts() if verb == "/metadata" else status() | model_facts())

    async def predict(request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith(("multipart/", "image/", "application/dicom", "application/octet-stream")):
            return _error(415, f"content type {ctype!r}: this endpoint takes TF Serving's JSON, "
                               f'{{"instances": [{{"image_bytes": {{"b64": "..."}}}}]}} (the page uploads files '
                               f"to /api/analyze)")
        body = await request.body()
        try:
            blobs, fmt = await run_in_threadpool(rest.parse_request, body, limits.max_images, backend.takes_patient)
            probs, found = await wait(worker.predict(blobs))
        except rest.RequestError as exc:
            return _error(400, str(exc))
        except bk.ItemError as exc:
            return _error(400, rest.item_message(exc.index, exc.reason))
        except (Busy, asyncio.TimeoutError) as exc:
            return _error(503, str(exc) or f"the model did not answer within {limits.timeout_s:g} s; retry later")
        return JSONResponse(rest.format_response(probs, found, fmt))

    async def info(request):
        return JSONResponse(model_facts())

    async def index(request):
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    async def analyze(request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "multipart/form-data":
            return _error(415, f"content type {ctype or 'none'!r}: upload the files as multipart/form-data under "
                               f"the field 'files' (the JSON API is POST /v1/models/{name}:predict)")
        try:
            form = await request.form(max_files=limits.max_images, max_fields=16)
        except HTTPException as exc:
            return _error(400, f"the upload cannot be read: {exc.detail}")
        try:
            return await _analyze(form)
        finally:
            await form.close()

    async def _analyze(form):
        uploads = [f for f in form.getlist("files") if hasattr(f, "filename")]
        if not uploads:
            return _error(400, "no file uploaded: choose one or more PNG, JPEG or DICOM files (field 'files')")
        try:
            top_k = int(form.get("top_k") or 3)
        except ValueError:
            return _error(400, f"top_k {str(form.get('top_k'))[:16]!r} is not a whole number")
        if not 0 <= top_k <= len(labels):
            return _error(400, f"top_k must be 0 to {len(labels)} (the model's labels), got {top_k}")
        chosen = (form.get("label") or "").strip() or None
        if chosen is not None and chosen not in labels:
            return _error(400, f"label {chosen[:64]!r} is not one of the model's labels: {', '.join(labels)}")
        values = [None] * len(uploads)
        if backend.takes_patient:  # one age, sex and view per file, in file order
            fields = [form.getlist(name) for name in rest.PATIENT_INPUTS]
            if any(len(f) != len(uploads) for f in fields):
                return _error(400, f"this model takes age, sex and view: give the fields age, sex and view once for "
                                   f"each of the {len(uploads)} file(s), in file order")
            values = [tuple(str(v)[:32] for v in item) for item in zip(*fields)]
        os.makedirs(upload_root or tempfile.gettempdir(), exist_ok=True)
        folder = tempfile.mkdtemp(prefix="cxrkeras-upload-", dir=upload_root)
        try:
            results = await _analyze_files(uploads, folder, top_k, chosen, values)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "model": model_facts(), "heatmap_label": chosen, "heatmap_top_k": None if chosen else top_k,
                  "results": results}
        if all(r["error"] for r in results):
            problems = "; ".join(f"{r['file']}: {r['error']}" for r in results)
            return JSONResponse({**report, "error": f"no file could be analysed: {problems}"}, status_code=400)
        return JSONResponse(report)

    async def _analyze_files(uploads, folder, top_k, chosen, values):
        results, paths, futures = [], [], []
        for i, upload in enumerate(uploads):
            shown = _display_name(upload.filename, i)
            os.makedirs(os.path.join(folder, str(i)))
            path = os.path.join(folder, str(i), _file_name(shown))  # the overlays' captions show this name
            await upload.seek(0)
            with open(path, "wb") as f:
                await run_in_threadpool(shutil.copyfileobj, upload.file, f)
            results.append({"file": shown, "error": None})
            paths.append(path)
            try:
                blob = await run_in_threadpool(bk.file_bytes, path)
            except bk.FileProblem as exc:
                results[i]["error"] = str(exc)
                futures.append(None)
                continue
            try:  # one job per file: the worker batches them and names the bad one
                item = (blob, values[i]) if backend.takes_patient else blob
                futures.append((blob, worker.predict([item])))
            except Busy as exc:
                results[i]["error"] = str(exc)
                futures.append(None)
        for i, item in enumerate(futures):
            if item is None:
                continue
            blob, future = item
            try:
                probs, found = await wait(future)
            except bk.ItemError as exc:
                results[i]["error"] = exc.reason
                continue
            except asyncio.TimeoutError:
                results[i]["error"] = f"the model did not answer within {limits.timeout_s:g} s; retry later"
                continue
            try:
                url, width, height = await run_in_threadpool(bk.preview, blob)
            except bk.FileProblem as exc:
                results[i]["error"] = str(exc)
                continue
            p, f = probs[0], found[0]
            rows = sorted(({"label": lbl, "probability": float(p[j]), "threshold": thresholds[j],
                            "finding": bool(f[j])} for j, lbl in enumerate(labels)),
                          key=lambda r: -r["probability"])
            if backend.takes_patient:
                results[i]["patient"] = dict(zip(rest.PATIENT_INPUTS, values[i]))
            results[i].update(width=width, height=height, preview=url, table=rows,
                              findings=[r["label"] for r in rows if r["finding"]], heatmaps=[],
                              heatmaps_unavailable=backend.heatmap_reason)
            wanted = [chosen] if chosen else [r["label"] for r in rows[:top_k]]
            if backend.heatmap_source is None or not wanted:
                continue
            out_dir = os.path.join(folder, f"heatmaps-{i}")
            try:
                maps = await wait(worker.call(backend.heatmaps, paths[i], wanted, out_dir, values[i]))
            except (Busy, CxrError) as exc:
                results[i]["heatmaps_unavailable"] = str(exc)
                continue
            except asyncio.TimeoutError:
                results[i]["heatmaps_unavailable"] = f"Grad-CAM did not finish within {limits.timeout_s:g} s"
                continue
            results[i]["heatmaps"] = [{"label": m["label"], "probability": m["probability"], "rank": m["rank"],
                                       "empty": m["heatmap_max"] <= 0, "image": bk.data_url(m["png"])}
                                      for m in maps]
        return results

    async def server_error(request, exc):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return _error(500, f"internal error ({type(exc).__name__}); the server goes on serving, see its log")

    async def not_found(request, exc):
        return _error(exc.status_code, f"{request.url.path[:200]}: {exc.detail}")

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/model", info),
        Route("/api/analyze", analyze, methods=["POST"]),
        Route("/v1/models/{rest:path}", models, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={Exception: server_error, HTTPException: not_found})
    app.state.backend, app.state.worker = backend, worker
    return BodyLimit(app, limits.max_body_bytes)


def _patient_facts(encoder):
    """What the page asks for a model with patient features: the fields, their choices and the missing-value rule."""
    from cxrkeras.constants import PATIENT_SEXES, PATIENT_VIEWS

    missing = (encoder or {}).get("missing", "error")
    return {"fields": list(rest.PATIENT_INPUTS), "age": "years", "sex": list(PATIENT_SEXES),
            "view": list(PATIENT_VIEWS), "missing": missing,
            "note": ("every field is needed" if missing == "error" else
                     "a field left empty is encoded as unknown (age: the training mean; sex/view: none)")}


def _file_name(shown):
    """A safe file name for the upload inside its own folder: letters, digits, '._-'; a known image suffix."""
    stem, suffix = os.path.splitext(shown)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip(".")[:100] or "upload"
    suffix = suffix.lower() if suffix.lower() in UPLOAD_SUFFIXES else ".bin"
    return stem + suffix


def _display_name(filename, index):
    """The upload's base name, printable and at most 120 characters (never used as a path)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(c if c.isprintable() else "?" for c in base).strip()[:120]
    return base or f"file {index + 1}"
