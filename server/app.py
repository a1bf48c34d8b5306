"""The Flask app factory and its routes. Routes only decode, validate, call, encode, store."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Request, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

from server import codecs
from server.admission import RETRY_AFTER_S, Admission, Control, client_disconnected
from server.api import Load, Operations, ProcessResult, ServerHealth
from server.config import ServerConfig
from server.cost import check_cost
from server.errors import ApiError, bad_request
from server.limits import MAX_LINK_SECONDS
from server.multipart import InMemoryFormDataParser
from server.operations import Registry, default_registry
from server.output_options import OutputOptions, parse_format, parse_options
from server.peers import PeerClient
from server.pipeline import Pipeline, check_output_pixels, parse_pipeline
from server.processing import ProcessingJob, Processor
from server.signing import TileCredentials
from server.storage import Storage, StorageError, StorageFull, open_storage
from server.tiling import TILE_HEADER
from server.tokens import TokenGate, open_token_gate
from server.transport import CountedBody
from server.version import __version__

log = logging.getLogger("imagefleet.server")
access_log = logging.getLogger("imagefleet.access")

STATE_KEY = "imagefleet"
PROCESSED_KEY = "imagefleet.processed"
RESULT_NAME = re.compile(r"[0-9a-f]{64}\.(png|jpg|webp|avif)")
KEY_SCHEME = b"imagefleet-result-v1"
DIGITS = re.compile(r"[0-9]{1,9}")
ORIGINAL_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp", "bmp": "bmp",
                       "tiff": "tif", "gif": "gif", "heic": "heic", "avif": "avif"}
ORIGINAL_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                  "bmp": "image/bmp", "tiff": "image/tiff", "gif": "image/gif",
                  "heic": "image/heic", "avif": "image/avif"}


@dataclass
class ServerState:
    """Everything a request needs, owned by one app (no module-level state)."""

    config: ServerConfig
    storage: Storage
    registry: Registry
    started: float = field(default_factory=time.monotonic)
    draining: threading.Event = field(default_factory=threading.Event)
    lock: threading.Condition = field(default_factory=threading.Condition)
    inflight: int = 0
    processed: int = 0
    operations_json: bytes = b""
    # The API tokens accepted (server/tokens.py); None: from config.token alone.
    tokens: TokenGate | None = None
    admission: Admission = field(init=False)
    processor: Processor = field(init=False)
    metrics: Any = field(init=False)  # server.metrics.WorkerMetrics, imported lazily
    # Request ids: a random prefix per process and a counter; unique across a fleet
    # for log correlation without a system call per request.
    _id_prefix: str = field(default_factory=lambda: secrets.token_hex(4))
    _id_counter: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.tokens is None:
            self.tokens = open_token_gate(token=self.config.token, token_file=None,
                                          ssm_parameter=None, refresh_s=60.0)
        gate = self.tokens
        peers = (PeerClient(self.config.peers, gate.current,
                            tile_credential=lambda: self.tile_credentials().send)
                 if self.config.peers else None)
        self.admission = Admission(self.config.process_slots, self.config.queue_limit)
        self.processor = Processor(self.registry, self.admission, peers,
                                   self.config.tile_mp * 1e6, self.config.tile_size)
        from server.metrics import WorkerMetrics  # prometheus_client: not on import
        self.metrics = WorkerMetrics(self.admission.snapshot, lambda: self.inflight)
        self.operations_json = json.dumps(Operations(
            operations=tuple(op.spec() for op in self.registry.values())
        ).model_dump(mode="json")).encode()

    def tile_credentials(self) -> TileCredentials:
        """Derived from the link keys or, without them, from the current API token."""
        return self.storage.tile_credentials(self.tokens.current())

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):08x}"

    def enter(self) -> None:
        with self.lock:
            self.inflight += 1

    def leave(self, processed: bool) -> None:
        with self.lock:
            self.inflight -= 1
            if processed:
                self.processed += 1
            self.lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight; False if `timeout` passed first."""
        with self.lock:
            return self.lock.wait_for(lambda: self.inflight == 0, timeout)

    def health(self) -> ServerHealth:
        with self.lock:
            inflight, processed = self.inflight, self.processed
        problem = self.storage.health_problem()
        status = "draining" if self.draining.is_set() else "degraded" if problem else "ok"
        return ServerHealth(
            status=status,
            # What keeps this instance from doing its work although it runs (a full
            # disk): still 200, since every instance shares it and killing helps no one.
            problems=(problem,) if problem else (),
            instance_id=self.config.instance_id,
            inflight=inflight,
            processed=processed,
            # Busy is not dead: how loaded this process is, answered without waiting
            # for any slot (the manager and the gateway read it).
            load=Load.model_validate(self.admission.snapshot()),
            uptime_s=round(time.monotonic() - self.started, 3),
            version=__version__,
            pid=os.getpid(),  # tells apart the workers of one `--workers N` server
        )


