"""What each layer of a request costs: the same 2K "fit 512, JPEG q80" request served by
servers that do progressively more, all under waitress, measured in one run.

    python scripts/bench_layers.py [--requests 300] [--rounds 3] [--concurrency 8]

Layers (each includes the ones above it):
- bare: a WSGI function that reads a raw JPEG body, decodes it at 1/2 scale, resizes
  (area) and encodes; the least any Python server on waitress can do for this request;
- multipart: the body is a multipart form, parsed by our request class;
- validate: the pipeline is parsed, the header probed, the input hashed, the key derived;
- store: the original and the result are written to folder storage;
- server: the real `python -m server` (Flask, logging, cache lookup, processing slots);
- server x2: the same with `--workers 2`;
- thumbor (with `--thumbor PATH`, as scripts/bench_vs_thumbor.sh installs it): one
  process per core reading the same images from a folder, for scale.
Prints requests/s per layer and its ratio to `bare`, per round. The client builds
each body once per request (a unique JPEG comment defeats every cache).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import cv2
import numpy as np

from scripts.bench_vs_thumbor import PHOTOS, drive, thumbor_config
from scripts.benchlib import IMAGES, free_port, jpeg, multipart_body, wait_for_http, with_nonce

LAYERS = ("bare", "multipart", "validate", "store")
FIT = json.dumps([{"op": "resize", "width": 512, "height": 512, "mode": "fit"}])


def layer_app(layer: str, storage_dir: str):
    """A WSGI app doing the work of `layer` and every layer before it."""
    from server import codecs
    from server.app import InMemoryUploadRequest, result_key
    from server.operations import default_registry
    from server.pipeline import parse_pipeline
    from server.storage import FolderStorage

    depth = LAYERS.index(layer)
    registry = default_registry()
    storage = FolderStorage(Path(storage_dir))

    def compute(data: bytes) -> bytes:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
        h, w = image.shape[:2]
        scale = min(512 / (2 * w), 512 / (2 * h))
        size = (round(2 * w * scale), round(2 * h * scale))
        return jpeg(cv2.resize(image, size, interpolation=cv2.INTER_AREA), 80)

    def app(environ, start_response):
        if depth == 0:
            data = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        else:
            request = InMemoryUploadRequest(environ)
            data, steps = request.files["image"].read(), request.form.get("steps")
        if depth >= 2:
            pipeline = parse_pipeline(registry, None, None, steps)
            codecs.probe(data, 100_000_000)
            digest = hashlib.sha256(data).hexdigest()
            key = result_key(digest, pipeline, "jpeg", 80)
        body = compute(data)
        if depth >= 3:
            storage.put(f"originals/{digest}.jpg", data, "image/jpeg")
            storage.put(f"results/{key}", body, "image/jpeg", {"pipeline": pipeline.canonical()})
        start_response("200 OK", [("Content-Type", "image/jpeg"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve_layer(layer: str, port: int, storage_dir: str) -> None:
    from waitress import serve

    from server.__main__ import INBUF_OVERFLOW, RECV_BYTES

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    serve(layer_app(layer, storage_dir), host="127.0.0.1", port=port, threads=16,
          recv_bytes=RECV_BYTES, inbuf_overflow=INBUF_OVERFLOW, _quiet=True)


def make_inputs(folder: Path) -> list[bytes]:
    """The 2K JPEGs, also written to `folder` for thumbor's file loader."""
    out = []
    for name in PHOTOS:
        image = cv2.imread(str(IMAGES / name), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        data = jpeg(cv2.resize(image, (2048, round(h * 2048 / w)),
                               interpolation=cv2.INTER_CUBIC), 90)
        (folder / f"{len(out)}.jpg").write_bytes(data)
        out.append(data)
    return out


async def measure(args: argparse.Namespace, urls: dict[str, str], inputs: list[bytes]) -> None:
    nonce = count()
    results: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        def requester(name: str, url: str):
            async def one(i: int) -> bytes:
                if name == "thumbor":
                    base = url[i % len(url)] if isinstance(url, list) else url
                    async with session.get(f"{base}/unsafe/fit-in/512x512/filters:quality(80)/"
                                           f"{i % len(inputs)}.jpg") as resp:
                        return await resp.read()
                data = with_nonce(inputs[i % len(inputs)], next(nonce))
                if name == "bare":
                    body, content_type = data, "image/jpeg"
                else:
                    body, content_type = multipart_body(data, "photo.jpg",
                                                        {"steps": FIT, "quality": "80"})
                async with session.post(url, data=body,
                                        headers={"Content-Type": content_type}) as resp:
                    answer = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{name}: {resp.status} {answer[:200]!r}")
                    return answer
            return one

        for round_number in range(1, args.rounds + 1):
            row = {}
            for name, url in urls.items():
                one = requester(name, url)
                await drive(one, 16, args.concurrency)  # warm up
                row[name], _, _ = await drive(one, args.requests, args.concurrency)
                results[name].append(row[name] / row["bare"])
            print(f"round {round_number}: " + "  ".join(
                f"{name} {rps:.1f} req/s ({rps / row['bare']:.2f})" for name, rps in row.items()),
                flush=True)
    print()
    print("| layer | median ratio to bare |")
    print("|---|---:|")
    for name, ratios in results.items():
        print(f"| {name} | {statistics.median(ratios):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--thumbor", help="thumbor executable, to add it as a row")
    parser.add_argument("--serve", nargs=3, metavar=("LAYER", "PORT", "STORAGE"),
                        help=argparse.SUPPRESS)  # internal: run one layer's server
    args = parser.parse_args()
    if args.serve:
        serve_layer(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0
    processes: list[subprocess.Popen] = []
    urls: dict[str, str | list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="imagefleet-layers-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        inputs = make_inputs(folder)
        try:
            for layer in LAYERS:
                port = free_port()
                processes.append(subprocess.Popen(
                    [sys.executable, __file__, "--serve", layer, str(port), f"{tmp}/{layer}"]))
                urls[layer] = f"http://127.0.0.1:{port}/"
            for name, workers in (("server", "1"), ("server x2", "2")):
                port = free_port()
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "server", "--port", str(port), "--storage",
                     f"{tmp}/{name}", "--workers", workers, "--log-level", "WARNING"],
                    cwd=Path(__file__).resolve().parents[1]))
                urls[name] = f"http://127.0.0.1:{port}/process?response=image"
            if args.thumbor:
                thumbor_config(folder, Path(tmp) / "thumbor.conf")
                ports = [free_port() for _ in range(2)]
                processes += [subprocess.Popen(
                    [args.thumbor, "-p", str(port), "-i", "127.0.0.1", "-c",
                     f"{tmp}/thumbor.conf", "-l", "error"], stdout=subprocess.DEVNULL)
                    for port in ports]
                urls["thumbor"] = [f"http://127.0.0.1:{port}" for port in ports]
                for base in urls["thumbor"]:
                    wait_for_http(f"{base}/healthcheck")
            for url in urls.values():
                if isinstance(url, list):
                    continue
                if "/process" in url:
                    wait_for_http(url.split("/process")[0] + "/health")
                else:
                    _wait_for_layer(url)
            asyncio.run(measure(args, urls, inputs))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
    return 0


def _wait_for_layer(url: str) -> None:
    """The layer servers answer only POST: wait until the port accepts connections."""
    import socket

    host, port = url.split("//")[1].rstrip("/").split(":")
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
