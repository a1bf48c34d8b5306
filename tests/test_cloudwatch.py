"""The rolling window published to CloudWatch (fleet/aws/cloudwatch.py): the pure
conversion, publishing to moto's CloudWatch (in process) and reading it back, a failing
call backed off without stopping the sampler, and the config switch ``up`` turns on."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from test_manager_host import MINIMAL

from fleet.aws import stack as aws_stack
from fleet.aws.cloudwatch import (
    MAX_ENTRIES_PER_CALL,
    METRICS,
    NAMESPACE,
    CloudWatchPublisher,
    batches,
    metric_data,
)
from fleet.aws.config import ConfigError, config_from_dict
from fleet.aws.main import leader_only
from fleet.window import Sample, Sampler, Window

REGION = "eu-west-1"
FLEET = "demo"
AT = 1_780_000_000.0  # a fixed time, seconds since the epoch


def _sample(at: float = AT, *, p50: float | None = 12.5, p95: float | None = 40.0,
            requests: float = 50.0) -> Sample:
    return Sample(at, 5.0, requests, 5.0, 10.0, p50, p95, 3, 2, 2, (("i-1", 4), ("i-2", 0)))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """A CloudWatch client that records its calls, failing while ``error`` is set."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error

    def put_metric_data(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error


def _denied() -> ClientError:
    # moto accepts every call whatever the policy says, so it cannot show a denied
    # permission: the refusal is injected at the client boundary, as AWS would send it.
    return ClientError({"Error": {"Code": "AccessDenied", "Message": "User: arn:aws:sts::"
                                  "123456789012:assumed-role/imgf-demo-manager/i-1 is not "
                                  "authorized to perform: cloudwatch:PutMetricData"}},
                       "PutMetricData")


# ------------------------------------------------------------------ the conversion

ALL = {"RequestsPerSecond": (10.0, "Count/Second"), "ErrorsPerSecond": (1.0, "Count/Second"),
       "ShedPerSecond": (2.0, "Count/Second"), "LatencyP50": (12.5, "Milliseconds"),
       "LatencyP95": (40.0, "Milliseconds"), "DesiredInstances": (3.0, "Count"),
       "HealthyInstances": (2.0, "Count"), "Instances": (2.0, "Count")}
NO_LATENCY = {k: v for k, v in ALL.items() if not k.startswith("Latency")}


@pytest.mark.parametrize(("sample", "expected"), [
    (_sample(), ALL),
    # An interval without requests has no latency: left out, not sent as zero.
    (_sample(p50=None, p95=None, requests=0.0),
     {**NO_LATENCY, "RequestsPerSecond": (0.0, "Count/Second")}),
    (_sample(p50=3.0, p95=None), {**NO_LATENCY, "LatencyP50": (3.0, "Milliseconds")}),
    (_sample(p50=float("nan"), p95=float("inf")), NO_LATENCY),  # CloudWatch refuses these
])
def test_a_sample_becomes_metric_data(sample: Sample,
                                      expected: dict[str, tuple[float, str]]) -> None:
    entries = metric_data(sample, FLEET)
    assert {e["MetricName"]: (e["Value"], e["Unit"]) for e in entries} == expected
    assert [e["MetricName"] for e in entries] == [m.name for m in METRICS
                                                  if m.name in expected]  # one each
    for entry in entries:
        assert entry["Dimensions"] == [{"Name": "Fleet", "Value": FLEET}]
        assert entry["Timestamp"] == dt.datetime.fromtimestamp(AT, tz=dt.UTC)
        assert type(entry["Value"]) is float


def test_the_metric_set_is_small_and_has_no_per_instance_series() -> None:
    # CloudWatch bills each custom metric: eight, one dimension set, whatever the size.
    names = [m.name for m in METRICS]
    assert len(names) == 8 == len(set(names))
    entries = metric_data(_sample(), FLEET)
    assert {tuple(d["Name"] for d in e["Dimensions"]) for e in entries} == {("Fleet",)}


def test_calls_carry_at_most_a_thousand_entries() -> None:
    entries = [{"n": i} for i in range(2 * MAX_ENTRIES_PER_CALL + 500)]
    calls = batches(entries)
    assert [len(c) for c in calls] == [1000, 1000, 500]
    assert [e for c in calls for e in c] == entries
    assert batches([]) == []


# -------------------------------------------------------------- publishing to moto

@pytest.fixture
def cloudwatch(fake_aws: None) -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("cloudwatch", region_name=REGION)


def test_published_samples_read_back_from_cloudwatch(cloudwatch: Any) -> None:
    clock = Clock()
    publisher = CloudWatchPublisher(cloudwatch, FLEET, clock=clock)
    # Two samples within one minute, a little in the past (CloudWatch takes up to two
    # weeks back), so one period of 60 s holds both.
    minute = (int(dt.datetime.now(dt.UTC).timestamp()) // 60 - 2) * 60
    publisher.add(_sample(minute + 10))
    publisher.add(_sample(minute + 15, p50=None, p95=None, requests=0.0))
    assert not asyncio.run(publisher.flush())  # not yet: a minute's points per call
    clock.now += publisher.flush_interval_s
    assert asyncio.run(publisher.flush())
    assert publisher.pending == 0

    listed = cloudwatch.list_metrics(Namespace=NAMESPACE,
                                     Dimensions=[{"Name": "Fleet", "Value": FLEET}])
    assert sorted(m["MetricName"] for m in listed["Metrics"]) == sorted(
        m.name for m in METRICS)

    def stats(name: str) -> dict[str, Any]:
        points = cloudwatch.get_metric_statistics(
            Namespace=NAMESPACE, MetricName=name,
            Dimensions=[{"Name": "Fleet", "Value": FLEET}],
            StartTime=dt.datetime.fromtimestamp(minute, tz=dt.UTC),
            EndTime=dt.datetime.fromtimestamp(minute + 60, tz=dt.UTC), Period=60,
            Statistics=["SampleCount", "Sum", "Maximum"])["Datapoints"]
        assert len(points) == 1, (name, points)
        return points[0]

    requests = stats("RequestsPerSecond")
    assert (requests["SampleCount"], requests["Sum"], requests["Unit"]) == (
        2.0, 10.0, "Count/Second")
    latency = stats("LatencyP95")  # only the sample that had requests
    assert (latency["SampleCount"], latency["Maximum"], latency["Unit"]) == (
        1.0, 40.0, "Milliseconds")
    assert stats("HealthyInstances")["Maximum"] == 2.0


def test_a_stopping_manager_sends_what_is_pending_at_once(cloudwatch: Any) -> None:
    clock = Clock()
    publisher = CloudWatchPublisher(cloudwatch, FLEET, clock=clock)
    minute = (int(dt.datetime.now(dt.UTC).timestamp()) // 60 - 2) * 60
    publisher.add(_sample(minute + 10))
    assert not asyncio.run(publisher.flush())  # the minute is not over
    assert asyncio.run(publisher.final_flush())  # but the manager is stopping
    assert publisher.pending == 0
    listed = cloudwatch.list_metrics(Namespace=NAMESPACE,
                                     Dimensions=[{"Name": "Fleet", "Value": FLEET}])
    assert len(listed["Metrics"]) == len(METRICS)
    assert not asyncio.run(publisher.final_flush())  # nothing left


def test_the_final_flush_is_skipped_in_a_backoff_and_bounded_in_time() -> None:
    clock = Clock()
    client = Recording(_denied())
    publisher = CloudWatchPublisher(client, FLEET, clock=clock)
    publisher.add(_sample())
    clock.now += 60
    asyncio.run(publisher.flush())
    assert len(client.calls) == 1
    assert not asyncio.run(publisher.final_flush())  # denied a moment ago: not again
    assert len(client.calls) == 1

    gate = threading.Event()

    class Hanging:
        def put_metric_data(self, **_call: Any) -> None:
            gate.wait(30)  # an endpoint that never answers

    slow = CloudWatchPublisher(Hanging(), FLEET, clock=clock)
    slow.add(_sample())
    started = time.monotonic()

    async def stop() -> bool:
        try:
            return await slow.final_flush(timeout_s=0.3)
        finally:
            gate.set()  # lets the worker thread end, which asyncio.run waits for

    assert not asyncio.run(stop())
    assert time.monotonic() - started < 10


# ------------------------------------------------------------------ failures

def test_a_denied_call_is_logged_backed_off_and_retried(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    client = Recording(_denied())
    publisher = CloudWatchPublisher(client, FLEET, clock=clock, flush_interval_s=60.0,
                                    backoff_cap_s=240.0)
    publisher.add(_sample())
    clock.now += 60
    with caplog.at_level(logging.WARNING, logger="fleet.aws.cloudwatch"):
        assert not asyncio.run(publisher.flush())  # does not raise
    assert "AccessDenied" in caplog.text and "next try in 60 s" in caplog.text
    assert (len(client.calls), publisher.failures, publisher.pending) == (1, 1, 8)

    # Every sample of the backoff is kept, but no call is made before it ends.
    for step in range(11):
        clock.now += 5
        publisher.add(_sample(AT + 5 * (step + 1)))
        asyncio.run(publisher.flush())
    assert len(client.calls) == 1
    clock.now += 5
    asyncio.run(publisher.flush())
    assert (len(client.calls), publisher.failures) == (2, 2)
    assert publisher.not_before == clock.now + 120  # doubled
    clock.now += 120
    asyncio.run(publisher.flush())
    assert publisher.not_before == clock.now + 240  # the cap
    clock.now += 240
    asyncio.run(publisher.flush())
    assert publisher.not_before == clock.now + 240

    # Allowed again: everything kept goes out, oldest first, and the delay resets.
    client.error = None
    clock.now += 240
    assert asyncio.run(publisher.flush())
    sent = client.calls[-1]
    assert sent["Namespace"] == NAMESPACE and len(sent["MetricData"]) == 12 * 8
    stamps = [e["Timestamp"] for e in sent["MetricData"]]
    assert stamps == sorted(stamps)
    assert (publisher.failures, publisher.pending) == (0, 0)
    assert publisher.not_before == clock.now + 60


def test_what_waits_is_bounded_oldest_dropped_first() -> None:
    clock = Clock()
    client = Recording(_denied())
    publisher = CloudWatchPublisher(client, FLEET, clock=clock, max_pending=20)
    samples = [_sample(AT + n) for n in range(5)]  # 8 points each
    for sample in samples:
        publisher.add(sample)
    assert publisher.pending == 20
    clock.now += 60
    asyncio.run(publisher.flush())
    assert publisher.pending == 20
    client.error = None
    clock.now += 3600
    assert asyncio.run(publisher.flush())
    assert client.calls[-1]["MetricData"] == (metric_data(samples[2], FLEET)[-4:]
                                              + metric_data(samples[3], FLEET)
                                              + metric_data(samples[4], FLEET))


def test_a_failing_publisher_does_not_stop_the_sampler(
        caplog: pytest.LogCaptureFixture) -> None:
    """The sampler and the publisher as the AWS manager runs them, fast: each publish
    fails, and the window still fills."""
    client = Recording(_denied())
    window = Window(maxlen=100, interval_s=0.02)

    async def scenario() -> tuple[int, int]:
        publisher = CloudWatchPublisher(client, FLEET, flush_interval_s=0.02,
                                        backoff_cap_s=0.05)
        sampler = Sampler(window, lambda: (2, []), on_sample=publisher.add)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(sampler.run(stop)),
                 asyncio.create_task(publisher.run(stop, tick_s=0.01))]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(window.samples) < 10 or publisher.failures < 3:
            assert loop.time() < deadline, "the sampler or the publisher stalled"
            assert not any(t.done() for t in tasks), "a task ended"
            await asyncio.sleep(0.01)  # polling, with the deadline above
        stop.set()
        await asyncio.gather(*tasks)
        return len(window.samples), publisher.failures

    with caplog.at_level(logging.WARNING, logger="fleet.aws.cloudwatch"):
        samples, failures = asyncio.run(scenario())
    assert samples >= 10 and failures >= 3
    assert "could not publish the fleet window to CloudWatch" in caplog.text


def test_a_raising_listener_does_not_cost_the_window_a_sample() -> None:
    window = Window(maxlen=10)
    times = iter([10.0, 15.0, 20.0])

    def broken(sample: Sample) -> None:
        raise RuntimeError("listener bug")

    sampler = Sampler(window, lambda: (1, []), clock=lambda: next(times), on_sample=broken)

    async def scenario() -> None:
        for _ in range(3):
            await sampler.sample_once(None)  # no live worker: nothing is fetched

    asyncio.run(scenario())
    assert [s.at for s in window.samples] == [15.0, 20.0]


def test_only_the_leader_publishes() -> None:
    class Service:
        leading = False

    seen: list[Sample] = []
    service = Service()
    on_sample = leader_only(service, seen.append)  # type: ignore[arg-type]
    on_sample(_sample(AT))
    service.leading = True
    on_sample(_sample(AT + 5))
    assert [s.at for s in seen] == [AT + 5]


# ------------------------------------------------------------------ the switch

def test_cloudwatch_metrics_is_off_unless_set() -> None:
    assert config_from_dict(dict(MINIMAL)).cloudwatch_metrics is False
    assert config_from_dict({**MINIMAL, "cloudwatch_metrics": True}).cloudwatch_metrics
    with pytest.raises(ConfigError, match="'cloudwatch_metrics' must be true or false"):
        config_from_dict({**MINIMAL, "cloudwatch_metrics": "yes"})


def test_the_manager_config_up_writes_turns_it_on() -> None:
    names = aws_stack.Names(FLEET, "123456789012", REGION)
    config = aws_stack.manager_config(
        names=names, vpc_id="vpc-1", subnets=("subnet-a",), ami="ami-1",
        instance_types=("t3.small",), ssh_user="admin", result_days=7, https=True,
        token=True, admin_port=8001)
    assert config["cloudwatch_metrics"] is True


def test_the_manager_role_may_put_metrics_only_into_the_namespace() -> None:
    names = aws_stack.Names(FLEET, "123456789012", REGION)
    policy = aws_stack.manager_policy(names, worker_sg="sg-w", target_group_arn="arn:tg")
    put = [s for s in policy["Statement"]
           if "cloudwatch:PutMetricData" in str(s["Action"])]
    assert put == [{"Sid": "PutOnlyFleetMetrics", "Effect": "Allow",
                    "Action": "cloudwatch:PutMetricData", "Resource": "*",
                    "Condition": {"StringEquals": {"cloudwatch:namespace": NAMESPACE}}}]


# ------------------------------------------------------------- the manager's wiring

def test_the_aws_manager_publishes_its_window_while_it_leads(
        cloudwatch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` as ``python -m fleet run`` runs it, on moto in process (an empty fleet:
    nothing is launched), with the intervals shortened: the lease is taken, samples are
    taken and reach CloudWatch under Fleet=<name>."""
    from helpers_manager import moto_fleet_config

    from fleet.aws import cloudwatch as cloudwatch_module
    from fleet.aws.main import build_service, serve

    class Quick(CloudWatchPublisher):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, flush_interval_s=0.05, **kwargs)

        async def run(self, stop: asyncio.Event, tick_s: float = 0.02) -> None:
            await super().run(stop, tick_s)

    monkeypatch.setattr(cloudwatch_module, "CloudWatchPublisher", Quick)
    config = config_from_dict(moto_fleet_config(None, "cw", admin_port=0,
                                                cloudwatch_metrics=True))
    service = build_service(config)
    service.manager.samples = Window(maxlen=100, interval_s=0.05)

    def published() -> dict[str, Any]:
        return {m["MetricName"]: m for m in cloudwatch.list_metrics(
            Namespace=NAMESPACE, Dimensions=[{"Name": "Fleet", "Value": "cw"}])["Metrics"]}

    async def scenario() -> dict[str, Any]:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop, service))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        try:
            while "DesiredInstances" not in published():
                assert loop.time() < deadline, "nothing published"
                assert not task.done(), task
                await asyncio.sleep(0.05)  # polling, with the deadline above
            assert service.leading
        finally:
            stop.set()
            await task
        return published()

    metrics = asyncio.run(scenario())
    # No worker answered: no request and so no latency; the counts and rates are there.
    assert set(metrics) == {m.name for m in METRICS} - {"LatencyP50", "LatencyP95"}
    now = dt.datetime.now(dt.UTC)
    points = cloudwatch.get_metric_statistics(
        Namespace=NAMESPACE, MetricName="Instances",
        Dimensions=[{"Name": "Fleet", "Value": "cw"}],
        StartTime=now - dt.timedelta(minutes=5), EndTime=now + dt.timedelta(minutes=1),
        Period=60, Statistics=["Maximum"])["Datapoints"]
    assert points and all(p["Maximum"] == 0.0 for p in points)
