"""Server configuration: one validated dataclass, filled from flags or environment."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from server.limits import MAX_LINK_SECONDS

ENV_PREFIX = "IMAGEFLEET_"
SPARE_THREADS = 8
QUEUE_PER_SLOT = 4


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    storage: str = "./storage"
    s3_endpoint_url: str | None = None
    # API token(s), from one of three sources (server/tokens.py): the value itself
    # ("new,old" during a rotation), a 0600 file, or an SSM SecureString re-read every
    # token_refresh seconds.
    token: str | None = None
    token_file: str | None = None
    token_ssm_parameter: str | None = None
    token_refresh: float = 60.0
    peers: str | None = None
    tile_mp: float = 40.0
    tile_size: int = 2048
    # waitress (or gunicorn) threads; 0: enough for every admitted request plus spare
    # ones for /health and fast refusals (at least 16).
    threads: int = 0
    instance_id: str = field(default_factory=default_instance_id)
    link_ttl: int = 24 * 3600
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 100_000_000
    # CPU-bound work admitted at once; the other waitress threads stay free for
    # /health and uploads, so a saturated server still answers its health checks.
    process_slots: int = field(default_factory=lambda: os.cpu_count() or 2)
    # Requests admitted beyond the slots, waiting for one; -1: four per slot. Beyond
    # slots + queue a request gets 503 overloaded with Retry-After at once. Four per slot
    # keeps a client with 8 in flight on a 2-core server from being told to wait a whole
    # second (Retry-After has one-second resolution) while the wait in the queue stays
    # a few requests' time.
    queue_limit: int = -1
    # Largest estimated CPU cost of one request (server/cost.py), and the wall-clock
    # deadline after which a request is stopped between steps.
    max_cost: float = 15.0
    request_timeout: float = 120.0
    # Base URL that result links are built on (the load balancer's or gateway's address
    # as clients know it); None: the address the request came to, which behind a proxy is
    # only right when the proxy passes Host and X-Forwarded-Proto.
    public_url: str | None = None
    drain_timeout: float = 30.0
    # Threads OpenCV may use inside one operation; 0 keeps OpenCV's default (one per
    # core). Requests already run in parallel, so more can oversubscribe the cores.
    opencv_threads: int = 0
    # Server processes sharing the port (gunicorn's arbiter, server/serving.py).
    workers: int = 1

    def __post_init__(self) -> None:
        if self.queue_limit == -1:
            object.__setattr__(self, "queue_limit", QUEUE_PER_SLOT * self.process_slots)
        if self.threads == 0:
            object.__setattr__(self, "threads",
                               max(16, self.process_slots + self.queue_limit + SPARE_THREADS))
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(f"port {self.port} is not 0..65535")
        if not 1 <= self.threads <= 512:
            problems.append(f"threads {self.threads} is not 1..512")
        if not 1 <= self.link_ttl <= MAX_LINK_SECONDS:
            problems.append(f"link_ttl {self.link_ttl} is not 1..{MAX_LINK_SECONDS} seconds "
                            "(links live at most 7 days)")
        if self.max_bytes < 1024:
            problems.append("max_bytes must be at least 1024")
        if self.max_pixels < 1:
            problems.append("max_pixels must be positive")
        if self.tile_mp <= 0:
            problems.append("tile_mp must be positive")
        if not 128 <= self.tile_size <= 16384:
            problems.append(f"tile_size {self.tile_size} is not 128..16384 pixels")
        if not 1 <= self.process_slots <= 256:
            problems.append(f"process_slots {self.process_slots} is not 1..256")
        if not 0 <= self.queue_limit <= 4096:
            problems.append(f"queue_limit {self.queue_limit} is not 0..4096")
        if self.threads < self.process_slots + self.queue_limit + 2:
            problems.append(f"threads {self.threads} must exceed process_slots + queue_limit "
                            f"({self.process_slots} + {self.queue_limit}) by at least 2, so "
                            "that /health and refusals always find a thread")
        if not self.max_cost > 0:
            problems.append(f"max_cost must be positive, got {self.max_cost}")
        if not self.request_timeout > 0:
            problems.append(f"request_timeout must be positive, got {self.request_timeout}")
        if self.public_url is not None and not self.public_url.startswith(
                ("http://", "https://")):
            problems.append(f"public_url {self.public_url!r} must start with http:// or "
                            "https://")
        if not 0 <= self.opencv_threads <= 256:
            problems.append(f"opencv_threads {self.opencv_threads} is not 0..256")
        if not 1 <= self.workers <= 64:
            problems.append(f"workers {self.workers} is not 1..64")
        if self.token is not None and len(self.token) < 8:
            problems.append("token must be at least 8 characters")
        sources = [s for s in (self.token, self.token_file, self.token_ssm_parameter) if s]
        if len(sources) > 1:
            problems.append("give one of token, token_file and token_ssm_parameter")
        if not 0.05 <= self.token_refresh <= 3600:
            problems.append(f"token_refresh {self.token_refresh} is not 0.05..3600 seconds")
        if problems:
            raise ValueError("invalid server configuration: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**values)
