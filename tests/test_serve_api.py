"""`cxrkeras serve`'s JSON API against a server process on a loopback port: TF Serving's REST format, outputs equal
to the SavedModel's for the same bytes, limits and bad input (400/413/415), the page's upload endpoint, DICOM tags,
temporary files, and a bounded concurrent load (zero errors)."""

import base64
import concurrent.futures
import io
import json
import os
import socket
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from evalexport_helpers import huge_gif, jpeg_bytes, png_bytes, sample_gray, write_dicom
from serve_helpers import SAMPLE_IMAGES, instances, multipart, read_sample

pytestmark = pytest.mark.timeout(600)

NAMES = sorted(os.listdir(SAMPLE_IMAGES))  # 9 real NIH images at 512 px, 3 of them RGBA


@pytest.fixture(scope="module")
def reference(serve_export):
    """The exported SavedModel itself, loaded in this process: the server must answer what it computes."""
    import tensorflow as tf

    fn = tf.saved_model.load(serve_export["version_dir"]).signatures["serving_default"]

    def run(blobs):
        out = fn(image_bytes=tf.constant(blobs))
        return out["probabilities"].numpy().astype(np.float64), out["findings"].numpy()

    return run


def _png16(gray):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


def _predict(server, doc):
    return server.json("POST", "/v1/models/tiny:predict", doc)


def test_health_status_and_metadata(server, serve_export):
    assert "page: http://127.0.0.1:" in server.startup_output  # localhost by default
    assert "Research tool, not a medical device" in server.startup_output
    status, doc = server.json("GET", "/healthz")
    assert status == 200 and doc["status"] == "ok" and doc["model"] == "tiny" and doc["version"] == 1
    status, doc = server.json("GET", "/v1/models/tiny")
    assert status == 200
    assert doc["model_version_status"] == [{"version": "1", "state": "AVAILABLE",
                                            "status": {"error_code": "OK", "error_message": ""}}]
    assert doc["labels"] == serve_export["labels"] and len(doc["labels"]) == 14
    with open(os.path.join(serve_export["version_dir"], "assets", "thresholds.json")) as f:
        exported = json.load(f)
    assert doc["thresholds"] == pytest.approx(exported["thresholds"], abs=1e-12)
    assert exported["source"] == "validation" and len(set(doc["thresholds"])) > 1  # chosen, not 0.5 everywhere
    assert doc["threshold_info"] == {"method": "youden", "source": "validation", "chosen_on": "val"}
    assert doc["heatmaps"] is True and doc["heatmaps_unavailable"] is None
    status, meta = server.json("GET", "/v1/models/tiny/metadata")
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert status == 200 and meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    assert sig["inputs"]["image_bytes"]["dtype"] == "DT_STRING" and sig["outputs"]["findings"]["dtype"] == "DT_BOOL"
    status, doc = server.json("GET", "/v1/models/tiny/versions/1")
    assert status == 200
    for path in ("/v1/models/other", "/v1/models/tiny/versions/2", "/v1/models/tiny/versions/2/metadata"):
        status, doc = server.json("GET", path)
        assert status == 404 and "Servable not found" in doc["error"], path
    status, doc = server.json("POST", "/v1/models/other:predict", instances([read_sample(NAMES[3])]))
    assert status == 404 and "Servable not found for request: Latest(other)" in doc["error"]


def test_one_image_equals_the_savedmodel(server, reference, serve_export):
    blob = read_sample("00004296_000.png")
    status, doc = _predict(server, instances([blob]))
    assert status == 200 and list(doc) == ["predictions"] and len(doc["predictions"]) == 1
    got = doc["predictions"][0]
    probs, found = reference([blob])
    assert len(got["probabilities"]) == 14 and all(isinstance(v, bool) for v in got["findings"])
    np.testing.assert_allclose(got["probabilities"], probs[0], atol=1e-5, rtol=0)
    assert got["findings"] == found[0].tolist()
    assert got["findings"] == [p >= t for p, t in zip(got["probabilities"], serve_export["thresholds"])]


def test_batch_of_formats_equals_the_savedmodel_row_and_columnar(server, reference):
    gray = sample_gray("00009745_000.png")
    blobs = [read_sample(NAMES[0]),  # RGBA
             jpeg_bytes(gray), _png16(gray), png_bytes(gray[40:440, 90:390].copy()), read_sample(NAMES[5])]
    probs, found = reference(blobs)
    status, doc = _predict(server, instances(blobs))
    assert status == 200 and len(doc["predictions"]) == len(blobs)
    np.testing.assert_allclose([p["probabilities"] for p in doc["predictions"]], probs, atol=1e-5, rtol=0)
    assert [p["findings"] for p in doc["predictions"]] == found.tolist()
    b64 = [{"b64": base64.b64encode(b).decode()} for b in blobs]
    for request in ({"inputs": {"image_bytes": b64}}, {"inputs": b64}, {"instances": b64},
                    {"signature_name": "serving_default", "instances": b64}):
        status, doc = _predict(server, request)
        assert status == 200, (request.keys(), doc)
        got = doc["outputs"]["probabilities"] if "inputs" in request else [p["probabilities"]
                                                                            for p in doc["predictions"]]
        np.testing.assert_allclose(got, probs, atol=1e-5, rtol=0)
    assert doc["predictions"][1]["findings"] == found[1].tolist()