class InMemoryUploadRequest(Request):
    """Uploads stay in memory: werkzeug would spool any file over 500 KB to a temporary
    file and read it back, and the body is bounded by MAX_CONTENT_LENGTH anyway.
    Multipart bodies are split in one pass (server/multipart.py)."""

    form_data_parser_class = InMemoryFormDataParser

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def get_state(app: Flask) -> ServerState:
    return app.extensions[STATE_KEY]


def create_app(config: ServerConfig | Mapping[str, Any] | None = None, *,
               storage: Storage | None = None, registry: Registry | None = None) -> Flask:
    """Build the app. Tests pass their own config and storage (a folder, a moto bucket,
    or MemoryStorage)."""
    if config is None:
        config = ServerConfig()
    elif not isinstance(config, ServerConfig):
        config = ServerConfig.from_mapping(dict(config))
    if storage is None:
        storage = open_storage(config.storage, s3_endpoint_url=config.s3_endpoint_url)
    tokens = open_token_gate(token=config.token, token_file=config.token_file,
                             ssm_parameter=config.token_ssm_parameter,
                             refresh_s=config.token_refresh)
    state = ServerState(config, storage, registry or default_registry(), tokens=tokens)
    codecs.load_plugins()

    app = Flask(__name__)
    app.request_class = InMemoryUploadRequest
    app.config["MAX_CONTENT_LENGTH"] = config.max_bytes
    # Behind the ALB or the local gateway: trust one hop for the client address and
    # scheme, so signed links use the address and scheme the client used.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1)  # type: ignore[method-assign]
    app.wsgi_app = _count_inflight(app.wsgi_app, state)  # type: ignore[method-assign]
    app.extensions[STATE_KEY] = state
    _register_error_handlers(app)
    _register_routes(app, state)
    return app


def _count_inflight(wsgi_app, state: ServerState):
    """Count a request in flight from its start until its body has been handed to the
    server in full, so a draining server never exits under a half-sent response."""

    def counted(environ, start_response):
        if environ.get("PATH_INFO") in ("/health", "/metrics"):  # not load, not drained
            return wsgi_app(environ, start_response)
        state.enter()
        try:
            body = wsgi_app(environ, start_response)
        except BaseException:
            state.leave(processed=False)
            raise
        return CountedBody(body, lambda: state.leave(bool(environ.get(PROCESSED_KEY))))

    return counted


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
        return jsonify(exc.to_json()), exc.status, headers

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        limit = app.config["MAX_CONTENT_LENGTH"]
        err = ApiError(413, "too_many_bytes",
                       f"the request is larger than {limit / 1024 / 1024:.0f} MiB, the limit")
        return jsonify(err.to_json()), 413

    @app.errorhandler(StorageError)
    def storage_error(exc: StorageError):
        log.error("storage failed: %s", exc)
        err = ApiError(503, "storage_unavailable", f"storage is unavailable: {exc}")
        return jsonify(err.to_json()), 503

    @app.errorhandler(StorageFull)
    def storage_full(exc: StorageFull):
        # 507, not 503: every instance writes to the same full place, so a client must
        # not retry it (507 is outside the client's retry set) and an operator must act.
        log.error("storage full: %s", exc)
        err = ApiError(507, "insufficient_storage",
                       f"the result cannot be stored: {exc}; free space in the storage")
        return jsonify(err.to_json()), 507

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        err = ApiError(exc.code or 500, code, exc.description or exc.name)
        return jsonify(err.to_json()), exc.code or 500


