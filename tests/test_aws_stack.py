"""The fleet's AWS description (fleet/aws/stack.py) as data: pure, ordered, complete.
No AWS here; tests/test_bootstrap_aws.py applies it to moto."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fleet.aws.apply import HANDLERS
from fleet.aws.stack import Fmt, Ref, StackParams, describe, resolve, template


def _params(**overrides: Any) -> StackParams:
    return dataclasses.replace(StackParams(
        fleet="demo", account="123456789012", region="eu-west-1", vpc_id="vpc-1",
        subnets=("subnet-a", "subnet-b"), lb_subnets=("subnet-a", "subnet-b"),
        ami="ami-1", manager_user_data="#!/bin/bash\n", manager_bundle=b"tar",
        manager_config={"listener_arn": Ref("listener_https", "arn"),
                        "api_url": Fmt("https://{}", Ref("certificate", "domain"))}),
        **overrides)


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, Fmt):
        return list(value.refs)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _refs(v)]
    return []


def test_the_description_is_pure_data_in_apply_order() -> None:
    first, second = template(_params()), template(_params())
    assert first == second
    json.dumps(first)  # plain data: printable, comparable
    seen: set[str] = set()
    for resource in describe(_params()):
        assert resource.kind in HANDLERS, resource.kind
        assert resource.key not in seen
        for ref in _refs(resource.props):
            assert ref.resource in seen, f"{resource.key} refers to later {ref.resource}"
        seen.add(resource.key)


def test_insecure_http_and_no_token_say_what_must_not_exist() -> None:
    secure = {r.key: r for r in describe(_params())}
    assert secure["listener_https"].present and secure["certificate"].present
    assert secure["admin_rule"].props["listener"] == Ref("listener_https", "arn")
    assert secure["metrics_rule"].props["listener"] == Ref("listener_https", "arn")
    assert secure["listener_http"].props["DefaultActions"][0]["Type"] == "redirect"
    plain = {r.key: r for r in describe(_params(https=False, token=False))}
    assert not plain["listener_https"].present and not plain["certificate"].present
    assert plain["admin_rule"].props["listener"] == Ref("listener_http", "arn")
    assert plain["metrics_rule"].props["listener"] == Ref("listener_http", "arn")
    assert plain["listener_http"].props["DefaultActions"][0]["Type"] == "forward"
    assert not plain["api_token"].present and plain["admin_token"].present
    assert "fleet-token" not in plain["worker_role"].props["policies"]
    ports = [rule["port"] for rule in plain["alb_sg"].props["ingress"]]
    assert ports == [80]


def test_refs_resolve_from_outputs_and_absent_ones_to_none() -> None:
    outputs = {"certificate": {"domain": "lb.example"}, "listener_https": {"arn": "arn:l"}}
    assert resolve({"a": [Ref("listener_https", "arn")],
                    "b": Fmt("https://{}", Ref("certificate", "domain"))}, outputs) == {
        "a": ["arn:l"], "b": "https://lb.example"}
    assert resolve(Ref("missing"), outputs) is None
