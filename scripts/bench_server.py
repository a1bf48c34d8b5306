"""Per-request latency through HTTP against in-process OpenCV, and throughput.

    python scripts/bench_server.py [--repeat 9] [--requests 48]

For a 12 MP and a 2K JPEG derived from the test photographs it prints:
- the median latency of POST /process?response=image (upload, decode, operation,
  encode, storage, download) against the same decode + operation + encode done
  in-process with OpenCV, and their ratio;
- requests per second at concurrency 2, 4 and 8.
Every request carries distinct bytes (a unique JPEG comment), so the result cache
never answers; in-process runs decode the same bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import requests

from scripts.benchlib import derived, jpeg, median_ms, server_process, with_nonce

SIZES = {"12MP": (4000, 3000), "2K": (2048, 1365)}


def direct(name: str, data: bytes) -> bytes:
    """The in-process baseline: what a script calling OpenCV itself would do."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if name == "grayscale":
        out = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif name == "gaussian_blur":
        out = cv2.GaussianBlur(image, (15, 15), 0)
    elif name == "canny":
        out = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), 100, 200)
    else:
        h, w = image.shape[:2]
        scale = min(512 / w, 512 / h)
        out = cv2.resize(image, (round(w * scale), round(h * scale)),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


OPS = {
    "grayscale": {},
    "gaussian_blur": {},
    "canny": {},
    "resize": {"width": 512, "height": 512, "mode": "fit"},
}


def post(session: requests.Session, url: str, data: bytes, op: str,
         shed: list[int] | None = None) -> bytes:
    """One request; a 503 ``overloaded`` (more in flight than the server admits) is
    retried after its ``Retry-After``, as the client does, and counted in ``shed``."""
    while True:
        resp = session.post(f"{url}/process?response=image",
                            files={"image": ("bench.jpg", data, "image/jpeg")},
                            data={"operation": op, "params": json.dumps(OPS[op])}, timeout=120)
        if resp.status_code != 503 or "Retry-After" not in resp.headers:
            resp.raise_for_status()
            return resp.content
        if shed is not None:
            shed.append(1)
        time.sleep(float(resp.headers["Retry-After"]))  # what the server asked for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="latency samples per case")
    parser.add_argument("--requests", type=int, default=48, help="requests per throughput run")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for python -m server (repeatable)")
    args = parser.parse_args()
    nonce = count()
    sources = {label: jpeg(derived(w, h)) for label, (w, h) in SIZES.items()}

    with server_process(*args.server_arg) as server:
        session = requests.Session()
        post(session, server.url, with_nonce(sources["2K"], next(nonce)), "grayscale")  # warm
        print("| image | operation | in-process ms | HTTP ms | ratio |")
        print("|---|---|---:|---:|---:|")
        for label, data in sources.items():
            for op in OPS:
                local, remote = [], []
                for _ in range(args.repeat):
                    sample = with_nonce(data, next(nonce))
                    t0 = time.perf_counter()
                    direct(op, sample)
                    t1 = time.perf_counter()
                    post(session, server.url, sample, op)
                    t2 = time.perf_counter()
                    local.append(t1 - t0)
                    remote.append(t2 - t1)
                lm, rm = median_ms(local), median_ms(remote)
                print(f"| {label} | {op} | {lm:.1f} | {rm:.1f} | {rm / lm:.2f}x |", flush=True)

        print()
        print("Where the time goes (medians, ms; HTTP = client wall time - server total):")
        print()
        parts = ("read", "decode", "process", "encode", "store")
        print("| image | operation | " + " | ".join(parts) + " | other server | HTTP |")
        print("|---|---|" + "---:|" * (len(parts) + 2))
        for label, data in sources.items():
            for op in ("resize", "gaussian_blur"):
                samples: dict[str, list[float]] = {k: [] for k in (*parts, "other", "http")}
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    resp = session.post(f"{server.url}/process",
                                        files={"image": ("b.jpg", with_nonce(data, next(nonce)),
                                                         "image/jpeg")},
                                        data={"operation": op, "params": json.dumps(OPS[op])})
                    wall = (time.perf_counter() - t0) * 1000
                    timings = resp.json()["timings_ms"]
                    for k in parts:
                        samples[k].append(timings.get(k, 0.0))
                    samples["other"].append(timings["total"] - sum(timings.get(k, 0.0)
                                                                   for k in parts))
                    samples["http"].append(wall - timings["total"])
                cells = " | ".join(f"{statistics.median(samples[k]):.1f}"
                                   for k in (*parts, "other", "http"))
                print(f"| {label} | {op} | {cells} |", flush=True)

        print()
        print("| image | operation | concurrency | requests/s | median ms | shed (retried) |")
        print("|---|---|---:|---:|---:|---:|")
        for label, data in sources.items():
            for op in ("gaussian_blur", "resize"):
                for concurrency in (2, 4, 8):
                    payloads = [with_nonce(data, next(nonce)) for _ in range(args.requests)]
                    latencies: list[float] = []
                    shed: list[int] = []

                    def one(payload: bytes, latencies=latencies, op=op, shed=shed) -> None:
                        t0 = time.perf_counter()
                        post(requests_session(), server.url, payload, op, shed)
                        latencies.append(time.perf_counter() - t0)

                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(concurrency) as pool:
                        list(pool.map(one, payloads))
                    elapsed = time.perf_counter() - t0
                    print(f"| {label} | {op} | {concurrency} | {len(payloads) / elapsed:.1f} | "
                          f"{median_ms(latencies):.0f} | {len(shed)} |", flush=True)
    return 0


_SESSIONS: dict[int, requests.Session] = {}


def requests_session() -> requests.Session:
    import threading

    ident = threading.get_ident()
    if ident not in _SESSIONS:
        _SESSIONS[ident] = requests.Session()
    return _SESSIONS[ident]


if __name__ == "__main__":
    sys.exit(main())
