"""The wire contract: one pydantic model for every JSON body that crosses HTTP.

The processing server and the fleet admin build their answers from these models
(``model.model_dump(mode="json")``); the client validates what it receives into the
same models. Imports nothing heavy (no Flask, OpenCV, numpy or Tk), so the client, the
fleet manager and the command line can all use it.

Every model is frozen; fields a newer server adds are ignored (forward compatible);
a missing or mistyped required field is a :class:`pydantic.ValidationError`, which
:func:`describe_error` turns into one sentence naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    Strict,
    ValidationError,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "FleetEvent",
    "FleetInstance",
    "FleetState",
    "Load",
    "OperationSpec",
    "Operations",
    "ParamError",
    "ParamSpec",
    "ProcessResult",
    "ScaleAnswer",
    "ServerHealth",
    "TerminateAnswer",
    "check_param",
    "describe_error",
    "format_number",
    "parse_bool",
]

# Wire numbers are strict: a JSON true is never a number, "8" is never an integer.
Int = Annotated[int, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("wrong_type", "should be a number, got {value}",
                                  {"value": repr(value)})
    return value


# int or float kept as sent, so an integer bound stays an integer on the wire.
Number = Annotated[float | int, BeforeValidator(_number)]


def _time(value: Any) -> datetime:
    """ISO 8601 text or Unix seconds → aware datetime (naive text is taken as UTC)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, tz=UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError, TypeError):
        pass
    raise PydanticCustomError("wrong_type", "is not a valid time: {value}",
                              {"value": repr(value)})


def _iso_ms(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Python's isoformat with "Z" for UTC (pydantic's own JSON form of an aware datetime).
Time = Annotated[datetime, BeforeValidator(_time)]
# The fleet's times: always milliseconds, as the manager has always written them.
FleetTime = Annotated[datetime, BeforeValidator(_time),
                      PlainSerializer(_iso_ms, return_type=str, when_used="json")]


class WireModel(BaseModel):
    """Frozen, forward compatible; fields may also be given by position, in declaration
    order, like the dataclasses these models replaced."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def __init__(self, /, *args: Any, **data: Any) -> None:
        if args:
            names = list(type(self).model_fields)
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__} takes at most {len(names)} "
                                f"positional arguments, got {len(args)}")
            data.update(zip(names, args, strict=False))
        super().__init__(**data)


# --- errors ------------------------------------------------------------------------------


class ErrorDetail(WireModel):
    code: Str
    message: Str


class ErrorBody(WireModel):
    """``{"error": {"code", "message"}}``: every error answer of the server and the fleet."""

    error: ErrorDetail

    @classmethod
    def of(cls, code: str, message: str) -> ErrorBody:
        return cls(error=ErrorDetail(code=code, message=message))


# --- GET /operations ---------------------------------------------------------------------


class ParamSpec(WireModel):
    """One parameter of an operation.

    ``type`` is ``"int"``, ``"float"``, ``"bool"`` or ``"choice"`` (a newer server may
    add others); ``min``/``max`` bound numbers; ``choices`` lists the allowed values of a
    ``choice`` (empty otherwise, null on the wire); ``odd`` marks integers that must be
    odd (kernel sizes); ``description`` is help text.
    """

    name: Str
    type: Str
    default: Any
    min: Number | None = None
    max: Number | None = None
    choices: tuple[Any, ...] = ()
    odd: Bool = False
    description: str = ""

    @field_validator("description", mode="before")
    @classmethod
    def _description(cls, value: Any) -> str:
        return "" if value is None else value

    @field_validator("choices", mode="before")
    @classmethod
    def _choices(cls, value: Any) -> Any:
        # null is "no choices", like an empty list.
        return () if value is None else value

    @model_serializer(mode="wrap")
    def _wire(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        # The field order the server has always sent; "odd" only when set.
        ordered = {k: out[k] for k in ("name", "type", "default", "min", "max", "choices",
                                       "description")}
        ordered["choices"] = ordered["choices"] or None  # no choices: null, as always
        if self.odd:
            ordered["odd"] = True
        return ordered

    def allowed(self) -> str:
        """What a value may be, in words: ``an odd integer from 1 to 151``."""
        if self.type == "choice":
            return "one of " + ", ".join(str(c) for c in self.choices or ())
        if self.type == "bool":
            return "true or false"
        if self.type == "float":
            kind = "a number"
        else:
            kind = "an odd integer" if self.odd else "an integer"
        return f"{kind} from {format_number(self.min)} to {format_number(self.max)}"


class OperationSpec(WireModel):
    """One operation the servers offer."""

    name: Str
    title: Str
    description: Str
    params: tuple[ParamSpec, ...]
    tileable: Bool

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


class Operations(WireModel):
    """The answer to ``GET /operations``."""

    operations: tuple[OperationSpec, ...]


# --- POST /process -----------------------------------------------------------------------


class ProcessResult(WireModel):
    """The JSON answer to ``POST /process``.

    ``url`` is the (expiring) link to the result, ``expires_at`` is timezone-aware.
    ``bytes`` is the result's size, ``tiles`` is 1 unless the server tiled the image,
    ``timings_ms`` are the server's own timings.
    """

    key: Str
    url: Str
    expires_at: Time
    instance_id: Str
    width: Int
    height: Int
    format: Str
    bytes: Int
    cached: Bool
    tiles: Int
    timings_ms: dict[str, float]

    @field_validator("timings_ms", mode="before")
    @classmethod
    def _timings(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for name, number in value.items():
                if isinstance(number, bool) or not isinstance(number, int | float):
                    raise PydanticCustomError("wire", "timings_ms[{name}] should be a number",
                                              {"name": repr(name)})
        return value


# --- GET /health -------------------------------------------------------------------------


class Load(WireModel):
    """How loaded an instance is, from ``GET /health``'s ``load`` object.

    ``busy`` of ``slots`` processing slots are working, ``queued`` requests wait
    (at most ``queue_limit``; beyond that the instance answers 503 ``overloaded``),
    ``completed`` counts finished requests since start, ``shed`` those refused for
    load, ``stopped`` those stopped before they finished (None from older servers).
    """

    busy: Int
    slots: Int
    queued: Int
    queue_limit: Int
    completed: Int
    shed: Int | None = None
    stopped: Int | None = None

    @model_serializer(mode="wrap")
    def _wire(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items()
                if v is not None or k not in ("shed", "stopped")}


class ServerHealth(WireModel):
    """The answer to ``GET /health`` (``status`` is ``"ok"``, ``"degraded"`` or
    ``"draining"``). ``load`` is None from a server that does not report it;
    ``problems`` say what keeps a degraded server from its work."""

    status: Str
    problems: tuple[str, ...] = ()
    instance_id: Str
    inflight: Int
    processed: Int
    load: Load | None = None
    uptime_s: Annotated[float, BeforeValidator(_number)]
    version: Str
    pid: Int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- GET /fleet --------------------------------------------------------------------------


class FleetInstance(WireModel):
    """One instance in ``GET /fleet`` (``health`` is an ALB target state; ``inflight``
    is None when the provider cannot know it)."""

    id: Str
    state: Str
    health: Str
    address: Str | None
    inflight: Int | None
    launched_at: FleetTime | None


class FleetEvent(WireModel):
    """One entry of the fleet's event log."""

    at: FleetTime | None
    kind: Str
    instance_id: Str | None
    message: Str


