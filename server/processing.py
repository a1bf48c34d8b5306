"""Turning a decoded request into result bytes: which path (shrink-on-load, tiled
across peers, or plain), in which processing slot, and how long each stage took.

No Flask here: the route parses and validates, this computes, the route stores and
answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server import codecs, colour, metadata
from server.admission import Admission, Control
from server.codecs import ImageInfo, OutputFormat
from server.colour import NO_COLOUR, Colour
from server.operations import Image, Registry
from server.peers import PeerClient
from server.pipeline import Pipeline, Step
from server.shrink import run_after_shrink, shrink_factor
from server.tiling import pipeline_is_tileable, run_local, run_tiled


@dataclass(frozen=True)
class ProcessingJob:
    data: bytes
    info: ImageInfo
    pipeline: Pipeline
    out_format: OutputFormat
    # The encoder, colour and metadata options (a bare int: the quality alone).
    options: codecs.OutputOptions | int | None
    # A tile from a coordinator: never tiled again, answered in uncompressed PNG.
    is_tile: bool = False
    # Deadline and client liveness, checked while waiting for a slot, between steps and
    # between tiles.
    control: Control = field(default_factory=Control.unbounded)

    @property
    def output_options(self) -> codecs.OutputOptions:
        if isinstance(self.options, codecs.OutputOptions):
            return self.options
        return codecs.OutputOptions(quality=self.options)


@dataclass
class Result:
    data: bytes
    width: int
    height: int
    tiles: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    log: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Processor:
    registry: Registry
    admission: Admission
    peers: PeerClient | None
    tile_pixels: float
    tile_size: int

    def should_tile(self, job: ProcessingJob) -> bool:
        return (not job.is_tile and self.peers is not None
                and job.info.pixels > self.tile_pixels and pipeline_is_tileable(job.pipeline))

    def run(self, job: ProcessingJob) -> Result:
        if self.should_tile(job):
            return self._run_tiled(job)
        reduce = shrink_factor(job.pipeline, job.info)
        with self.admission.slot(job.control):
            t0 = time.perf_counter()
            image = codecs.decode(job.data, job.info, reduce)
            image, col = self._colour(job, image)
            t1 = time.perf_counter()
            if reduce > 1:
                out = run_after_shrink(job.pipeline, image, job.info, job.control.check)
            else:
                out = job.pipeline.run(image, job.control.check)
            t2 = time.perf_counter()
            data = self._encode(job, out, col)
            t3 = time.perf_counter()
        result = self._result(data, out, t0, t1, t2, t3)
        if reduce > 1:
            result.log["shrink_on_load"] = reduce
        return result

    def _run_tiled(self, job: ProcessingJob) -> Result:
        control = job.control
        with self.admission.slot(control):
            t0 = time.perf_counter()
            image = codecs.decode(job.data, job.info)
            image, col = self._colour(job, image)
            t1 = time.perf_counter()
        # No slot is held while tiles are out: they may come back to this very instance
        # through the load balancer and need its slots.
        assert self.peers is not None  # should_tile

        def remote(steps: tuple[Step, ...], window: Image, timings: dict[str, float]) -> Image:
            control.check()  # an abandoned request sends no more tiles
            return self.peers(steps, window, timings)

        def local(steps: tuple[Step, ...], window: Image, timings: dict[str, float]) -> Image:
            with self.admission.slot(control):
                control.check()
                return run_local(steps, window, timings)

        out, stats = run_tiled(job.pipeline, image, self.registry, tile_size=self.tile_size,
                               remote=remote, local=local)
        del image  # the coordinator keeps the output and the tiles in flight only
        t2 = time.perf_counter()
        with self.admission.slot(control):
            data = self._encode(job, out, col)
        t3 = time.perf_counter()
        result = self._result(data, out, t0, t1, t2, t3)
        result.tiles = stats.tiles
        result.timings.update(tiles_dispatch=stats.dispatch_ms, tiles_stitch=stats.stitch_ms,
                              **{f"tiles_{k}_sum": v for k, v in stats.timings.items()})
        result.log.update(tiles=stats.tiles, tiles_local=stats.local,
                          tile_retries=stats.retries)
        return result

    @staticmethod
    def _colour(job: ProcessingJob, image: Image) -> tuple[Image, Colour]:
        """Settle the embedded profile on the decoded pixels (server/colour.py): before
        the pipeline, so tiles and steps see plain pixels. Tiles are never converted:
        the coordinator did it."""
        profile = job.info.embedded.icc
        if job.is_tile or not profile:
            return image, Colour()
        return colour.apply_policy(image, profile, job.output_options.icc)

    @staticmethod
    def _encode(job: ProcessingJob, out: Image, col: Colour = NO_COLOUR) -> bytes:
        if job.is_tile and job.out_format == "png":
            return codecs.encode_uncompressed_png(out)  # decoded at once by the coordinator
        opts = job.output_options
        icc = col.profile if col.profile and colour.fits(col.profile, out) else None
        blocks = metadata.for_output(job.info.embedded, opts.metadata, icc,
                                     out.shape[1], out.shape[0])
        return codecs.encode(out, job.out_format, opts, blocks)

    @staticmethod
    def _result(data: bytes, out: Image, t0: float, t1: float, t2: float,
                t3: float) -> Result:
        height, width = out.shape[:2]
        timings = {"decode": (t1 - t0) * 1000, "process": (t2 - t1) * 1000,
                   "encode": (t3 - t2) * 1000}
        return Result(data, width, height, timings=timings)
