"""Driver for scripts/bench_vs_thumbor.sh: both servers, the same aiohttp client.

Workloads (each at concurrency 2 and 8):
- 2K JPEGs derived from the test photographs, fitted within 512x512, JPEG quality 80;
- the same with grayscale, and with a Gaussian blur (radius 2) added on each side;
- a 12 MP JPEG fitted within 512x512.
Prints requests/s, p50 and p95 latency, peak RSS, the ours/thumbor ratio, and output
quality: PSNR against a float area-interpolated reference of the full-size decode, for
the delivered JPEG and for a lossless PNG of the same request (the resize alone), and
the JPEG's bytes.
Our requests carry distinct bytes (a unique JPEG comment), so our result cache never
answers; thumbor runs without result storage, so both compute every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import cv2
import numpy as np

from scripts.benchlib import (
    IMAGES,
    derived,
    free_port,
    jpeg,
    multipart_body,
    percentile,
    server_process,
    wait_for_http,
    with_nonce,
)

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
          "retina.jpg", "rocket.jpg", "camera.png"]


@dataclass(frozen=True)
class Workload:
    name: str
    images: tuple[str, ...]
    ours: list[dict]           # pipeline steps
    thumbor_filters: str       # after quality(80)
    quality_ref: str           # "resize", "gray" or "" (no PSNR)


def make_inputs(folder: Path) -> tuple[list[str], str]:
    names = []
    for photo in PHOTOS:
        image = cv2.imread(str(IMAGES / photo), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        big = cv2.resize(image, (2048, round(h * 2048 / w)), interpolation=cv2.INTER_CUBIC)
        name = f"{Path(photo).stem}-2k.jpg"
        (folder / name).write_bytes(jpeg(big, 90))
        names.append(name)
    (folder / "hubble-12mp.jpg").write_bytes(jpeg(derived(4000, 3000), 90))
    return names, "hubble-12mp.jpg"


def thumbor_config(folder: Path, path: Path) -> None:
    path.write_text(
        "LOADER = 'thumbor.loaders.file_loader'\n"
        f"FILE_LOADER_ROOT_PATH = {str(folder)!r}\n"
        "STORAGE = 'thumbor.storages.no_storage'\n"
        "RESULT_STORAGE = None\n"
        "ALLOW_UNSAFE_URL = True\n"
        "QUALITY = 80\n"
        "AUTO_WEBP = False\n"
        "MAX_AGE = 0\n"
    )


def process_tree(pid: int) -> list[int]:
    """pid and its children (a --workers supervisor and its workers)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def drive(make_request, n: int, concurrency: int) -> tuple[float, list[float], bytes]:
    """Run n requests, `concurrency` at a time; returns (req/s, latencies, last body)."""
    counter = count()
    latencies: list[float] = []
    last = b""

    async def worker() -> None:
        nonlocal last
        while (i := next(counter)) < n:
            t0 = time.perf_counter()
            last = await make_request(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), latencies, last