def _check_token(state: ServerState) -> None:
    if not state.tokens.accepts(request.headers.get("Authorization", "")):
        raise ApiError(401, "unauthorized",
                       "missing or wrong token; send 'Authorization: Bearer <token>'")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int_field(name: str, lo: int, hi: int) -> int | None:
    raw = request.form.get(name)
    if raw is None or raw == "":
        return None
    if not DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise bad_request("invalid_parameter",
                          f"'{name}' got {raw[:20]!r}; allowed: an integer from {lo} to {hi}")
    return int(raw)


def result_key(input_digest: str, pipeline: Pipeline, fmt: str,
               options: OutputOptions | int | None) -> str:
    """Content address of a result: same input, pipeline and encoding, same key.
    ``options`` as a bare int is the quality alone (every other option at its default)."""
    if not isinstance(options, OutputOptions):
        options = OutputOptions(quality=options)
    material = b"\n".join([KEY_SCHEME, input_digest.encode(), pipeline.canonical().encode(),
                           fmt.encode(), *options.key_material(fmt)])
    return f"{hashlib.sha256(material).hexdigest()}.{codecs.EXTENSIONS[fmt]}"


def _store(state: ServerState, info: codecs.ImageInfo, data: bytes, input_digest: str,
           storage_key: str, result: bytes, out_format: str, width: int, height: int,
           pipeline: Pipeline) -> None:
    original_key = f"originals/{input_digest}.{ORIGINAL_EXTENSIONS[info.format]}"
    if not state.storage.exists(original_key):
        state.storage.put(original_key, data, ORIGINAL_TYPES[info.format])
    state.storage.put(storage_key, result, codecs.CONTENT_TYPES[out_format],
                      {"width": str(width), "height": str(height),
                       "pipeline": pipeline.canonical()[:1500]})


def _register_routes(app: Flask, state: ServerState) -> None:
    """Request bookkeeping on the app; the routes in one blueprint per subject."""

    @app.before_request
    def start_request():
        g.request_id = (request.headers.get("X-Request-Id", "")[:64]
                        or state.new_request_id())
        g.started = time.perf_counter()
        g.log = {}

    @app.after_request
    def log_request(response: Response):
        if request.path != "/health" and access_log.isEnabledFor(logging.INFO):
            ms = (time.perf_counter() - g.started) * 1000
            access_log.info(json.dumps({
                "request_id": g.request_id, "method": request.method, "path": request.path,
                "status": response.status_code, "ms": round(ms, 1),
                "bytes_in": request.content_length or 0, **g.log,
            }))
        response.headers["X-Request-Id"] = g.request_id
        if request.path == "/process":
            state.metrics.observe(g.log.get("operation", "none"), response.status_code,
                                  g.get("timings", {}), bool(g.log.get("cached")),
                                  request.content_length or 0, g.get("bytes_out", 0))
        return response

    for blueprint in (_status_routes(state), _process_routes(state), _result_routes(state)):
        app.register_blueprint(blueprint)


