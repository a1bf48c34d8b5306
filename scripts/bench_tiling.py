"""Large images: tiled across a local fleet against whole on one worker.

    python scripts/bench_tiling.py [--megapixels 100] [--repeat 3]

For a 100 MP JPEG derived from the test photographs, on local fleets of 1 and 2
workers, it prints the wall time of POST /process tiled and whole, and the
coordinator's own work (split: tile PNG encoding; transfer: request time less the
peers' processing; stitch), per request. It also measures the lossless formats a
tile could travel in, and prints the per-tile cost and transfer rate that the
README's scaling model uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import numpy as np
import requests

from fleet.local.provider import server_command
from fleet.local.runtime import LocalFleet
from scripts.benchlib import derived, jpeg, with_nonce

TILE_SIZE = 2048
OPERATIONS = {
    "gaussian_blur": {"ksize": 15},
    "bilateral": {"diameter": 9},
}


def tile_formats() -> None:
    """Which lossless encoding a tile should travel in: time against size."""
    tile = derived(TILE_SIZE, TILE_SIZE)
    print("| tile encoding (2048x2048 RGB) | encode ms | decode ms | bytes |")
    print("|---|---:|---:|---:|")
    candidates = {
        "PNG level 0, no filter (used)": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 0,
                                                   cv2.IMWRITE_PNG_FILTER,
                                                   cv2.IMWRITE_PNG_FILTER_NONE]),
        "PNG level 0 (stored)": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 0]),
        "PNG level 1": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
        "PNG level 3 (OpenCV default)": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
        "WebP lossless": (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    }
    for label, (ext, params) in candidates.items():
        enc, dec = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ok, buf = cv2.imencode(ext, tile, params)
            t1 = time.perf_counter()
            back = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            t2 = time.perf_counter()
            assert ok and np.array_equal(back, tile), label
            enc.append(t1 - t0)
            dec.append(t2 - t1)
        print(f"| {label} | {statistics.median(enc) * 1000:.0f} | "
              f"{statistics.median(dec) * 1000:.0f} | {len(buf):,} |", flush=True)
    print()


def with_flags(*flags: str):
    def command(launch):
        return [*server_command(launch), *flags]
    return command


def measure(data: bytes, workers: int, tiled: bool, repeat: int, nonce: list[int]):
    flags = ("--tile-mp", "20" if tiled else "100000", "--tile-size", str(TILE_SIZE),
             "--max-bytes", str(200 * 2**20))
    rows = {}
    with tempfile.TemporaryDirectory(prefix="imagefleet-tiling-") as tmp, LocalFleet(
            workers=workers, storage_dir=Path(tmp), command=with_flags(*flags),
            run_dir=Path(tmp) / "run") as fleet:
        deadline = time.monotonic() + 60
        while fleet.healthy_count() < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        session = requests.Session()
        for op, params in OPERATIONS.items():
            walls, bodies = [], []
            for _ in range(repeat):
                nonce[0] += 1
                t0 = time.perf_counter()
                resp = session.post(f"{fleet.endpoint}/process",
                                    files={"image": ("big.jpg", with_nonce(data, nonce[0]),
                                                     "image/jpeg")},
                                    data={"operation": op, "params": json.dumps(params)},
                                    timeout=600)
                walls.append(time.perf_counter() - t0)
                resp.raise_for_status()
                bodies.append(resp.json())
            rows[op] = (statistics.median(walls), bodies[len(bodies) // 2])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tile_formats()

    side = int((args.megapixels * 1e6) ** 0.5)
    image = derived(side, side)
    data = jpeg(image, 90)
    print(f"input: {side}x{side} JPEG, {len(data) / 1e6:.1f} MB; tiles {TILE_SIZE}px")
    print()
    print("| workers | operation | whole s | tiled s | speed-up | tiles | split s | "
          "transfer s | stitch s | per-tile worker ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    nonce = [0]
    for workers in (1, 2):
        whole = measure(data, workers, False, args.repeat, nonce)
        tiled = measure(data, workers, True, args.repeat, nonce)
        for op in OPERATIONS:
            w_wall, _ = whole[op]
            t_wall, body = tiled[op]
            t = body["timings_ms"]
            tiles = body["tiles"]
            split = t.get("tiles_encode_sum", 0) / 1000
            worker = t.get("tiles_worker_sum", 0)
            transfer = (t.get("tiles_request_sum", 0) - worker + t.get("tiles_decode_sum", 0))
            print(f"| {workers} | {op} | {w_wall:.2f} | {t_wall:.2f} | {w_wall / t_wall:.2f}x | "
                  f"{tiles} | {split:.2f} | {transfer / 1000:.2f} | "
                  f"{t.get('tiles_stitch', 0) / 1000:.2f} | {worker / max(tiles, 1):.0f} |",
                  flush=True)
            if workers == 1:
                mb = t.get("tiles_bytes_sum", 0) / 1e6
                print(f"<!-- {op}: {mb:.0f} MB moved for tiles; request time "
                      f"{t.get('tiles_request_sum', 0) / 1000:.2f} s summed -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
