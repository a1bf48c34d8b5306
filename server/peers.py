"""Sending tiles to peers through the load balancer (urllib3, already a botocore
dependency, with an explicit pool, timeouts and no automatic retries: the tiler
decides what to retry)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import cv2
import numpy as np
import urllib3

from server.codecs import encode_uncompressed_png
from server.operations import Image
from server.pipeline import Step
from server.tiling import TILE_HEADER, TileError

log = logging.getLogger(__name__)

def _worker_ms(header: str | None) -> float | None:
    """The peer's own decode + process + encode time, from its X-Timings header."""
    if not header:
        return None
    try:
        timings = json.loads(header)
        return float(sum(timings.get(k, 0.0) for k in ("read", "decode", "process", "encode")))
    except (ValueError, TypeError, AttributeError):
        return None


class PeerClient:
    """Sends tiles to `base_url`. `tile_credential` (Storage.tile_credentials().send)
    marks them as internal, so the peer answers without storing them and in
    uncompressed PNG; without it, tiles are ordinary requests (stored, compressed).
    ``token`` and ``tile_credential`` may be functions, asked on every tile, so a token
    rotated under a running server is used at once."""

    def __init__(self, base_url: str, token: str | Callable[[], str | None] | None = None, *,
                 connect_timeout: float = 3.0, read_timeout: float = 120.0,
                 pool_size: int = 16,
                 tile_credential: str | Callable[[], str | None] | None = None):
        self.base_url = base_url.rstrip("/")
        self._token = token if callable(token) else (lambda: token)
        self._credential = (tile_credential if callable(tile_credential)
                            else (lambda: tile_credential))
        self._pool = urllib3.PoolManager(
            maxsize=pool_size, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        )

    def __call__(self, steps: tuple[Step, ...], window: Image,
                 timings: dict[str, float]) -> Image:
        t0 = time.perf_counter()
        buf = encode_uncompressed_png(window)
        t1 = time.perf_counter()
        fields = {
            "image": ("tile.png", buf, "image/png"),
            "steps": json.dumps([step.to_json() for step in steps]),
            "format": "png",
        }
        try:
            resp = self._pool.request("POST", f"{self.base_url}/process?response=image",
                                      fields=fields, headers=self._headers())
        except urllib3.exceptions.HTTPError as exc:
            raise TileError(f"peer unreachable: {exc}") from exc
        if resp.status != 200:
            raise TileError(f"peer answered {resp.status}: {resp.data[:200]!r}")
        t2 = time.perf_counter()
        result = cv2.imdecode(np.frombuffer(resp.data, np.uint8), cv2.IMREAD_UNCHANGED)
        if result is None or result.shape[:2] != window.shape[:2]:
            raise TileError("peer returned an undecodable or wrongly sized tile")
        timings["encode"] = (t1 - t0) * 1000
        timings["decode"] = (time.perf_counter() - t2) * 1000
        timings["request"] = (t2 - t1) * 1000
        timings["bytes"] = float(len(buf) + len(resp.data))
        worker = _worker_ms(resp.headers.get("X-Timings"))
        if worker is not None:
            timings["worker"] = worker
        return result

    def _headers(self) -> dict[str, str]:
        headers = {}
        credential, token = self._credential(), self._token()
        if credential:
            headers[TILE_HEADER] = credential
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def close(self) -> None:
        self._pool.clear()