def psnr_against_reference(output: bytes, source: bytes, kind: str) -> float:
    out = cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_UNCHANGED)
    src = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)
    ref = cv2.resize(src, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_AREA)
    if kind == "gray":
        ref = cv2.cvtColor(ref, cv2.COLOR_BGR2GRAY)
        if out.ndim == 3:
            out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    mse = float(np.mean((out.astype(np.float32) - ref) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="imagefleet-vs-thumbor-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        small, large = make_inputs(folder)
        sources = {name: (folder / name).read_bytes() for name in [*small, large]}
        conf = Path(tmp) / "thumbor.conf"
        thumbor_config(folder, conf)
        # thumbor's recommended set-up: one single-threaded process per core behind a
        # balancer. The client round-robins over them (its own --processes forking
        # shares one socket, and kept-alive connections pile onto one process).
        ports = [free_port() for _ in range(args.thumbor_processes)]
        thumbors = [subprocess.Popen(
            [args.thumbor, "-p", str(port), "-i", "127.0.0.1", "-c", str(conf), "-l", "error"],
            stdout=subprocess.DEVNULL) for port in ports]
        thumbor_urls = [f"http://127.0.0.1:{port}" for port in ports]
        try:
            for url in thumbor_urls:
                wait_for_http(f"{url}/healthcheck")
            server_args = args.server_arg
            if not any(a.startswith("--workers") for a in server_args):
                server_args = [*server_args, "--workers", str(args.thumbor_processes)]
            with server_process(*server_args) as ours:
                await compare(args, ours.url, process_tree(ours.proc.pid), thumbor_urls,
                              [t.pid for t in thumbors], small, large, sources)
        finally:
            for thumbor in thumbors:
                thumbor.send_signal(signal.SIGTERM)
            for thumbor in thumbors:
                try:
                    thumbor.wait(10)
                except subprocess.TimeoutExpired:
                    thumbor.kill()


async def compare(args, ours_url, ours_pids, thumbor_urls, thumbor_pids, small, large,
                  sources) -> None:
    fit = {"op": "resize", "width": 512, "height": 512, "mode": "fit"}
    workloads = [
        Workload("2K fit 512", tuple(small), [fit], "", "resize"),
        Workload("2K fit 512 + grayscale", tuple(small), [fit, {"op": "grayscale"}],
                 ":grayscale()", "gray"),
        Workload("2K fit 512 + blur", tuple(small),
                 [fit, {"op": "gaussian_blur", "ksize": 5, "sigma": 2}], ":blur(2)", ""),
        Workload("12MP fit 512", (large,), [fit], "", "resize"),
    ]
    nonce = count()
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=120)
    print(f"Medians of {args.rounds} rounds; the ratio is the median of the per-round "
          "ratios (range in brackets).")
    print()
    print("| workload | conc. | server | req/s | p50 ms | p95 ms | ratio ours/thumbor |")
    print("|---|---:|---|---:|---:|---:|---:|")
    quality_rows = []
    for wl in workloads:
        n = args.requests if wl.images != (large,) else max(8, args.requests // 6)
        for concurrency in (2, 8):
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                async def ours(i: int, wl=wl, session=session) -> bytes:
                    name = wl.images[i % len(wl.images)]
                    body, content_type = multipart_body(
                        with_nonce(sources[name], next(nonce)), name,
                        {"steps": json.dumps(wl.ours), "quality": "80"})
                    async with session.post(f"{ours_url}/process?response=image", data=body,
                                            headers={"Content-Type": content_type}) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"ours: {resp.status} {body[:200]!r}")
                        return body

                async def theirs(i: int, wl=wl, session=session) -> bytes:
                    name = wl.images[i % len(wl.images)]
                    base = thumbor_urls[i % len(thumbor_urls)]
                    url = (f"{base}/unsafe/fit-in/512x512/"
                           f"filters:quality(80){wl.thumbor_filters}/{name}")
                    async with session.get(url) as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"thumbor: {resp.status} {url}")
                        return body

                await drive(ours, min(n, 32), concurrency)  # warm up both
                await drive(theirs, min(n, 32), concurrency)
                # Rounds alternate which server goes first, so a drift in the shared
                # machine's speed does not favour either; the ratio is taken per round.
                runs: dict[str, list[float]] = {"ours": [], "thumbor": []}
                latencies: dict[str, list[float]] = {"ours": [], "thumbor": []}
                ratios = []
                for round_number in range(args.rounds):
                    order = [("ours", ours), ("thumbor", theirs)]
                    for label, request in order if round_number % 2 == 0 else order[::-1]:
                        rps, lat, _ = await drive(request, n, concurrency)
                        runs[label].append(rps)
                        latencies[label] += lat
                    ratios.append(runs["ours"][-1] / runs["thumbor"][-1])
            for label in ("ours", "thumbor"):
                ratio = (f"{statistics.median(ratios):.2f}x "
                         f"({min(ratios):.2f}–{max(ratios):.2f})") if label == "ours" else ""
                lat = latencies[label]
                print(f"| {wl.name} | {concurrency} | {label} | "
                      f"{statistics.median(runs[label]):.1f} | "
                      f"{statistics.median(lat) * 1000:.0f} | "
                      f"{percentile(lat, 0.95) * 1000:.0f} | {ratio} |", flush=True)
        if wl.quality_ref:
            quality_rows.append(await quality(wl, ours_url, thumbor_urls[0], sources, nonce))
    print()
    print(f"peak RSS: ours {sum(map(peak_rss_mb, ours_pids)):.0f} MB ({len(ours_pids)} "
          f"processes), thumbor "
          f"{sum(map(peak_rss_mb, thumbor_pids)):.0f} MB ({len(thumbor_pids)} processes)")
    print()
    print("| workload | server | PSNR dB, lossless output | PSNR dB, JPEG q80 | JPEG bytes |")
    print("|---|---|---:|---:|---:|")
    for rows in quality_rows:
        for row in rows:
            print(row)


async def quality(wl: Workload, ours_url: str, thumbor_url: str, sources, nonce) -> list[str]:
    """PSNR of each server's output against the reference: as delivered (JPEG q80), and
    as a lossless PNG, which isolates the resize from the JPEG encoder's own loss."""
    scores: dict[str, dict[str, list[float]]] = {
        label: {"jpeg": [], "png": [], "bytes": []} for label in ("ours", "thumbor")}
    async with aiohttp.ClientSession() as session:
        for name in wl.images:
            for fmt in ("jpeg", "png"):
                form = aiohttp.FormData()
                form.add_field("image", with_nonce(sources[name], next(nonce)), filename=name,
                               content_type="image/jpeg")
                form.add_field("steps", json.dumps(wl.ours))
                form.add_field("quality", "80")
                form.add_field("format", fmt)
                async with session.post(f"{ours_url}/process?response=image",
                                        data=form) as resp:
                    body_o = await resp.read()
                extra = ":format(png)" if fmt == "png" else ""
                url = (f"{thumbor_url}/unsafe/fit-in/512x512/filters:quality(80)"
                       f"{wl.thumbor_filters}{extra}/{name}")
                async with session.get(url) as resp:
                    body_t = await resp.read()
                for label, body in (("ours", body_o), ("thumbor", body_t)):
                    scores[label][fmt].append(
                        psnr_against_reference(body, sources[name], wl.quality_ref))
                    if fmt == "jpeg":
                        scores[label]["bytes"].append(len(body))
    return [f"| {wl.name} | {label} | {statistics.mean(v['png']):.2f} | "
            f"{statistics.mean(v['jpeg']):.2f} | {statistics.mean(v['bytes']):.0f} |"
            for label, v in scores.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbor", required=True, help="path to the thumbor executable")
    parser.add_argument("--requests", type=int, default=160, help="requests per 2K run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each server per workload (default 3)")
    parser.add_argument("--thumbor-processes", type=int, default=os.cpu_count() or 2,
                        help="thumbor processes, each on its own port, and our --workers "
                             "(default: one per core)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for python -m server (repeatable)")
    args = parser.parse_args()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