def _truncated_png():
    blob = read_sample("00004296_000.png")
    return blob[: len(blob) // 2]


def _huge_png_header(width=20000, height=20000):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64




@pytest.mark.parametrize("bad, expected", [
    (b"hello, this is plain text", "image_bytes[1]: not a PNG or JPEG image (25 bytes: text)"),
    (b"", "image_bytes[1]: empty string (0 bytes), not an image"),
    (_truncated_png(), "image_bytes[1]: truncated or corrupt PNG data"),
    (_huge_png_header(), "image_bytes[1]: the image declares 20000x20000 pixels, over the limit"),
    (b"GIF89a" + b"\0" * 40, "image_bytes[1]: not a PNG or JPEG image (46 bytes: a GIF image)"),
], ids=["text", "empty", "truncated", "too-many-pixels", "gif"])
def test_bad_item_is_400_naming_it_and_the_server_goes_on(server, reference, bad, expected):
    good = read_sample(NAMES[4])
    status, doc = _predict(server, instances([good, bad, good]))
    assert status == 400 and list(doc) == ["error"]
    assert doc["error"].startswith(expected), doc["error"]
    assert "b64" not in doc["error"] and "hello" not in doc["error"]  # never the bytes
    status, doc = _predict(server, instances([good]))
    assert status == 200
    np.testing.assert_allclose(doc["predictions"][0]["probabilities"], reference([good])[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("body, expected", [
    (b"this is not json", "the request body is not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"instances": []}).encode(), "holds no image"),
    (json.dumps({"instances": [{"image_bytes": {"b64": "%%%not base64"}}]}).encode(),
     "instances[0]: the 'b64' value is not valid base64"),
    (json.dumps({"instances": ["raw string"]}).encode(), "instances[0]: a plain string"),
    (json.dumps({"instances": [{"image_bytes": {"b64": ""}, "age": 3}]}).encode(), "has the key(s) 'age'"),
    (json.dumps({"instances": [], "inputs": []}).encode(), "give exactly one of 'instances'"),
    (json.dumps({"signature_name": "predict_images", "instances": [[0.0]]}).encode(), "serves 'serving_default'"),
    (json.dumps(instances([b"x"] * 9)).encode(), "more than 8 images"),
], ids=["not-json", "not-object", "no-image", "bad-base64", "plain-string", "extra-key", "both-formats",
        "other-signature", "too-many-images"])
def test_malformed_request_is_400_with_what_to_send(server, body, expected):
    status, doc = server.json("POST", "/v1/models/tiny:predict", body)
    assert status == 400 and expected in doc["error"], doc


def test_wrong_content_types_are_415(server):
    blob = read_sample(NAMES[3])
    status, _, data = server.request("POST", "/v1/models/tiny:predict", blob, {"Content-Type": "image/png"})
    assert status == 415 and "takes TF Serving's JSON" in json.loads(data)["error"]
    body, ctype = multipart([("a.png", blob)])
    status, _, data = server.request("POST", "/v1/models/tiny:predict", body, {"Content-Type": ctype})
    assert status == 415
    status, _, data = server.request("POST", "/api/analyze", json.dumps(instances([blob])).encode(),
                                     {"Content-Type": "application/json"})
    assert status == 415 and "multipart/form-data" in json.loads(data)["error"]
    # curl -d sends application/x-www-form-urlencoded; TF Serving reads the JSON anyway, and so does this server
    status, _, data = server.request("POST", "/v1/models/tiny:predict", json.dumps(instances([blob])).encode(),
                                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    status, _, data = server.request("GET", "/v1/models/tiny:predict")
    assert status == 405


def _raw_post(server, head, body_chunks):
    """Send a request by hand (the body in a thread, as a client that keeps sending), return the status line
    and the response; the server may answer before it has read the whole body."""
    sock = socket.create_connection((server.host, server.port), timeout=60)

    def send():
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered 413 and closed: expected
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 50:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    finally:
        sock.close()
    sender.join(10)
    return data


def test_oversized_body_is_413_declared_or_streamed(server, reference):
    limit = 2 << 20
    body = json.dumps(instances([os.urandom(limit)])).encode()  # base64 makes it ~2.7 MiB
    head = (f"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    reply = _raw_post(server, head, [body])
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert f"over the limit of {limit:,} bytes (2 MiB, --max-upload-mb)".encode() in reply
    head = (b"POST /api/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    chunks = [b"%x\r\n%s\r\n" % (256 << 10, b"a" * (256 << 10)) for _ in range(12)] + [b"0\r\n\r\n"]
    reply = _raw_post(server, head, chunks)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    blob = read_sample(NAMES[6])
    status, doc = _predict(server, instances([blob]))
    assert status == 200
    np.testing.assert_allclose(doc["predictions"][0]["probabilities"], reference([blob])[0][0], atol=1e-5, rtol=0)


def _no_files_left(server):
    """Nothing of the uploads is left in the server's TMPDIR or working folder (TensorFlow's autograph writes the
    Python source of the functions it converts to TMPDIR: those are no uploads)."""
    left = [os.path.join(d, f) for d, _, files in os.walk(server.tmp) for f in files
            if not (f.startswith("__autograph_generated_file") and f.endswith(".py"))]
    left += [os.path.join(d, f) for d, _, files in os.walk(server.cwd) for f in files]
    assert not left, f"files left behind by the server: {left}"


def test_page_upload_table_heatmaps_errors_and_no_trace_left(server, reference, serve_export, tmp_path):
    good = read_sample("00004296_000.png")
    dicom_path = str(tmp_path / "study.dcm")
    arr16 = (sample_gray("00009745_000.png").astype(np.uint16) * 16)
    write_dicom(dicom_path, arr16)
    import pydicom

    ds = pydicom.dcmread(dicom_path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "MRN-7731-XQ", "19510203"
    ds.InstitutionName, ds.AccessionNumber = "Hospital-Q88", "ACC-99120"
    ds.save_as(dicom_path)
    with open(dicom_path, "rb") as f:
        dicom = f.read()
    body, ctype = multipart([("chest one.png", good), ("notes.txt", b"not an image at all"), ("study.dcm", dicom),
                             ("../../etc/evil.png", b""), ("cut.png", _truncated_png())], {"top_k": "2"})
    status, headers, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    assert status == 200, data[:500]
    for secret in (b"DOE^JANE", b"MRN-7731-XQ", b"19510203", b"Hospital-Q88", b"ACC-99120"):
        assert secret not in data, secret  # no DICOM tag is echoed (none of these can occur inside base64)
    doc = json.loads(data)
    results = doc["results"]
    assert [r["file"] for r in results] == ["chest one.png", "notes.txt", "study.dcm", "evil.png", "cut.png"]
    assert results[1]["error"].startswith("not an image file (unrecognised format, 19 bytes)")
    assert results[3]["error"] == "empty file (0 bytes)"
    assert results[4]["error"].startswith("truncated or corrupt PNG data")
    png, dcm = results[0], results[2]
    assert png["error"] is None and dcm["error"] is None
    probs, found = reference([good])
    table = {row["label"]: row for row in png["table"]}
    assert [r["probability"] for r in png["table"]] == sorted((r["probability"] for r in png["table"]), reverse=True)
    for j, label in enumerate(serve_export["labels"]):
        assert table[label]["probability"] == pytest.approx(probs[0, j], abs=1e-5)
        assert table[label]["threshold"] == pytest.approx(serve_export["thresholds"][j], abs=1e-12)
        assert table[label]["finding"] == bool(found[0, j])
    assert png["findings"] == [r["label"] for r in png["table"] if r["finding"]]
    assert (png["width"], png["height"]) == (512, 512) and png["preview"].startswith("data:image/png;base64,")
    assert [h["label"] for h in png["heatmaps"]] == [r["label"] for r in png["table"][:2]]
    for h in png["heatmaps"] + dcm["heatmaps"]:
        raw = base64.b64decode(h["image"].split(",", 1)[1])
        assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 10_000
    for h in png["heatmaps"]:  # drawn by the Keras model the export was made from: the same probabilities
        assert h["probability"] == pytest.approx(table[h["label"]]["probability"], abs=1e-4)
    from cxrkeras.export.predict import read_file_bytes

    dprobs, _ = reference([read_file_bytes(dicom_path)])  # the `cxrkeras predict` path for DICOM
    np.testing.assert_allclose([dict((r["label"], r["probability"]) for r in dcm["table"])[lbl]
                                for lbl in serve_export["labels"]], dprobs[0], atol=1e-5, rtol=0)
    assert doc["model"]["notice"].startswith("Research tool, not a medical device")
    _no_files_left(server)
    # one chosen label instead of the top k; and an upload where nothing can be read is a 400 naming each file
    body, ctype = multipart([("a.png", good)], {"label": "Effusion"})
    status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    assert status == 200 and [h["label"] for h in json.loads(data)["results"][0]["heatmaps"]] == ["Effusion"]
    body, ctype = multipart([("a.txt", b"text"), ("b.png", b""), ("huge.png", _huge_png_header()),
                             ("bomb.gif", huge_gif())])
    status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    err = json.loads(data)["error"]
    assert status == 400 and "a.txt: not an image file" in err and "b.png: empty file" in err
    assert "huge.png: the image declares 20000x20000 pixels, over the limit" in err
    assert "bomb.gif: the image declares too many pixels" in err
    for fields, expected in (({"label": "Nope"}, "not one of the model's labels"), ({"top_k": "99"}, "top_k must"),
                             ({}, None)):
        body, ctype = multipart([] if expected is None else [("a.png", good)], fields)
        status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
        assert status == 400 and (expected or "no file uploaded") in json.loads(data)["error"]
    body, ctype = multipart([(f"{i}.png", good) for i in range(9)])
    status, _, data = server.request("POST", "/api/analyze", body, {"Content-Type": ctype})
    assert status == 400 and "Too many files" in json.loads(data)["error"]
    _no_files_left(server)


def test_page_and_assets_are_served_from_the_package_only(server):
    status, headers, data = server.request("GET", "/")
    page = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "Research tool, not a medical device" in page and 'id="files"' in page and "multiple" in page
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and headers["x-content-type-options"]
    for asset in ("/static/app.js", "/static/style.css"):
        status, _, data = server.request("GET", asset)
        assert status == 200 and len(data) > 1000
        assert b"http://" not in data and b"https://" not in data and b"//cdn" not in data  # nothing from elsewhere
    assert "http://" not in page and "https://" not in page
    status, _, data = server.request("GET", "/static/../../setup.cfg")
    assert status == 404


def _load(server, blobs, expected, requests, clients):
    """`requests` one-image predict requests from `clients` threads; the error list (wrong outputs included)."""
    from cxrkeras.serve.loadtest import run_load

    def check(i, status, body):
        if status != 200:
            return f"HTTP {status}: {body[:200]!r}"
        got = np.asarray(json.loads(body)["predictions"][0]["probabilities"])
        diff = float(np.max(np.abs(got - expected[i % len(blobs)])))
        return None if diff <= 1e-5 else f"wrong output (max |diff| {diff:.2e})"

    bodies = [json.dumps(instances([b])) for b in blobs]
    latencies, errors, _ = run_load(server.host, server.port, "/v1/models/tiny:predict", bodies, requests, clients,
                                    check)
    assert len(latencies) == requests
    return errors


def test_load_200_requests_from_8_clients_zero_errors(server, reference):
    """Correctness under load only; latency figures: tools/bench_serve.py."""
    blobs = [read_sample(n) for n in NAMES]
    expected, _ = reference(blobs)
    before = server.json("GET", "/healthz")[1]
    errors = _load(server, blobs, expected, requests=200, clients=8)
    assert errors == []
    after = server.json("GET", "/healthz")[1]
    assert after["images"] - before["images"] == 200  # every request reached the model once


def test_concurrent_good_and_bad_requests_each_get_their_own_answer(server, reference):
    """Batching joins requests into one model call: a bad item must fail only its own request, named by its index
    within that request, and every good request must get its own images' outputs."""
    blobs = [read_sample(n) for n in NAMES]
    expected, _ = reference(blobs)
    rng = np.random.default_rng(0)
    plans = []
    for i in range(48):
        picks = [int(k) for k in rng.integers(0, len(blobs), int(rng.integers(1, 4)))]
        bad_at = int(rng.integers(0, len(picks) + 1)) if i % 3 == 0 else None
        plans.append((picks, bad_at))

    def run(plan):
        picks, bad_at = plan
        items = [blobs[k] for k in picks]
        if bad_at is not None:
            items.insert(bad_at, b"plain text, not an image")
        status, doc = _predict(server, instances(items))
        if bad_at is not None:
            return status == 400 and doc["error"].startswith(f"image_bytes[{bad_at}]: not a PNG or JPEG"), doc
        got = np.asarray([p["probabilities"] for p in doc.get("predictions", [])])
        return status == 200 and got.shape == (len(picks), 14) and \
            np.max(np.abs(got - expected[picks])) <= 1e-5, doc

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(run, plans))
    wrong = [(plan, doc) for plan, (ok, doc) in zip(plans, outcomes) if not ok]
    assert not wrong, wrong[:3]


def test_serve_cli_defaults_and_missing_extra(monkeypatch, serve_export):
    from cxrkeras.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "this machine only (there is no authentication). [default: 127.0.0.1]" in text
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)  # as if `cxrkeras[serve]` were not installed
    result = CliRunner().invoke(cli, ["serve", "--model", serve_export["base"]])
    assert result.exit_code == 1 and "pip install 'cxrkeras[serve]'" in result.output
    assert "Traceback" not in result.output
