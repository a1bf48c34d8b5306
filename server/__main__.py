"""`python -m server`: the processing server under waitress, with graceful drain."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import MISSING

from server.config import ENV_PREFIX, ServerConfig
from server.storage import open_storage
from server.transport import JsonErrorChannel, unsent_bytes

log = logging.getLogger("imagefleet.server")

# Uploads are images of hundreds of KB to tens of MB: reading them 8 KB at a time
# (waitress's default) costs a Python-level loop turn per 8 KB.
RECV_BYTES = 256 * 1024
# Bodies up to this size are buffered in memory while they arrive; larger ones spool
# to a temporary file (waitress's default is 512 KB, less than many photographs,
# which then cost a file create, write and read-back each).
INBUF_OVERFLOW = 8 * 1024 * 1024


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
    add("peers", help_text="load balancer URL that tiles of large images are sent to")
    add("tile-mp", float, "split images above this many megapixels into tiles (default 40)")
    add("tile-size", int, "side of a tile's core in pixels (default 2048)")
    add("threads", int, "waitress threads (default 16)")
    add("instance-id", help_text="name reported in /health and responses "
                                 "(default hostname-pid)")
    add("link-ttl", int, "lifetime of result links in seconds, at most 604800 (default 86400)")
    add("max-bytes", int, "largest request body in bytes (default 50 MiB)")
    add("max-pixels", int, "largest image in pixels, checked before decoding (default 100 MP)")
    add("process-slots", int, "images processed at once (default: CPU count)")
    add("opencv-threads", int, "threads OpenCV uses within one operation; 0: its default")
    add("drain-timeout", float, "seconds SIGTERM waits for in-flight requests (default 30)")
    add("workers", int, "server processes sharing the port, e.g. one per core; "
                        "/health reports the answering worker's counts (default 1)")
    # A worker started by the supervisor inherits the listening socket as this fd.
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    # ... and drains when the process with this pid (its supervisor) is gone.
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default=_env("log-level", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {k: v for k, v in vars(args).items()
              if k not in ("log_level", "listen_fd", "parent_pid") and v is not None}
    for optional in ("token", "peers", "s3_endpoint_url"):
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
    try:
        config = config_from_args(args)
        if config.workers > 1 and args.listen_fd is None:
            # The supervisor serves nothing, so it checks the storage location but
            # leaves OpenCV, Flask and the app to the workers (memory, start-up).
            open_storage(config.storage, s3_endpoint_url=config.s3_endpoint_url)
            return _supervise(config, argv if argv is not None else sys.argv[1:])
        from server.app import create_app, get_state

        app = create_app(config)
    except ValueError as exc:
        parser.error(str(exc))

    from waitress import create_server

    if config.opencv_threads:
        import cv2

        cv2.setNumThreads(config.opencv_threads)  # process-wide, so set by the entry point

    if args.listen_fd is not None:
        where = {"sockets": [socket.socket(fileno=args.listen_fd)]}
    else:
        where = {"host": config.host, "port": config.port}
    server = create_server(
        app, **where, threads=config.threads,
        ident="imagefleet", max_request_body_size=config.max_bytes + 1024 * 1024,
        channel_timeout=120, connection_limit=1000, recv_bytes=RECV_BYTES,
        inbuf_overflow=INBUF_OVERFLOW,
    )
    server.channel_class = JsonErrorChannel
    state = get_state(app)
    if args.listen_fd is None:
        log.info("listening on http://%s:%s storage=%s instance=%s", config.host,
                 server.effective_port, state.storage.describe(), config.instance_id)

    drained = threading.Event()
    received: list[str] = []

    def drain() -> None:
        state.draining.wait()
        log.info("signal %s: draining", received[0] if received else "?")
        deadline = time.monotonic() + config.drain_timeout
        idle = state.wait_idle(config.drain_timeout)
        # The app is done with every response; wait until waitress has also written
        # them to their sockets (polled: waitress offers no event for it).
        while unsent_bytes(server) and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("drained (%s); exiting", "idle" if idle else "timeout")
        drained.set()
        # A real signal interrupts waitress's select() at once; on_signal then stops it.
        os.kill(os.getpid(), signal.SIGINT)

    # Started now and woken by the handler, which only sets flags: a handler that
    # started a thread itself could be re-entered by the drain's own signal inside
    # Thread.start() and leave its locks broken.
    threading.Thread(target=drain, name="drain", daemon=True).start()

    def start_drain(cause: str, again_means_exit: bool) -> None:
        """Run in a signal handler (or before serving): only sets flags."""
        if drained.is_set():
            raise KeyboardInterrupt
        if state.draining.is_set():
            if again_means_exit:
                os.write(2, b"second signal: exiting now\n")
                os._exit(1)
            return
        received.append(cause)
        state.draining.set()

    def on_signal(signum: int, _frame) -> None:
        start_drain(signal.Signals(signum).name, again_means_exit=True)

    def on_parent_death(_signum: int, _frame) -> None:
        # Possibly delivered several times (see PARENT_DEATH_SIGNAL): never escalates.
        start_drain("parent death", again_means_exit=False)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.listen_fd is not None:
        from server.supervisor import PARENT_DEATH_SIGNAL, die_with_parent

        signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
        if not die_with_parent(args.parent_pid):
            log.warning("supervisor (pid %d) is gone; draining", args.parent_pid)
            start_drain("parent death", again_means_exit=False)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def _supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    from server.supervisor import Supervisor, listening_socket

    try:
        sock = listening_socket(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        return 1
    log.info("listening on http://%s:%s storage=%s instance=%s workers=%d", config.host,
             sock.getsockname()[1], config.storage, config.instance_id, config.workers)
    return Supervisor(argv, sock, config.workers, config.instance_id).run()


if __name__ == "__main__":
    sys.exit(main())
