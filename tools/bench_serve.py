"""Benchmark `cxrkeras serve` on loopback: latency (p50/p95/p99), throughput and errors of POST :predict.

Exports densenet121-lka-last2 (weights=None, 224x224, 14 labels) unless --model names an export, then runs, side by
side in one run, each on the 9 bundled real NIH images (512 px PNG, one image per request):
  * the SavedModel called in this process, one image per call, one call at a time (what a script would run),
  * `cxrkeras serve --max-batch 1`: concurrent requests served one model call each, in turn,
  * `cxrkeras serve --max-batch 32`: concurrent requests batched into shared model calls (the default),
the servers with --requests requests from --clients concurrent clients (keep-alive connections). Bounded: every
request has a 120 s timeout and the run ends after the requests given. Loopback only.
Usage: python tools/bench_serve.py [--requests 200] [--clients 8] [--model EXPORT]
"""

import argparse
import base64
import http.client
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, os.pardir, "cxrkeras", "sample_data", "nih-512px", "images")


def _body(blob):
    return json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(blob).decode()}}]}).encode()


def _load(host, port, name, bodies, requests, clients):
    """(latencies in ms, errors, wall seconds) of `requests` POSTs from `clients` threads."""
    from cxrkeras.serve.loadtest import run_load

    def check(i, status, body):
        if status != 200:
            return f"HTTP {status}: {body[:200]!r}"
        return None if len(json.loads(body)["predictions"]) == 1 else "not one prediction"

    return run_load(host, port, f"/v1/models/{name}:predict", bodies, requests, clients, check)


def _health(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _row(name, latencies, errors, wall, per_call="1"):
    p50, p95, p99 = (float(np.percentile(latencies, q)) for q in (50, 95, 99))
    return (name, len(latencies), len(errors), p50, p95, p99, len(latencies) / wall, per_call)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an export folder (default: export densenet121-lka-last2, weights=None)")
    ap.add_argument("--variant", default="densenet121-lka-last2")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args(argv)
    if not (1 <= args.requests <= 10000 and 1 <= args.clients <= 64):
        ap.error("--requests must be 1 to 10000 and --clients 1 to 64")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from cxrkeras.serve.process import ServerProcess

    blobs = []
    for name in sorted(os.listdir(IMAGES)):
        with open(os.path.join(IMAGES, name), "rb") as f:
            blobs.append(f.read())
    bodies = [_body(b) for b in blobs]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from cxrkeras.export.savedmodel import export
            from cxrkeras.models import build_model

            keras_path = os.path.join(tmp, "bench.keras")
            build_model(args.variant, weights=None, input_shape=(224, 224, 3)).save(keras_path)
            model = os.path.join(tmp, "bench")
            export(keras_path, model, verify=False, log=lambda *_: None)
        from cxrkeras.export.predict import load_predictor

        predictor = load_predictor(model, log=lambda *_: None)
        with open(os.path.join(predictor.path, "assets", "export_info.json"), encoding="utf-8") as f:
            info = json.load(f)
        for b in blobs[:3]:
            predictor([b])  # warm-up
        direct = []
        t0 = time.perf_counter()
        for i in range(args.requests):
            t = time.perf_counter()
            predictor([blobs[i % len(blobs)]])
            direct.append((time.perf_counter() - t) * 1000.0)
        rows = [_row("SavedModel in this process, 1 image per call, sequential", direct, [],
                     time.perf_counter() - t0)]
        del predictor
        for max_batch in (1, 32):
            with ServerProcess(model, "--name", "bench", "--max-batch", max_batch) as server:
                _load(server.host, server.port, "bench", bodies, 2 * args.clients, args.clients)  # warm-up
                before = _health(server.host, server.port)
                lat, errors, wall = _load(server.host, server.port, "bench", bodies, args.requests, args.clients)
                after = _health(server.host, server.port)
            calls = after["model_calls"] - before["model_calls"]
            per_call = f"{(after['images'] - before['images']) / max(calls, 1):.2f}"
            rows.append(_row(f"cxrkeras serve --max-batch {max_batch}, {args.clients} clients", lat, errors, wall,
                             per_call))
            if errors:
                print(f"errors ({len(errors)}), first: {errors[0]!r}", file=sys.stderr)

    origin = os.path.abspath(args.model) if args.model else "weights=None"
    print(f"# bench_serve: {info.get('variant')} at {info.get('image_size')} px ({origin}), {args.requests} "
          f"requests of one 512 px NIH PNG each, after {2 * args.clients} warm-up requests per server")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
          f"Python {sys.version.split()[0]}; loopback HTTP/1.1, keep-alive")
    print()
    print("| path | requests | errors | p50 (ms) | p95 (ms) | p99 (ms) | requests/s | images per model call |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, err, p50, p95, p99, rps, per_call in rows:
        print(f"| {name} | {n} | {err} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {rps:.1f} | {per_call} |")
    ref = rows[0][6]
    print()
    print("throughput vs the in-process SavedModel: " + ", ".join(f"{r[0].split(',')[0]}: {r[6] / ref:.2f}x"
                                                                     for r in rows[1:]))
    return 1 if any(r[2] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