def _status_routes(state: ServerState) -> Blueprint:
    """``GET /health``, ``GET /metrics`` and ``GET /operations``: what this instance is."""
    routes = Blueprint("status", __name__)

    @routes.get("/health")
    def health():
        body = state.health().model_dump(mode="json")
        return jsonify(body), (503 if state.draining.is_set() else 200)

    @routes.get("/metrics")
    def metrics():
        # Read-only like the manager's GET /fleet: free to a loopback peer (Prometheus
        # on the same host), else the API token. The socket's own peer, not ProxyFix's
        # X-Forwarded-For, and nothing forwarded by a proxy counts as local.
        orig = request.environ.get("werkzeug.proxy_fix.orig", {})
        peer = orig.get("REMOTE_ADDR", request.environ.get("REMOTE_ADDR", ""))
        if not _is_loopback(peer or "") or "X-Forwarded-For" in request.headers:
            _check_token(state)
        return Response(state.metrics.render(), mimetype=None,
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    @routes.get("/operations")
    def operations():
        _check_token(state)
        return Response(state.operations_json, mimetype="application/json")

    return routes


@dataclass(frozen=True)
class _Asked:
    """A ``POST /process`` request, decoded and checked, before its image is looked at."""

    data: bytes
    pipeline: Pipeline
    fmt: str | None
    options: OutputOptions
    expires_in: int


@dataclass(frozen=True)
class _Made:
    """The result of a request: made now, or found in storage (``data`` None then)."""

    key: str
    out_format: str
    width: int
    height: int
    size: int
    tiles: int
    cached: bool
    data: bytes | None


def _process_routes(state: ServerState) -> Blueprint:
    """``POST /process``: decode → check → make (or find) → store → answer."""
    routes = Blueprint("process", __name__)
    config = state.config

    @routes.post("/process")
    def process():
        _check_token(state)
        if state.draining.is_set():
            raise ApiError(503, "draining", "this instance is shutting down; retry the request",
                           retry_after=RETRY_AFTER_S)
        # Admitted before the form is touched: under gunicorn the body is still unread,
        # so an overloaded instance refuses without reading or decoding it.
        with state.admission.admitted():
            return _process_admitted()

    def _process_admitted():
        control = Control(time.monotonic() + config.request_timeout,
                          config.request_timeout, client_disconnected(request.environ))
        t0 = time.perf_counter()
        asked = _decode_request(state)
        timings = {"read": (time.perf_counter() - t0) * 1000}
        made = _make_result(state, asked, control, timings)
        request.environ[PROCESSED_KEY] = True
        g.timings, g.bytes_out = timings, made.size
        timings["total"] = (time.perf_counter() - t0) * 1000
        g.log.update(cached=made.cached, key=made.key[:16])
        if request.args.get("response") == "image":
            return _image_answer(state, made, timings)
        return _link_answer(state, asked, made, timings)

    return routes


def _decode_request(state: ServerState) -> _Asked:
    """The form's fields checked and the upload read; a 4xx ApiError otherwise."""
    if not (request.mimetype or "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       "send multipart/form-data with an 'image' file field")
    g.log["operation"] = (request.form.get("operation") or "steps")[:40]
    upload = request.files.get("image")
    if upload is None:
        raise bad_request("missing_field", "the 'image' file field is required")
    pipeline = parse_pipeline(state.registry, request.form.get("operation"),
                              request.form.get("params"), request.form.get("steps"))
    fmt = parse_format(request.form.get("format"))
    options = parse_options(request.form.get, _int_field("quality", 1, 100))
    expires_in = (_int_field("expires_in", 1, MAX_LINK_SECONDS) or state.config.link_ttl)
    data = upload.read()
    g.log.update(operation="+".join(pipeline.names), bytes=len(data))
    return _Asked(data, pipeline, fmt, options, expires_in)


def _make_result(state: ServerState, asked: _Asked, control: Control,
                 timings: dict[str, float]) -> _Made:
    """Probe and price the image, then find its result in storage or make and store it
    (a tile for a peer is made, never stored). Adds the steps' times to ``timings``."""
    config = state.config
    info = codecs.probe(asked.data, config.max_pixels)
    check_output_pixels(asked.pipeline, info.width, info.height, config.max_pixels)
    cost = asked.pipeline.cost(info.width, info.height)
    check_cost(cost, config.max_cost)
    g.log["cost_s"] = round(cost.seconds, 3)
    out_format = asked.fmt or codecs.output_format_for(info)
    input_digest = hashlib.sha256(asked.data).hexdigest()
    key = result_key(input_digest, asked.pipeline, out_format, asked.options)
    storage_key = f"results/{key}"

    # Only a peer of this fleet holds the credential (signing.py); any other value
    # is an ordinary request, stored and encoded as asked.
    is_tile = state.tile_credentials().accepts(request.headers.get(TILE_HEADER))
    stored = None if is_tile else state.storage.head(storage_key)
    if stored is not None and all(
            DIGITS.fullmatch(str(stored.metadata.get(k, ""))) for k in ("width", "height")):
        return _Made(key, out_format, int(stored.metadata["width"]),
                     int(stored.metadata["height"]), stored.size, 1, True, None)
    result = state.processor.run(
        ProcessingJob(asked.data, info, asked.pipeline, out_format, asked.options,
                      is_tile=is_tile, control=control))
    timings.update(result.timings)
    g.log.update(result.log)
    if not is_tile:  # tiles are intermediate: nothing to keep
        t5 = time.perf_counter()
        _store(state, info, asked.data, input_digest, storage_key, result.data, out_format,
               result.width, result.height, asked.pipeline)
        timings["store"] = (time.perf_counter() - t5) * 1000
    return _Made(key, out_format, result.width, result.height, len(result.data),
                 result.tiles, False, result.data)


def _image_answer(state: ServerState, made: _Made, timings: dict[str, float]) -> Response:
    """``?response=image``: the result's bytes, its facts in headers."""
    data = made.data
    if data is None:
        data = state.storage.get(f"results/{made.key}")
        if data is None:
            raise StorageError(f"{made.key} vanished from storage")
    return Response(data, mimetype=codecs.CONTENT_TYPES[made.out_format], headers={
        "X-Instance-Id": state.config.instance_id,
        "X-Result-Key": made.key,
        "X-Cached": "true" if made.cached else "false",
        "X-Timings": json.dumps({k: round(v, 2) for k, v in timings.items()}),
    })


def _link_answer(state: ServerState, asked: _Asked, made: _Made,
                 timings: dict[str, float]) -> Response:
    """The JSON answer: an expiring link to the stored result and its facts."""
    config = state.config
    link = state.storage.link(f"results/{made.key}", asked.expires_in,
                              config.public_url or request.host_url)
    return jsonify(ProcessResult(
        key=made.key,
        url=link.url,
        expires_at=datetime.fromtimestamp(link.expires_at, UTC),
        instance_id=config.instance_id,
        width=made.width,
        height=made.height,
        format=made.out_format,
        bytes=made.size,
        cached=made.cached,
        tiles=made.tiles,
        timings_ms={k: round(v, 2) for k, v in timings.items()},
    ).model_dump(mode="json"))


def _result_routes(state: ServerState) -> Blueprint:
    """``GET /results/<name>``: a stored result behind a signed link (folder storage)."""
    routes = Blueprint("results", __name__)

    @routes.get("/results/<path:name>")
    def results(name: str):
        if not RESULT_NAME.fullmatch(name):
            raise ApiError(404, "not_found", "no such result")
        if not state.storage.serves_links:
            raise ApiError(404, "not_found", "results are served from S3 links, not here")
        expires = request.args.get("expires", "")
        signature = request.args.get("signature", "")
        if not state.storage.verify_link(f"results/{name}", expires, signature):
            raise ApiError(403, "invalid_link",
                           "the link has expired or its signature does not match")
        stored = state.storage.head(f"results/{name}")
        data = state.storage.get(f"results/{name}") if stored else None
        if stored is None or data is None:
            raise ApiError(404, "not_found", f"no result {name}")
        return Response(data, mimetype=stored.content_type, headers={
            "Cache-Control": "private, max-age=300",
        })

    return routes
