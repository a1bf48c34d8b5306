"""Worker load as the workers themselves report it: ``GET /health`` on each instance's
own address (its private IP inside the VPC), read with the gateway's parser.

The ALB reports neither per-target in-flight requests nor completed work, so without
this the AWS manager cannot scale on load and can judge progress only by the ALB's
verdict. A manager that can reach the workers (running inside the VPC, or with
``poll_worker_load`` set where it can) polls them each observe cycle; an instance that
does not answer in time reports nothing (None), which the decision treats as unknown.
"""

from __future__ import annotations

import http.client
import logging
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from fleet.local.gateway import HEALTH_BODY_LIMIT, HealthReport, parse_health_report

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
PROBE_THREADS = 16

LoadProbe = Callable[[Mapping[str, str]], dict[str, HealthReport | None]]
"""``{instance id: "host:port"}`` -> ``{instance id: its /health report or None}``."""


def read_health(address: str, timeout: float = PROBE_TIMEOUT_S) -> HealthReport | None:
    """One worker's ``/health`` report, or None when it does not answer 200 in time.
    ``/health`` needs no token (load balancers call it without one)."""
    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as resp:
            return parse_health_report(resp.read(HEALTH_BODY_LIMIT))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError covers URLError/HTTPError (refused, timed out, not 200); HTTPException a
        # worker that answers something other than HTTP: either way, no report.
        log.debug("load probe of %s failed: %s", address, exc)
        return None


def probe_all(addresses: Mapping[str, str], timeout: float = PROBE_TIMEOUT_S,
              ) -> dict[str, HealthReport | None]:
    """Every worker at once (threads), so one slow worker costs one timeout, not N."""
    if not addresses:
        return {}
    with ThreadPoolExecutor(min(PROBE_THREADS, len(addresses)),
                            thread_name_prefix="load-probe") as pool:
        reports = pool.map(lambda address: read_health(address, timeout), addresses.values())
        return dict(zip(addresses, reports, strict=True))


def progress_times(previous: Mapping[str, int], reports: Mapping[str, HealthReport | None],
                   now: float) -> tuple[dict[str, int], dict[str, float]]:
    """The completed-work counters to remember, and for each instance whose counter grew
    since the last probe, ``now`` (evidence of progress: it finishes requests)."""
    counters = dict(previous)
    progressed = {}
    for iid, report in reports.items():
        if report is None or report.completed is None:
            continue
        before = counters.get(iid)
        if before is not None and report.completed > before:
            progressed[iid] = now
        counters[iid] = report.completed
    return counters, progressed