class FleetState(WireModel):
    """The answer to ``GET /fleet``, newest event last."""

    name: Str
    provider: Str
    desired: Int
    min: Int
    max: Int
    instances: tuple[FleetInstance, ...]
    events: tuple[FleetEvent, ...]


class ScaleAnswer(WireModel):
    """The answer to ``POST /fleet/scale``: the desired count the fleet took, its range."""

    desired: Int
    min: Int
    max: Int


class TerminateAnswer(WireModel):
    """The answer to ``POST /fleet/instances/<id>/terminate`` (``status`` is
    ``"replacing"`` or the instance's state when it is already on its way out)."""

    instance_id: Str
    status: Str


# --- validation errors in words -------------------------------------------------------------

_KINDS = {
    "string_type": "a string", "int_type": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "bool_type": "true or false", "list_type": "a list",
    "tuple_type": "a list", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object",
}


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def describe_error(exc: ValidationError, where: str) -> str:
    """The first problem of ``exc`` in one sentence naming the field:
    ``GET /fleet: instances[0]: missing field 'id'``."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    kind = error["type"]
    if not loc:
        return f"{where}: expected a JSON object, got {type(error['input']).__name__}"
    *parents, leaf = loc
    prefix = f"{where}: {_path(tuple(parents))}" if parents else where
    if kind == "missing":
        return f"{prefix}: missing field {leaf!r}"
    if kind == "wire":
        return f"{prefix}: {error['msg']}"
    if kind == "wrong_type":
        return f"{prefix}: field {leaf!r} {error['msg']}"
    if kind in _KINDS:
        return f"{prefix}: field {leaf!r} should be {_KINDS[kind]}, got {error['input']!r}"
    return f"{prefix}: field {leaf!r}: {error['msg']}"


# --- parameter values: one set of rules for the server, the command line and the app --------

KNOWN_TYPES = frozenset({"int", "float", "bool", "choice"})
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
# Numbers sent as text (form fields, command lines): plain decimal notation only.
NUMBER = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?")


class ParamError(ValueError):
    """A value that does not fit its parameter's spec; the message says what is allowed."""


def parse_bool(value: Any) -> bool | None:
    """True/False for a boolean, 0/1 or one of the true/false words; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    return None


def format_number(value: float | None) -> str:
    """A bound as people write it: ``15``, ``0.5``; ``any`` for no bound."""
    if value is None:
        return "any"
    return str(int(value)) if float(value).is_integer() else str(value)


def check_param(spec: ParamSpec, value: Any) -> Any:
    """``value`` (a JSON value or text) in its canonical Python type for ``spec``, or
    :class:`ParamError`. A type this code does not know is passed through unchanged."""
    if spec.type == "bool":
        flag = parse_bool(value)
        if flag is None:
            raise ParamError(spec.allowed())
        return flag
    if spec.type == "choice":
        for choice in spec.choices or ():
            if value == choice and type(value) is type(choice):
                return choice
        raise ParamError(spec.allowed())
    if spec.type not in KNOWN_TYPES:
        return value
    # Numbers: JSON numbers and numeric text (form fields, command line k=v).
    number: float
    if isinstance(value, bool):
        raise ParamError(spec.allowed())
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            raise ParamError(spec.allowed()) from None
    elif isinstance(value, str) and NUMBER.fullmatch(value):
        number = float(value)
    else:
        raise ParamError(spec.allowed())
    if not math.isfinite(number) or (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max):
        raise ParamError(spec.allowed())
    if spec.type == "int":
        if number != int(number) or (spec.odd and int(number) % 2 == 0):
            raise ParamError(spec.allowed())
        return int(number)
    return number
