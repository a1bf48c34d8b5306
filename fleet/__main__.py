"""``python -m fleet local|run``.

Two options of ``local`` are for a program that runs the fleet as its child (the desktop
app does): ``--ready-file PATH`` writes, once a worker is healthy, a JSON
``{"endpoint", "pid", "admin_token_file"}`` (mode 0600, written whole then renamed, so a
reader never sees half of it); ``--stop-on-stdin-eof`` stops the fleet when its standard
input reaches end of file, which happens when the parent closes the pipe or dies however
it dies (even SIGKILL), so a fleet never outlives the program that started it.

Every option of ``local`` comes from its flag, else ``IMAGEFLEET_<FLAG>``, else the
``--config`` file, else its default (fleet/local/options.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path

from fleet.local.gateway import GatewayLimits, raise_descriptor_limit
from fleet.local.options import LocalFleetOptions, local_options
from fleet.local.runtime import LocalFleetRuntime, local_spec
from fleet.providers.base import ProviderError
from fleet.storage_cleanup import Caps
from server.atomic import write_atomic

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 120.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fleet",
                                     description="Run a self-healing ImageFleet fleet.")
    sub = parser.add_subparsers(dest="command", required=True)
    # Flags default to None: one not given leaves the option to IMAGEFLEET_<FLAG>, the
    # --config file, then LocalFleetOptions' default.
    local = sub.add_parser("local", help="gateway + worker processes on this machine",
                           description="Every flag can also be set with IMAGEFLEET_<FLAG> "
                                       "(e.g. IMAGEFLEET_MAX_CONNECTIONS) or in the --config "
                                       "file; a flag wins over the variable, the variable "
                                       "over the file, the file over the default.")
    local.add_argument("--config", type=Path, default=os.environ.get("IMAGEFLEET_CONFIG")
                       or None, metavar="FILE",
                       help="options as a JSON object, or TOML when FILE ends in .toml, "
                            "keyed by flag name, e.g. {\"workers\": 4} (env IMAGEFLEET_CONFIG)")
    local.add_argument("--workers", type=int, default=None,
                       help="starting desired number of workers (default 2)")
    local.add_argument("--min", type=int, default=None, dest="min_workers",
                       help="fewest workers when scaling (default: --workers)")
    local.add_argument("--max", type=int, default=None, dest="max_workers",
                       help="most workers when scaling (default: --workers)")
    local.add_argument("--port", type=int, default=None, help="gateway port (default 8000)")
    local.add_argument("--storage", type=Path, default=None,
                       help="shared storage folder (default ./storage)")
    local.add_argument("--port-fallback", action="store_true", default=None,
                       help="when --port is taken, listen on a free port instead of failing "
                            "(the readiness file then names the port asked for)")
    local.add_argument("--results", default=None,
                       metavar="s3://BUCKET[/PREFIX]",
                       help="store results and originals in S3 (standard AWS credential "
                            "chain; AWS_ENDPOINT_URL for an S3-compatible endpoint) so "
                            "links are presigned S3 links; default: the --storage folder")
    local.add_argument("--max-storage-mb", type=float, default=None,
                       help="remove the oldest local results and originals past this size")
    local.add_argument("--max-age-days", type=float, default=None,
                       help="remove local results and originals older than this")
    local.add_argument("--token", default=None,
                       help="require 'Authorization: Bearer TOKEN' on workers and /fleet "
                            "(default: env IMAGEFLEET_TOKEN; prefer it, argv is visible). "
                            "Without it the workers are open and the fleet makes an admin "
                            "token for POST /fleet/..., written to <storage>/.fleet/admin-token")
    local.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body the gateway takes (default 51 MiB: the "
                            "workers' 50 MiB plus form overhead); larger ones get 413")
    local.add_argument("--idle-timeout", type=float, default=None,
                       help="close keep-alive client connections idle this long (s, "
                            "default 60)")
    local.add_argument("--header-timeout", type=float, default=None,
                       help="408 for a request whose headers take longer (s, default 10)")
    local.add_argument("--max-connections", type=int, default=None,
                       help="most open client connections (default: from the descriptor "
                            "limit, keeping a reserve); more get 503")
    local.add_argument("--ready-file", type=Path, default=None, metavar="PATH",
                       help="once a worker is healthy, write JSON {endpoint, pid, "
                            "admin_token_file} here (0600, atomically); removed at stop")
    local.add_argument("--stop-on-stdin-eof", action="store_true", default=None,
                       help="stop when standard input is closed (for a parent process "
                            "that starts the fleet with a pipe: its death stops the fleet)")
    local.add_argument("--sample-interval", type=float, default=None,
                       help="seconds between samples of the /fleet/metrics window (default 5)")
    local.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    run = sub.add_parser("run", help="manage an AWS fleet (EC2 + ALB target group)")
    run.add_argument("--config", type=Path, required=True,
                     help="the file 'python -m scripts.bootstrap_aws up' wrote")
    run.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def storage_caps(args: argparse.Namespace | LocalFleetOptions) -> Caps:
    for name in ("max_storage_mb", "max_age_days"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {value}")
    return Caps(
        max_bytes=None if args.max_storage_mb is None else int(args.max_storage_mb * 2**20),
        max_age_s=None if args.max_age_days is None else args.max_age_days * 86400.0)


async def run_local(args: LocalFleetOptions) -> int:
    spec = local_spec(args.workers, args.min_workers, args.max_workers)
    limits = GatewayLimits(max_body_bytes=args.max_body_bytes, idle_timeout_s=args.idle_timeout,
                           header_timeout_s=args.header_timeout,
                           max_connections=args.max_connections)
    options = {"storage_dir": args.storage, "token": args.token, "limits": limits,
               "storage_location": args.results, "caps": storage_caps(args),
               "sample_interval_s": args.sample_interval}
    port_taken = None
    try:
        runtime = await LocalFleetRuntime.start(spec, port=args.port, **options)
    except OSError as exc:
        if not (args.port_fallback and args.port and exc.errno == errno.EADDRINUSE):
            raise
        port_taken = args.port
        print(f"port {args.port} is taken; using a free port instead (links made on "
              f"port {args.port} will not open)", flush=True)
        runtime = await LocalFleetRuntime.start(spec, port=0, **options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: closing the terminal must not orphan the workers (own sessions).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    scaling = (f"scaling {spec.min}..{spec.max}" if spec.scaling_enabled
               else "fixed size (give --min/--max to scale)")
    print(f"ImageFleet local fleet on {runtime.endpoint} — {spec.desired} worker(s), "
          f"{scaling}; storage {args.storage.resolve()}", flush=True)
    print(f"fleet state: {runtime.endpoint}/fleet — Ctrl-C to stop", flush=True)
    if runtime.admin_token_path is not None:
        print(f"admin token (for POST /fleet/...): {runtime.admin_token_path}", flush=True)
    stdin_transport = None
    try:
        if args.stop_on_stdin_eof:
            stdin_transport = await watch_stdin_eof(stop)
        if args.ready_file is not None:
            await announce_ready(runtime, args.ready_file, stop, port_taken)
        await stop.wait()
    finally:
        print("stopping: draining workers…", flush=True)
        if args.ready_file is not None:
            with contextlib.suppress(FileNotFoundError):
                args.ready_file.unlink()
        await runtime.aclose()
        if stdin_transport is not None:
            stdin_transport.close()
        print("stopped; no worker left running", flush=True)
    return 0


class _EofProtocol(asyncio.Protocol):
    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    def data_received(self, data: bytes) -> None:
        pass  # nothing is said on the pipe; only its end matters

    def eof_received(self) -> bool:
        log.info("standard input closed: the parent is gone or asked to stop")
        self.stop.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop.set()


async def watch_stdin_eof(stop: asyncio.Event) -> asyncio.BaseTransport:
    """Set ``stop`` when stdin ends. A pipe's end comes from the kernel when the last
    writer closes it, so this works when the parent is killed, unlike a pid poll that a
    recycled pid could fool."""
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.connect_read_pipe(lambda: _EofProtocol(stop), sys.stdin)
    except (ValueError, OSError) as exc:  # a regular file or a closed stdin
        raise ValueError(f"--stop-on-stdin-eof needs a pipe or terminal on stdin ({exc})"
                         ) from exc
    return transport


async def announce_ready(runtime: LocalFleetRuntime, path: Path, stop: asyncio.Event,
                         port_taken: int | None = None) -> None:
    """Wait for a healthy worker (or a stop), then write the readiness file."""
    waiting = asyncio.ensure_future(runtime.wait_healthy(READY_TIMEOUT_S))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not waiting.done():
        waiting.cancel()
        return
    waiting.result()  # a TimeoutError names the recent events
    write_ready_file(path, {
        "endpoint": runtime.endpoint, "pid": os.getpid(),
        "admin_token_file": (str(runtime.admin_token_path.resolve())
                             if runtime.admin_token_path is not None else None),
        "port_taken": port_taken})


def write_ready_file(path: Path, content: dict[str, object]) -> None:
    """Write ``content`` as JSON readable by the owner only, whole or not at all."""
    write_atomic(path, json.dumps(content))


def run_aws(config: Path) -> int:
    try:
        from fleet.aws.main import main as aws_main
    except ImportError as exc:
        print(f"python -m fleet run: the AWS provider is not available ({exc})",
              file=sys.stderr)
        return 2
    return aws_main(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = None
    if args.command == "local":
        try:
            options = local_options(args)
        except ValueError as exc:
            print(f"python -m fleet {args.command}: {exc}", file=sys.stderr)
            return 2
    verbose = options.verbose if options is not None else args.verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if options is not None:
            # One descriptor per client connection: take what the hard limit allows.
            raise_descriptor_limit()
            return asyncio.run(run_local(options))
        return run_aws(args.config)
    except (ValueError, ProviderError, OSError) as exc:  # OSError covers TimeoutError
        print(f"python -m fleet {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
