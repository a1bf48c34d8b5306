"""The wire contract itself (server/api.py): round trips, forward compatibility, errors
that name the field, and the one parameter check, against what the producers send."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from fleet.manager import FleetManager
from fleet.model import Event, FleetSpec, Health, Instance, InstanceState
from fleet.providers.memory import InMemoryProvider
from server import ServerConfig, api, create_app
from server.operations import default_registry
from server.storage import MemoryStorage

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e22d0db10000000049454e44ae426082")


def result_body(**change: Any) -> dict[str, Any]:
    return {"key": "k.png", "url": "/results/k.png?x=1", "expires_at": "2030-01-02T03:04:05Z",
            "instance_id": "w1", "width": 8, "height": 6, "format": "png", "bytes": 99,
            "cached": False, "tiles": 1, "timings_ms": {"decode": 1.5, "total": 2.0},
            **change}


def describe(model: type[api.WireModel], body: Any, where: str = "X") -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return api.describe_error(caught.value, where)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model, body", [
    (api.ProcessResult, result_body()),
    (api.ServerHealth, {"status": "ok", "problems": [], "instance_id": "w1", "inflight": 0,
                        "processed": 3, "load": {"busy": 0, "slots": 2, "queued": 0,
                                                 "queue_limit": 4, "completed": 3,
                                                 "shed": 0, "stopped": 0},
                        "uptime_s": 1.25, "version": "1.0", "pid": 42}),
    (api.FleetState, {"name": "f", "provider": "local", "desired": 2, "min": 1, "max": 3,
                      "instances": [{"id": "w1", "state": "running", "health": "healthy",
                                     "address": "127.0.0.1:9", "inflight": None,
                                     "launched_at": "2026-01-01T00:00:00.250Z"}],
                      "events": [{"at": None, "kind": "launch", "instance_id": None,
                                  "message": "m"}]}),
    (api.ErrorBody, {"error": {"code": "bad_request", "message": "no"}}),
    (api.ScaleAnswer, {"desired": 2, "min": 1, "max": 3}),
    (api.TerminateAnswer, {"instance_id": "w1", "status": "replacing"}),
])
def test_a_body_survives_validate_and_dump_unchanged(model: type[api.WireModel],
                                                     body: dict[str, Any]) -> None:
    assert model.model_validate(body).model_dump(mode="json") == body


def test_every_operation_round_trips_in_the_servers_own_json() -> None:
    for op in default_registry().values():
        sent = op.to_json()
        assert api.OperationSpec.model_validate(sent).model_dump(mode="json") == sent
        for param in sent["params"]:
            # the keys the server has always sent, "odd" only on odd-only integers
            assert list(param)[:7] == ["name", "type", "default", "min", "max", "choices",
                                       "description"]
            assert param.get("odd", True) is True


def test_the_server_answers_are_the_models_dumped() -> None:
    app = create_app(ServerConfig(instance_id="t-1"), storage=MemoryStorage())
    client = app.test_client()
    health = client.get("/health").get_json()
    assert api.ServerHealth.model_validate(health).model_dump(mode="json") == health
    assert health["instance_id"] == "t-1" and set(health["load"]) >= {"shed", "stopped"}
    ops = json.loads(client.get("/operations").data)
    assert api.Operations.model_validate(ops).model_dump(mode="json") == ops
    answer = client.post("/process", data={"operation": "invert", "image": (
        io.BytesIO(PNG_1x1), "a.png")}).get_json()
    result = api.ProcessResult.model_validate(answer)
    assert result.model_dump(mode="json") == answer
    assert answer["expires_at"].endswith("Z") and result.expires_at.tzinfo is not None
    error = client.get("/results/nope").get_json()
    assert api.ErrorBody.model_validate(error).error.code == "not_found"


def test_the_fleet_state_keeps_its_millisecond_times() -> None:
    def clock() -> float:
        return 1_700_000_000.5

    manager = FleetManager(InMemoryProvider(clock), FleetSpec(name="f", desired=1, min=1, max=1),
                           clock=clock)
    manager.record(Event(1_700_000_000.5, "launch", "w1", "launched"))
    state = manager.snapshot()
    assert state["events"] == [{"at": "2023-11-14T22:13:20.500Z", "kind": "launch",
                                "instance_id": "w1", "message": "launched"}]
    assert api.FleetState.model_validate(state).model_dump(mode="json") == state
    inst = Instance("w1", InstanceState.RUNNING, Health.HEALTHY, None, 0.0, inflight=None)
    assert inst.to_json() == {"id": "w1", "state": "running", "health": "healthy",
                              "address": None, "inflight": None,
                              "launched_at": "1970-01-01T00:00:00.000Z"}


# --------------------------------------------------------------------------- compatibility


def test_fields_from_a_newer_server_are_ignored() -> None:
    result = api.ProcessResult.model_validate(result_body(colour_space="p3", extra={"a": 1}))
    assert "colour_space" not in result.model_dump()
    health = api.ServerHealth.model_validate({
        "status": "ok", "instance_id": "w", "inflight": 0, "processed": 0, "uptime_s": 0,
        "version": "9", "load": {"busy": 0, "slots": 1, "queued": 0, "queue_limit": 1,
                                 "completed": 0, "future": 7}})
    assert health.load is not None and health.problems == () and health.pid is None
    spec = api.ParamSpec.model_validate({"name": "n", "type": "colour", "default": "red",
                                         "unit": "px"})
    assert spec.choices == () and spec.description == ""


def test_models_are_frozen() -> None:
    result = api.ProcessResult.model_validate(result_body())
    with pytest.raises(ValidationError):
        result.width = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- errors name the field


@pytest.mark.parametrize("model, body, message", [
    (api.ProcessResult, {k: v for k, v in result_body().items() if k != "key"},
     "X: missing field 'key'"),
    (api.ProcessResult, result_body(width="8"), "X: field 'width' should be an integer, got '8'"),
    (api.ProcessResult, result_body(cached=1), "X: field 'cached' should be true or false"),
    (api.ProcessResult, result_body(expires_at=True), "X: field 'expires_at' is not a valid time"),
    (api.ProcessResult, result_body(timings_ms={"a": None}), "X: timings_ms['a'] should be"),
    (api.FleetState, {"name": "f", "provider": "p", "desired": 1, "min": 1, "max": 1,
                      "instances": [{"state": "running"}], "events": []},
     "X: instances[0]: missing field 'id'"),
    (api.Operations, {"operations": [{"name": "a", "title": "", "description": "",
                                      "tileable": True, "params": [{"name": "k",
                                                                    "type": "int"}]}]},
     "X: operations[0].params[0]: missing field 'default'"),
    (api.ParamSpec, {"name": "k", "type": "int", "default": 1, "min": True},
     "X: field 'min' should be a number, got True"),
    (api.ServerHealth, [], "X: expected a JSON object, got list"),
])
def test_a_bad_body_is_described_by_its_field(model: type[api.WireModel], body: Any,
                                              message: str) -> None:
    assert describe(model, body).startswith(message)


# --------------------------------------------------------------------------- parameter values


def spec(**fields: Any) -> api.ParamSpec:
    return api.ParamSpec(**{"name": "p", "default": None, **fields})


@pytest.mark.parametrize("word, value", [
    *[(w, True) for w in ("true", "YES", "on", "1", " True ")],
    *[(w, False) for w in ("false", "no", "OFF", "0")], (1, True), (0, False), (True, True)])
def test_one_set_of_words_means_true_and_false(word: Any, value: bool) -> None:
    assert api.parse_bool(word) is value
    assert api.check_param(spec(type="bool"), word) is value


@pytest.mark.parametrize("value", ["maybe", 2, None, ""])
def test_other_words_are_not_booleans(value: Any) -> None:
    assert api.parse_bool(value) is None
    with pytest.raises(api.ParamError, match="true or false"):
        api.check_param(spec(type="bool"), value)


def test_numbers_are_checked_against_their_bounds() -> None:
    ksize = spec(type="int", min=1, max=151, odd=True)
    assert api.check_param(ksize, "15") == 15 and api.check_param(ksize, 15.0) == 15
    for bad in (14, 153, "1e400", "x", True, 2.5):
        with pytest.raises(api.ParamError, match="an odd integer from 1 to 151"):
            api.check_param(ksize, bad)
    sigma = spec(type="float", min=0, max=0.5)
    assert api.check_param(sigma, "0.25") == 0.25
    with pytest.raises(api.ParamError, match=r"a number from 0 to 0\.5"):
        api.check_param(sigma, float("nan"))
    mode = spec(type="choice", choices=("fit", "fill"))
    assert api.check_param(mode, "fill") == "fill"
    with pytest.raises(api.ParamError, match="one of fit, fill"):
        api.check_param(mode, "crop")
    assert api.check_param(spec(type="colour"), "red") == "red"  # unknown type: as given


@pytest.mark.parametrize("value, text", [(None, "any"), (15, "15"), (15.0, "15"),
                                         (0.5, "0.5"), (-2.25, "-2.25")])
def test_one_number_formatter(value: float | None, text: str) -> None:
    assert api.format_number(value) == text


def test_positional_construction_follows_the_field_order() -> None:
    param = api.ParamSpec("ksize", "int", 15, 1, 151)
    assert (param.name, param.default, param.min, param.max) == ("ksize", 15, 1, 151)
    with pytest.raises(TypeError, match="at most"):
        api.TerminateAnswer("a", "b", "c")
    when = datetime(2026, 1, 1, tzinfo=UTC)
    assert api.FleetEvent(when, "k", None, "m").at == when
