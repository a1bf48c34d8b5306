"""Shared pieces of the benchmark scripts: test inputs, a server process, statistics.

Benchmarks print their figures; they are scripts, not tests. Inputs are derived from
the shared test photographs at run time (nothing large is committed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fleet.local.provider import free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "testdata" / "images"


def photo(name: str) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name), cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"test photograph {IMAGES / name} not found")
    return image


def derived(width: int, height: int, source: str = "hubble_deep_field.jpg") -> np.ndarray:
    """A photograph scaled (with mirrored tiling for very large sizes) to width x height."""
    image = photo(source)
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    if scale <= 4:
        big = cv2.resize(image, (round(w * scale) + 1, round(h * scale) + 1),
                         interpolation=cv2.INTER_CUBIC)
    else:
        # Beyond 4x an upscale is mostly blur; mirrored tiles keep real detail.
        base = cv2.resize(image, (w * 4, h * 4), interpolation=cv2.INTER_CUBIC)
        reps_y, reps_x = -(-height // base.shape[0]), -(-width // base.shape[1])
        rows = [np.hstack([base if (x % 2 == 0) else base[:, ::-1] for x in range(reps_x)])
                for _ in range(reps_y)]
        big = np.vstack([r if i % 2 == 0 else r[::-1] for i, r in enumerate(rows)])
    return np.ascontiguousarray(big[:height, :width])


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def multipart_body(image: bytes, filename: str, fields: dict[str, str],
                   boundary: str = "imagefleet-bench-7d1c0f4e") -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type, built directly: what a lean
    client sends, without aiohttp.FormData's per-request machinery (the client shares
    the CPU with the servers it measures)."""
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n').encode()
    tail = b"".join(f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                    f"\r\n\r\n{value}".encode() for name, value in fields.items())
    return (head + image + tail + f"\r\n--{boundary}--\r\n".encode(),
            f"multipart/form-data; boundary={boundary}")


def with_nonce(data: bytes, nonce: int) -> bytes:
    """The same JPEG with a unique comment segment: identical pixels, different bytes,
    so the server's content-addressed cache cannot answer it."""
    assert data[:2] == b"\xff\xd8"
    text = f"bench-{nonce}".encode()
    segment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
    return data[:2] + segment + data[2:]


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.05)


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen


@contextlib.contextmanager
def server_process(*args: str, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="imagefleet-bench-") as tmp:
        cmd = [sys.executable, "-m", "server", "--port", str(port), "--storage",
               str(Path(tmp) / "storage"), "--log-level", "WARNING", *args]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})})
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health")
            yield ServerProcess(f"http://127.0.0.1:{port}", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
