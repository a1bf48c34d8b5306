"""Server configuration: one validated, frozen dataclass (pydantic), filled from flags,
``IMAGEFLEET_*`` variables and a config file (server/settings.py says the precedence)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import field, fields
from typing import Any

from pydantic import ValidationError, model_validator
from pydantic.dataclasses import dataclass

from server.limits import MAX_LINK_SECONDS
from server.settings import ENV_PREFIX, one_line

__all__ = ["ENV_PREFIX", "ServerConfig", "config_problems", "default_instance_id"]
SPARE_THREADS = 8
QUEUE_PER_SLOT = 4


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# Unknown keys are refused (a typo must not leave an option at its default).
@dataclass(frozen=True, config={"extra": "forbid"})
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

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        # Frozen: the two computed defaults are filled in once, here, before the checks.
        if self.queue_limit == -1:
            object.__setattr__(self, "queue_limit", QUEUE_PER_SLOT * self.process_slots)
        if self.threads == 0:
            object.__setattr__(self, "threads",
                               max(16, self.process_slots + self.queue_limit + SPARE_THREADS))
        problems = config_problems(self)
        if problems:
            raise ValueError("invalid server configuration: " + "; ".join(problems))
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerConfig:
        """Validated config from option values; ValueError with one line naming each
        wrong field and what it allows."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ValidationError as exc:
            message = one_line(exc)
            prefix = "invalid server configuration: "
            raise ValueError(prefix + message.removeprefix(prefix)) from None


def config_problems(config: ServerConfig) -> list[str]:
    """What is wrong with the values (after the computed defaults), one line each."""
    problems = []
    if not 0 <= config.port <= 65535:
        problems.append(f"port {config.port} is not 0..65535")
    if not 1 <= config.threads <= 512:
        problems.append(f"threads {config.threads} is not 1..512")
    if not 1 <= config.link_ttl <= MAX_LINK_SECONDS:
        problems.append(f"link_ttl {config.link_ttl} is not 1..{MAX_LINK_SECONDS} seconds "
                        "(links live at most 7 days)")
    if config.max_bytes < 1024:
        problems.append("max_bytes must be at least 1024")
    if config.max_pixels < 1:
        problems.append("max_pixels must be positive")
    if config.tile_mp <= 0:
        problems.append("tile_mp must be positive")
    if not 128 <= config.tile_size <= 16384:
        problems.append(f"tile_size {config.tile_size} is not 128..16384 pixels")
    if not 1 <= config.process_slots <= 256:
        problems.append(f"process_slots {config.process_slots} is not 1..256")
    if not 0 <= config.queue_limit <= 4096:
        problems.append(f"queue_limit {config.queue_limit} is not 0..4096")
    if config.threads < config.process_slots + config.queue_limit + 2:
        problems.append(f"threads {config.threads} must exceed process_slots + queue_limit "
                        f"({config.process_slots} + {config.queue_limit}) by at least 2, so "
                        "that /health and refusals always find a thread")
    if not config.max_cost > 0:
        problems.append(f"max_cost must be positive, got {config.max_cost}")
    if not config.request_timeout > 0:
        problems.append(f"request_timeout must be positive, got {config.request_timeout}")
    if config.public_url is not None and not config.public_url.startswith(
            ("http://", "https://")):
        problems.append(f"public_url {config.public_url!r} must start with http:// or "
                        "https://")
    if not 0 <= config.opencv_threads <= 256:
        problems.append(f"opencv_threads {config.opencv_threads} is not 0..256")
    if not 1 <= config.workers <= 64:
        problems.append(f"workers {config.workers} is not 1..64")
    if config.token is not None and len(config.token) < 8:
        problems.append("token must be at least 8 characters")
    sources = [s for s in (config.token, config.token_file, config.token_ssm_parameter) if s]
    if len(sources) > 1:
        problems.append("give one of token, token_file and token_ssm_parameter")
    if not 0.05 <= config.token_refresh <= 3600:
        problems.append(f"token_refresh {config.token_refresh} is not 0.05..3600 seconds")
    return problems
