"""Tiled processing of large images across the fleet.

The coordinator (the instance that received the request) splits the image into
tiles, each with a halo wide enough for the whole pipeline, sends them through the
load balancer to `POST /process?response=image`, and stitches the tile centres.
Because every tileable operation declares how far its output reaches into its input
(`Operation.halo`), the stitched result equals the whole-image result bit for bit.

Operation kinds (see `Operation.tiling`):
- local: tiled with a halo (filters, morphology, thresholds, point operations).
- two_phase: a global statistic first, computed by the coordinator on the whole
  image, then a point operation that is tiled (Otsu: the threshold level).
- global: never tiled; such a pipeline is processed whole (resize, rotate, flip,
  crop, Canny, Hough lines, contours, CLAHE, histogram equalisation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

from server.operations import Image, Registry
from server.params import ParamSet
from server.pipeline import Pipeline, Step

log = logging.getLogger(__name__)

TILE_HEADER = "X-ImageFleet-Tile"


class TileError(RuntimeError):
    """A peer did not return a usable tile (unreachable, error status, bad image)."""


@dataclass(frozen=True)
class Tile:
    index: int
    # The core: the part of the output this tile is responsible for.
    x0: int
    y0: int
    x1: int
    y1: int
    # The input window: the core grown by the halo, clipped to the image.
    wx0: int
    wy0: int
    wx1: int
    wy1: int

    def crop_result(self, result: Image) -> Image:
        """The core of a processed window."""
        dy, dx = self.y0 - self.wy0, self.x0 - self.wx0
        return result[dy:dy + (self.y1 - self.y0), dx:dx + (self.x1 - self.x0)]


def plan_tiles(width: int, height: int, tile_size: int, halo: int) -> list[Tile]:
    """Cover the image with tile_size x tile_size cores (the last row and column may be
    smaller), each with its clipped halo window."""
    tiles = []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            tiles.append(Tile(len(tiles), x0, y0, x1, y1,
                              max(0, x0 - halo), max(0, y0 - halo),
                              min(width, x1 + halo), min(height, y1 + halo)))
    return tiles


def pipeline_is_tileable(pipeline: Pipeline) -> bool:
    return all(step.operation.tiling != "global" for step in pipeline.steps)


def pipeline_halo(steps: tuple[Step, ...]) -> int:
    """Reaches add up: each step needs its own halo on top of what the next needs."""
    return sum(step.operation.halo(step.params.as_dict()) for step in steps)


def resolve_two_phase(step: Step, image: Image, registry: Registry) -> Step:
    """Phase one of a two-phase step: the global statistic, computed on the whole
    image, turns the step into an equivalent point operation."""
    if step.operation.name == "otsu_threshold":
        gray = image if image.ndim == 2 else cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
        level, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        kind = "binary_inv" if step.params["invert"] else "binary"
        threshold = registry["threshold"]
        params = ParamSet((("threshold", int(level)), ("max_value", 255), ("type", kind)))
        return Step(threshold, params)
    raise ValueError(f"no two-phase rule for {step.operation.name}")


def segments(pipeline: Pipeline) -> Iterator[tuple[Step, ...] | Step]:
    """Split the pipeline at two-phase steps; a two-phase step is yielded alone so the
    caller resolves it against the image as it is at that point."""
    current: list[Step] = []
    for step in pipeline.steps:
        if step.operation.tiling == "two_phase":
            if current:
                yield tuple(current)
                current = []
            yield step
        else:
            current.append(step)
    if current:
        yield tuple(current)


# Runs one tile: (steps, window image, timings) -> processed window; raises TileError.
# A runner may add milliseconds to `timings` (e.g. "encode", "wait", "worker"); they
# are summed over tiles into TileStats.timings.
TileRunner = Callable[[tuple[Step, ...], Image, dict[str, float]], Image]


@dataclass
class TileStats:
    tiles: int = 0
    remote: int = 0
    local: int = 0
    retries: int = 0
    dispatch_ms: float = 0.0
    stitch_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def run_local(steps: tuple[Step, ...], window: Image, timings: dict[str, float]) -> Image:
    t0 = time.perf_counter()
    result = Pipeline(steps).run(np.ascontiguousarray(window))
    timings["local"] = (time.perf_counter() - t0) * 1000
    return result


def run_tiled(pipeline: Pipeline, image: Image, registry: Registry, *, tile_size: int,
              remote: TileRunner | None, local: TileRunner = run_local,
              concurrency: int = 8, attempts: int = 3) -> tuple[Image, TileStats]:
    """Process `image` tile by tile. Each tile goes to `remote` (through the load
    balancer) and is retried up to `attempts` times; a tile that still fails, or every
    tile when there is no `remote`, is processed here with `local`."""
    stats = TileStats()
    current = image
    for segment in segments(pipeline):
        steps = ((resolve_two_phase(segment, current, registry),)
                 if isinstance(segment, Step) else segment)
        current = _run_segment(steps, current, tile_size, remote, local, concurrency,
                               attempts, stats)
    return current, stats


def _run_segment(steps: tuple[Step, ...], image: Image, tile_size: int,
                 remote: TileRunner | None, local: TileRunner, concurrency: int,
                 attempts: int, stats: TileStats) -> Image:
    height, width = image.shape[:2]
    tiles = plan_tiles(width, height, tile_size, pipeline_halo(steps))
    stats.tiles = max(stats.tiles, len(tiles))
    canvas: list[Image] = []  # created on the first result, when its shape is known
    lock = threading.Lock()

    def add(timings: dict[str, float]) -> None:
        with lock:
            for name, ms in timings.items():
                stats.timings[name] = stats.timings.get(name, 0.0) + ms

    def process(tile: Tile) -> Image:
        window = image[tile.wy0:tile.wy1, tile.wx0:tile.wx1]
        timings: dict[str, float] = {}
        if remote is not None:
            for attempt in range(attempts):
                try:
                    result = remote(steps, window, timings)
                    add(timings)
                except TileError as exc:
                    log.warning("tile %d attempt %d failed: %s", tile.index, attempt + 1, exc)
                    with lock:
                        stats.retries += attempt < attempts - 1
                    continue
                with lock:
                    stats.remote += 1
                return result
        with lock:
            stats.local += 1
        result = local(steps, window, timings)
        add(timings)
        return result

    def work(tile: Tile) -> None:
        # Each tile is stitched as soon as it is back, so no more than `concurrency`
        # tile results are alive at once: memory stays at input + output + tiles.
        core = tile.crop_result(process(tile))
        t0 = time.perf_counter()
        with lock:
            if not canvas:
                canvas.append(np.empty((height, width, *core.shape[2:]), dtype=core.dtype))
        canvas[0][tile.y0:tile.y1, tile.x0:tile.x1] = core
        with lock:
            stats.stitch_ms += (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency if remote else 1,
                            thread_name_prefix="tile") as pool:
        for future in [pool.submit(work, tile) for tile in tiles]:
            future.result()
    stats.dispatch_ms += (time.perf_counter() - t0) * 1000
    return canvas[0]
