"""A bounded load client for `cxrkeras serve` on loopback: N POSTs from C threads, latencies and errors."""

import concurrent.futures
import http.client
import threading
import time


def run_load(host, port, path, bodies, requests, clients, check=None, timeout=120.0):
    """Send `requests` POST requests of JSON `bodies[i % len(bodies)]` to `path` from `clients` threads, each on a
    keep-alive connection; returns (latencies in ms, errors [(i, reason)], wall seconds).

    check(i, status, body) returns None for a good answer, else the reason; by default any status but 200 is an
    error. A connection error counts as an error too, and the client reconnects. Bounded: `requests` in all, each
    with a `timeout` in seconds."""
    if not 1 <= int(requests) <= 100_000 or not 1 <= int(clients) <= 256:
        raise ValueError("requests must be 1 to 100000 and clients 1 to 256")
    check = check or (lambda i, status, body: None if status == 200 else f"HTTP {status}: {body[:200]!r}")
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(int(requests)))

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    conn.request("POST", path, bodies[i % len(bodies)], {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    reason = check(i, resp.status, resp.read())
                except (OSError, http.client.HTTPException) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                ms = (time.perf_counter() - start) * 1000.0
                with lock:
                    latencies.append(ms)
                    if reason is not None:
                        errors.append((i, reason))
        finally:
            conn.close()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(int(clients)) as pool:
        for future in [pool.submit(client) for _ in range(int(clients))]:
            future.result()
    return latencies, errors, time.perf_counter() - start
