"""Property tests for parameter and pipeline validation.

Whatever a client sends as a parameter value or as the `params`/`steps` text, the
server either gets a value inside the declared bounds, choices and type, or a 400
ApiError that names what is allowed. Never another exception (that would be a 500).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from server.errors import ApiError
from server.operations import default_registry
from server.params import ParamSpec, parse_param
from server.pipeline import MAX_STEPS, Pipeline, parse_pipeline

REGISTRY = default_registry()
SPECS: list[tuple[str, ParamSpec]] = [(op.name, spec) for op in REGISTRY.values()
                                      for spec in op.params]
NUMERIC_SPECS = [(op, spec) for op, spec in SPECS if spec.type in ("int", "float")]
PIPELINE_ERROR_CODES = {"invalid_json", "invalid_params", "invalid_steps", "invalid_request",
                        "missing_field", "unknown_operation", "invalid_parameter"}

FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MODERATE = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

numeric_strings = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400",
                     " 5 ", "5_0", "0x10", "1,5", "²", "٣", "", "-0", "+3", "3.", ".5",
                     "9" * 40, "true", "False", "1", "0"]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    # Within float range: beyond it, see test_integers_beyond_float_range_are_refused.
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    numeric_strings,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def assert_within_spec(spec: ParamSpec, value: Any) -> None:
    if spec.type == "bool":
        assert type(value) is bool
    elif spec.type == "choice":
        assert type(value) is str and value in spec.choices
    else:
        assert type(value) is (int if spec.type == "int" else float), (spec.name, value)
        assert math.isfinite(value)
        assert spec.min is None or value >= spec.min
        assert spec.max is None or value <= spec.max
        if spec.odd:
            assert value % 2 == 1


def assert_explains(error: ApiError, op_name: str, spec: ParamSpec) -> None:
    assert error.status == 400 and error.code == "invalid_parameter"
    assert op_name in error.message and f"'{spec.name}'" in error.message
    assert "allowed: " + spec.allowed() in error.message
    if spec.type == "choice":
        assert all(choice in error.message for choice in spec.choices)
    elif spec.type in ("int", "float"):
        assert "from " in error.message and " to " in error.message


@FAST
@given(st.sampled_from(SPECS), json_values)
def test_parse_returns_an_allowed_value_or_explains(op_and_spec, value: Any) -> None:
    op_name, spec = op_and_spec
    try:
        parsed = parse_param(op_name, spec, value)
    except ApiError as error:
        assert_explains(error, op_name, spec)
    else:
        assert_within_spec(spec, parsed)


@FAST
@given(st.data())
def test_values_near_the_bounds_are_accepted_exactly_when_allowed(data) -> None:
    op_name, spec = data.draw(st.sampled_from(NUMERIC_SPECS))
    lo, hi = spec.min, spec.max
    if spec.type == "int":
        value = data.draw(st.integers(int(lo) - 3, int(hi) + 3))
        allowed = lo <= value <= hi and (not spec.odd or value % 2 == 1)
    else:
        value = data.draw(st.floats(lo - 2, hi + 2))
        allowed = lo <= value <= hi
    sent = data.draw(st.sampled_from([value, str(value)]))  # JSON number or form text
    try:
        parsed = parse_param(op_name, spec, sent)
    except ApiError as error:
        assert not allowed, f"{op_name}.{spec.name}: {value!r} refused: {error.message}"
        assert_explains(error, op_name, spec)
    else:
        assert allowed, f"{op_name}.{spec.name}: {value!r} accepted as {parsed!r}"
        assert parsed == value
        assert_within_spec(spec, parsed)


@pytest.mark.parametrize(("op_name", "spec"), SPECS, ids=[f"{o}.{s.name}" for o, s in SPECS])
def test_every_declared_default_and_choice_is_accepted(op_name: str, spec: ParamSpec) -> None:
    assert parse_param(op_name, spec, spec.default) == spec.default
    assert_within_spec(spec, spec.default)
    for choice in spec.choices:
        assert parse_param(op_name, spec, choice) == choice


@MODERATE
@given(st.sampled_from(NUMERIC_SPECS),
       st.integers(min_value=10**309, max_value=10**400) | st.integers(max_value=-(10**309),
                                                                        min_value=-(10**400)))
@example(op_and_spec=NUMERIC_SPECS[0], value=10**400)
def test_integers_beyond_float_range_are_refused(op_and_spec, value: int) -> None:
    op_name, spec = op_and_spec
    with pytest.raises(ApiError) as raised:
        parse_param(op_name, spec, value)
    assert_explains(raised.value, op_name, spec)


# --- Whole pipelines from form text ------------------------------------------------------

operation_names = st.one_of(st.none(), st.just(""), st.sampled_from(list(REGISTRY)),
                            st.text(max_size=30))
json_texts = st.one_of(
    st.none(),
    st.text(max_size=60),
    json_values.map(json.dumps),
    st.dictionaries(st.text(max_size=12), json_values, max_size=4).map(json.dumps),
)


def step_objects() -> st.SearchStrategy[dict[str, Any]]:
    """Steps that are often nearly right: a real operation with some of its parameters."""

    @st.composite
    def step(draw) -> dict[str, Any]:
        name = draw(st.one_of(st.sampled_from(list(REGISTRY)), json_scalars))
        out: dict[str, Any] = {} if draw(st.integers(0, 9)) == 0 else {"op": name}
        if isinstance(name, str) and name in REGISTRY:
            for spec in REGISTRY[name].params:
                if draw(st.booleans()):
                    out[spec.name] = draw(st.one_of(json_values, st.just(spec.default)))
        if draw(st.integers(0, 5)) == 0:
            out[draw(st.text(max_size=8))] = draw(json_values)
        return out

    return step()


def check_pipeline_outcome(operation, params, steps) -> Pipeline | None:
    try:
        pipeline = parse_pipeline(REGISTRY, operation, params, steps)
    except ApiError as error:
        assert error.status == 400, error
        assert error.code in PIPELINE_ERROR_CODES, error
        assert error.message
        return None
    assert 1 <= len(pipeline.steps) <= MAX_STEPS
    for step in pipeline.steps:
        specs = {spec.name: spec for spec in step.operation.params}
        assert set(step.params.as_dict()) == set(specs)
        for name, value in step.params.values:
            assert_within_spec(specs[name], value)
    # The canonical form parses back to itself: equal requests share a result key.
    again = parse_pipeline(REGISTRY, None, None, pipeline.canonical())
    assert again.canonical() == pipeline.canonical()
    return pipeline


@FAST
@given(operation_names, json_texts, json_texts)
def test_parse_pipeline_from_arbitrary_text_only_raises_400(operation, params, steps) -> None:
    check_pipeline_outcome(operation, params, steps)


@FAST
@given(st.lists(step_objects(), min_size=0, max_size=MAX_STEPS + 2))
def test_parse_pipeline_from_structured_steps_only_raises_400(steps: list) -> None:
    pipeline = check_pipeline_outcome(None, None, json.dumps(steps))
    if pipeline is not None:
        assert pipeline.names == [s["op"] for s in steps]


@FAST
@given(st.sampled_from(list(REGISTRY)),
       st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_parse_pipeline_operation_with_params_only_raises_400(operation: str,
                                                              params: dict) -> None:
    check_pipeline_outcome(operation, json.dumps(params), None)


@MODERATE
@given(st.integers(1000, 8000), st.sampled_from(["[", '{"a":']),
       st.sampled_from(["params", "steps"]))
def test_deeply_nested_json_is_refused(depth: int, opener: str, field: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + closer * depth
    operation = "invert" if field == "params" else None
    check_pipeline_outcome(operation, text if field == "params" else None,
                           text if field == "steps" else None)


# --- Integer form fields through the app --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_png() -> bytes:
    ok, buffer = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert ok
    return buffer.tobytes()


@pytest.fixture(scope="module")
def module_client():
    from server import ServerConfig, create_app
    from server.storage import MemoryStorage

    app = create_app(ServerConfig(instance_id="hypothesis"), storage=MemoryStorage())
    app.testing = False  # a bug must show as the 500 a client would get
    return app.test_client()


@MODERATE
@given(st.sampled_from(["quality", "expires_in"]),
       st.one_of(st.text(max_size=12), st.text("0123456789²³¹٣", min_size=1, max_size=12),
                 st.integers(-10**6, 10**7).map(str)))
@example(field="quality", raw="²")
def test_integer_form_fields_answer_200_or_400(module_client, tiny_png: bytes, field: str,
                                               raw: str) -> None:
    form = {"image": (io.BytesIO(tiny_png), "t.png"), "operation": "invert", "format": "jpeg",
            field: raw}
    response = module_client.post("/process", data=form, content_type="multipart/form-data")
    body = response.get_json()
    if response.status_code == 200:
        return
    assert response.status_code == 400, (raw, body)
    assert body["error"]["code"] == "invalid_parameter"
    assert f"'{field}'" in body["error"]["message"]
    assert "allowed: an integer from 1 to" in body["error"]["message"]
