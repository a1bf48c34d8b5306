"""A worker's GET /metrics: Prometheus text that prometheus-client's own parser reads,
with counters that move with real requests to a real server process."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from server import ServerConfig, create_app


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_metrics_move_with_real_requests(server_process, camera_png):
    server = server_process()
    before = samples(server.get("/metrics").text)
    assert before[("imagefleet_worker_inflight", ())] == 0
    for _ in range(3):
        r = server.post("/process", files={"image": ("c.png", camera_png)},
                        data={"operation": "grayscale"})
        assert r.status_code == 200
    bad = server.post("/process", files={"image": ("c.png", camera_png)},
                      data={"operation": "nope"})
    assert bad.status_code == 400
    after = samples(server.get("/metrics").text)
    ok = ("imagefleet_worker_requests_total", (("operation", "grayscale"), ("status", "200")))
    assert after[ok] - before.get(ok, 0) == 3
    assert after[("imagefleet_worker_cache_hits_total", ())] == 2  # same input twice more
    assert after[("imagefleet_worker_stage_seconds_count", (("stage", "total"),))] == 3
    assert after[("imagefleet_worker_stage_seconds_count", (("stage", "encode"),))] == 1
    assert after[("imagefleet_worker_bytes_in_total", ())] > 3 * len(camera_png)
    assert after[("imagefleet_worker_bytes_out_total", ())] > 0
    assert sum(v for (n, labels), v in after.items()
               if n == "imagefleet_worker_requests_total" and ("status", "400") in labels) == 1
    assert ("imagefleet_worker_shed_total", ()) in after


def test_metrics_need_the_token_off_loopback(make_app):
    app = make_app(token="s3cret-token")
    client = app.test_client()
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    assert client.get("/metrics", environ_base=remote).status_code == 401
    assert client.get("/metrics", environ_base=remote,
                      headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    # a proxy on loopback forwarding someone else's request is not local
    assert client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 401


def test_each_app_counts_its_own():
    a, b = create_app(ServerConfig()), create_app(ServerConfig())
    assert a.extensions["imagefleet"].metrics.registry is not \
        b.extensions["imagefleet"].metrics.registry
