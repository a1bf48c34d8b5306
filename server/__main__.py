"""`python -m server`: the processing server (server/serving.py says how it is served).

Each option comes from its flag, else ``IMAGEFLEET_<FLAG>``, else the ``--config`` file,
else its default (server/settings.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_type_hints

from server.config import ServerConfig
from server.settings import env_name, layered
from server.storage import open_storage
from server.tokens import open_token_gate

log = logging.getLogger("imagefleet.server")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"
# Options whose empty value means "not given" (IMAGEFLEET_PEERS= in a unit file).
OPTIONAL_STRINGS = ("token", "token_file", "token_ssm_parameter", "peers", "s3_endpoint_url",
                    "public_url")


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The flags, each defaulting to None so that an unset flag leaves the option to the
    environment, the config file or the default (``config_from_args``)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="ImageFleet processing server. Every flag can also be set with the "
                    "environment variable IMAGEFLEET_<FLAG>, e.g. IMAGEFLEET_STORAGE, or "
                    "in the --config file; a flag wins over the variable, the variable "
                    "over the file, the file over the default.",
    )

    def add(flag: str, kind=str, help_text: str = "") -> None:
        parser.add_argument(f"--{flag}", type=kind, default=None, help=help_text)

    parser.add_argument("--config", type=Path, default=env.get(env_name("config")) or None,
                        metavar="FILE",
                        help="options as a JSON object, or TOML when FILE ends in .toml, "
                             "keyed by flag name, e.g. {\"port\": 8081} (env "
                             "IMAGEFLEET_CONFIG)")
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
    # The variable is read here too, so that logging is set up before anything else.
    parser.add_argument("--log-level", default=env.get(env_name("log-level")) or None,
                        type=str.upper, choices=LOG_LEVELS,
                        help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    return parser


def option_values(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every option some layer sets (flag > environment > config file), by field name,
    including ``log_level``; ValueError naming the variable or file of a bad value."""
    fields = {**get_type_hints(ServerConfig), "log_level": str}
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    values = layered(fields, flags=flags, environ=environ, config_file=args.config)
    for optional in OPTIONAL_STRINGS:
        if values.get(optional) == "":
            values.pop(optional)
    return values


def log_level_from_args(args: argparse.Namespace,
                        environ: Mapping[str, str] | None = None) -> str:
    level = str(option_values(args, environ).get("log_level", DEFAULT_LOG_LEVEL)).upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return level


def config_from_args(args: argparse.Namespace,
                     environ: Mapping[str, str] | None = None) -> ServerConfig:
    values = option_values(args, environ)
    values.pop("log_level", None)
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
    try:
        log_level = log_level_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(log_level)
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
            return serve_gunicorn(config, log_level)
        return serve_waitress(config)
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
