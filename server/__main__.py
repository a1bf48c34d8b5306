"""`python -m server`: the processing server (server/serving.py says how it is served)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING

from server.config import ENV_PREFIX, ServerConfig
from server.storage import open_storage
from server.tokens import open_token_gate

log = logging.getLogger("imagefleet.server")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def build_parser() -> argparse.ArgumentParser:
    d = ServerConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="ImageFleet processing server. Every flag can also be set with the "
                    "environment variable IMAGEFLEET_<FLAG>, e.g. IMAGEFLEET_STORAGE.",
    )

    def add(flag: str, kind=str, help_text: str = "", default=None):
        name = flag.replace("-", "_")
        fallback = default if default is not None else d[name].default
        if fallback is MISSING:  # computed at start-up (instance id, process slots)
            fallback = None
        value = _env(flag, None if fallback is None else str(fallback))
        parser.add_argument(f"--{flag}", type=kind, default=value, help=help_text)

    add("host", help_text="address to listen on (default 127.0.0.1)")
    add("port", int, "port to listen on; 0 picks a free one (default 8080)")
    add("storage", help_text="folder path or s3://bucket[/prefix] (default ./storage)")
    add("s3-endpoint-url", help_text="S3-compatible endpoint, e.g. a local test server")
    add("token", help_text="require 'Authorization: Bearer TOKEN' (prefer IMAGEFLEET_TOKEN: "
                           "flags are visible to other local users)")
    add("token-file", help_text="read the token(s) from this file (mode 0600), re-read every "
                                "--token-refresh seconds")
    add("token-ssm-parameter", help_text="read the token(s) from this SSM SecureString "
                                         "parameter (credentials: the instance role), re-read "
                                         "every --token-refresh seconds")
    add("token-refresh", float, "seconds between re-reads of the token file or parameter "
                                "(default 60)")
    add("peers", help_text="load balancer URL that tiles of large images are sent to")
    add("tile-mp", float, "split images above this many megapixels into tiles (default 40)")
    add("tile-size", int, "side of a tile's core in pixels (default 2048)")
    add("threads", int, "request threads per process (default: process slots + queue + 8, "
                        "at least 16)")
    add("instance-id", help_text="name reported in /health and responses "
                                 "(default hostname-pid)")
    add("link-ttl", int, "lifetime of result links in seconds, at most 604800 (default 86400)")
    add("max-bytes", int, "largest request body in bytes (default 50 MiB)")
    add("max-pixels", int, "largest image in pixels, checked before decoding (default 100 MP)")
    add("process-slots", int, "images processed at once (default: CPU count)")
    add("queue-limit", int, "requests admitted beyond the slots to wait for one; beyond "
                            "slots + queue: 503 overloaded with Retry-After (default: 4 x slots)")
    add("max-cost", float, "largest estimated CPU seconds one request may cost (default 15)")
    add("request-timeout", float, "seconds after which a request is stopped between "
                                  "steps (default 120)")
    add("public-url", help_text="base URL of result links, e.g. the load balancer's "
                                "https://images.example.com (default: the request's Host)")
    add("opencv-threads", int, "threads OpenCV uses within one operation; 0: its default")
    add("drain-timeout", float, "seconds SIGTERM waits for in-flight requests (default 30)")
    add("workers", int, "server processes sharing the port under gunicorn, e.g. one per "
                        "core (Linux, macOS); /health reports the answering worker's counts "
                        "(default 1: one waitress process)")
    parser.add_argument("--log-level", default=_env("log-level", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {k: v for k, v in vars(args).items() if k != "log_level" and v is not None}
    for optional in ("token", "token_file", "token_ssm_parameter", "peers", "s3_endpoint_url",
                     "public_url"):
        if values.get(optional) == "":
            values.pop(optional)
    return ServerConfig.from_mapping(values)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Access lines are JSON objects, one per line, for log shippers: no prefix.
    access = logging.getLogger("imagefleet.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    from server.serving import serve_gunicorn, serve_waitress

    try:
        config = config_from_args(args)
        if config.workers > 1:
            # The arbiter serves nothing: check the storage location and the token
            # source here, so a bad one is a clear exit 2 rather than N workers failing
            # to boot.
            open_storage(config.storage, s3_endpoint_url=config.s3_endpoint_url)
            open_token_gate(token=config.token, token_file=config.token_file,
                            ssm_parameter=config.token_ssm_parameter,
                            refresh_s=config.token_refresh).close()
            return serve_gunicorn(config, args.log_level)
        return serve_waitress(config)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
