"""The REST API core (jobs, models/stores/transcoders, health, middleware), on SQLite and on a
real PostgreSQL server: each test has a database and a data dir of its own (`api` fixture).

Bad input and abuse answer 4xx problem documents and write nothing: the database's rows and
the data dir's files are compared before and after (`snapshot`).
"""

from __future__ import annotations

import json
import os
import threading

import httpx
import pytest

from sparse_circuits.jobs.db import Job, utcnow
from sparse_circuits.server.keys import create_key, revoke_key
from sparse_circuits.sparse_attention.modeldir import save_model

PROBLEM = "application/problem+json"
TOY = {"out": "models/toy", "steps": 2, "n_layers": 1, "d_model": 16, "n_heads": 2}


def submit(api, config=None, kind="train-toy", **kw):
    body = {"kind": kind, "config": config if config is not None else TOY, **kw}
    return api.client.post("/v1/jobs", json=body, headers=api.headers)


def assert_problem(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    doc = r.json()
    assert doc["status"] == status and doc["title"] and doc["instance"]
    for fragment in fragments:
        assert fragment in json.dumps(doc), (fragment, doc)
    return doc


# ----------------------------------------------------------------------------- health, docs


def test_health_readiness_and_openapi(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["schema_current"] is True
    doc = api.client.get("/openapi.json").json()
    ids = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ids.append(op["operationId"])
            assert op.get("tags"), (method, path)
            codes = set(op["responses"])
            ok = [c for c in codes if c.startswith("2")]
            assert ok, (method, path)
            if path.startswith("/v1/"):
                assert {"401", "404", "422"} <= codes, (method, path, codes)
                assert "application/problem+json" in op["responses"]["422"]["content"]
    assert len(ids) == len(set(ids))
    for route in ("/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/models/register", "/metrics"):
        assert route in doc["paths"]


def test_sqlite_is_migrated_at_start(tmp_path):
    from fastapi.testclient import TestClient

    from sparse_circuits.server.app import create_app
    from sparse_circuits.server.settings import ServerSettings

    app = create_app(ServerSettings(data_dir=tmp_path / "d"))  # default: SQLite in the data dir
    with TestClient(app) as client:
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.get("/v1/jobs").json() == {"data": [], "count": 0}
    assert (tmp_path / "d" / "sparse-circuits.db").is_file()


def test_postgres_is_not_migrated_by_the_server(database_url, tmp_path):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite is migrated at start")
    from fastapi.testclient import TestClient

    from sparse_circuits.jobs.db import migrate
    from sparse_circuits.server.app import create_app
    from sparse_circuits.server.settings import ServerSettings

    app = create_app(ServerSettings(data_dir=tmp_path, database_url=database_url))
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["schema_current"] is False
        assert "db upgrade" in r.json()["detail"]
        migrate(database_url)
        assert client.get("/readyz").status_code == 200


# ----------------------------------------------------------------------------- jobs


def test_submit_get_list_with_filters_and_pages(api):
    r = submit(api)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["kind"] == "train-toy"
    assert job["config"]["out"] == "models/toy" and job["config"]["steps"] == 2
    assert job["artifacts"] == [] and job["max_attempts"] == 3
    assert api.client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    for i in range(4):
        assert submit(api, {**TOY, "out": f"models/toy{i}"}).status_code == 201
    exported = submit(api, {"clt": "clts/c", "out": "export/c"}, kind="export")
    assert exported.status_code == 201, exported.text
    all_ = api.client.get("/v1/jobs").json()
    assert all_["count"] == 6 and len(all_["data"]) == 6
    created = [j["created_at"] for j in all_["data"]]
    assert created == sorted(created, reverse=True)  # newest first
    page = api.client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert page["count"] == 6 and [j["id"] for j in page["data"]] == [
        j["id"] for j in all_["data"][2:4]
    ]
    by_kind = api.client.get("/v1/jobs", params={"kind": "export"}).json()
    assert by_kind["count"] == 1 and by_kind["data"][0]["id"] == exported.json()["id"]
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers)
    cancelled = api.client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["data"]] == [job["id"]]
    after = api.client.get("/v1/jobs", params={"created_after": created[-2]}).json()
    assert job["id"] not in [j["id"] for j in after["data"]] and after["count"] == 5
    before = api.client.get("/v1/jobs", params={"created_before": created[-2]}).json()
    assert [j["id"] for j in before["data"]] == [job["id"]]


def test_cancel_and_retry_follow_the_states(api):
    job = submit(api).json()
    url = f"/v1/jobs/{job['id']}"
    r = api.client.post(url + "/retry", headers=api.headers)
    assert_problem(r, 409, "queued")
    cancelled = api.client.post(url + "/cancel", headers=api.headers).json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert_problem(api.client.post(url + "/cancel", headers=api.headers), 409, job["id"])
    retried = api.client.post(url + "/retry", headers=api.headers).json()
    assert retried["state"] == "queued" and retried["finished_at"] is None
    with api.session() as s:  # a running job: cancel asks its worker to stop
        s.get(Job, job["id"]).state = "running"
        s.commit()
    running = api.client.post(url + "/cancel", headers=api.headers).json()
    assert running["state"] == "running" and running["cancel_requested"] is True


def test_active_jobs_per_key_are_limited(api_factory, snapshot):
    api = api_factory(max_active_jobs_per_key=2)
    assert submit(api).status_code == 201
    second = submit(api, {**TOY, "out": "models/b"}).json()
    before = snapshot(api)
    assert_problem(submit(api, {**TOY, "out": "models/c"}), 429, "2")
    assert snapshot(api) == before
    api.client.post(f"/v1/jobs/{second['id']}/cancel", headers=api.headers)
    assert submit(api, {**TOY, "out": "models/c"}).status_code == 201
    with api.session() as s:  # another key has its own allowance
        _, other = create_key(s, name="other")
    r = api.client.post(
        "/v1/jobs",
        json={"kind": "train-toy", "config": {**TOY, "out": "models/d"}},
        headers={"X-API-Key": other},
    )
    assert r.status_code == 201


def test_job_metrics_log_reads_the_run_curve(api):
    job = submit(api).json()
    assert api.client.get(f"/v1/jobs/{job['id']}/metrics-log").json() == []
    out = api.data_dir / "models" / "toy"
    out.mkdir(parents=True)
    lines = [json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(5)]
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # cut short
    log = api.client.get(f"/v1/jobs/{job['id']}/metrics-log").json()
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    assert len(api.client.get(f"/v1/jobs/{job['id']}/metrics-log?limit=2").json()) == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"kind": "train-toy", "config": {**TOY, "steps": "many"}}, "steps"),
        ({"kind": "train-toy", "config": {**TOY, "steps": -1}}, "steps"),
        ({"kind": "train-toy", "config": {**TOY, "nope": 1}}, "nope"),
        ({"kind": "train-toy", "config": {"steps": 2}}, "out"),
        ({"kind": "no-such-stage", "config": {}}, "kind"),
        ({"kind": "train-toy", "config": "models/x"}, "config"),
        ({"kind": "train-toy"}, "config"),
        ({"kind": "train-toy", "config": TOY, "max_attempts": 0}, "max_attempts"),
        ({"kind": "train-toy", "config": TOY, "extra": True}, "extra"),
        ([1, 2], "body"),
    ],
)
def test_invalid_jobs_are_422_naming_the_field(api, snapshot, body, fragment):
    before = snapshot(api)
    doc = assert_problem(api.client.post("/v1/jobs", json=body, headers=api.headers), 422)
    assert any(fragment in ".".join(map(str, e["loc"])) for e in doc["errors"]), doc
    assert snapshot(api) == before


def test_malformed_json_and_wrong_types(api, snapshot):
    before = snapshot(api)
    headers = {**api.headers, "content-type": "application/json"}
    for raw in (b"{bad", b"", b"\xff\xfe", b'{"kind": "train-toy", "config": {', b"null"):
        r = api.client.post("/v1/jobs", content=raw, headers=headers)
        assert_problem(r, 422)
    assert_problem(api.client.get("/v1/jobs", params={"limit": "ten"}), 422, "limit")
    assert_problem(api.client.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    assert_problem(api.client.get("/v1/jobs", params={"state": "sleeping"}), 422, "state")
    assert_problem(api.client.get("/v1/jobs", params={"created_after": "yesterday"}), 422)
    r = api.client.post("/v1/models/register", json={"path": 7}, headers=api.headers)
    assert_problem(r, 422, "path")
    assert snapshot(api) == before


def test_unknown_ids_are_404(api, snapshot):
    before = snapshot(api)
    h = api.headers
    for r in (
        api.client.get("/v1/jobs/nope"),
        api.client.post("/v1/jobs/nope/cancel", headers=h),
        api.client.post("/v1/jobs/nope/retry", headers=h),
        api.client.get("/v1/jobs/nope/events"),
        api.client.get("/v1/jobs/nope/metrics-log"),
        api.client.get("/v1/models/nope"),
        api.client.get("/v1/stores/nope/metrics-log"),
        api.client.get("/v1/transcoders/nope"),
        api.client.get("/v1/nothing-here"),
    ):
        assert_problem(r, 404)
    assert "nope" in api.client.get("/v1/jobs/nope").json()["detail"]
    assert snapshot(api) == before


def test_oversized_bodies_are_413(api_factory, snapshot):
    api = api_factory(max_body_bytes=2048)
    before = snapshot(api)
    big = {"kind": "train-toy", "config": {**TOY, "pad": "x" * 4096}}
    assert_problem(api.client.post("/v1/jobs", json=big, headers=api.headers), 413, "2048")

    def chunks():  # no Content-Length: the limit holds on the bytes read
        for _ in range(8):
            yield b"x" * 1024

    r = api.client.post("/v1/jobs", content=chunks(), headers=api.headers)
    assert_problem(r, 413)
    assert snapshot(api) == before
    assert submit(api).status_code == 201  # under the limit, as before


def test_paths_outside_the_data_dir_are_refused(api, snapshot, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (api.data_dir / "models").mkdir()
    os.symlink(outside, api.data_dir / "models" / "link-out")
    before = snapshot(api)
    for field, value in (
        ("out", "../escaped"),
        ("out", "models/../../escaped"),
        ("out", str(outside / "model")),
        ("out", "/etc/sparse"),
        ("out", "models/link-out/model"),
    ):
        r = submit(api, {**TOY, field: value})
        doc = assert_problem(r, 422, "outside")
        assert doc["errors"][0]["loc"] == ["body", "config", field], doc
    for kind, config, field in (
        ("export", {"clt": "../clt", "out": "e"}, "clt"),
        ("train-clt", {"activations": "/acts.zarr", "out": "clts/c"}, "activations"),
        ("pretrain", {"corpus": ["../../etc/*.txt"], "out": "models/p"}, "corpus"),
    ):
        doc = assert_problem(submit(api, config, kind=kind), 422, field)
        assert doc["errors"][0]["loc"][:3] == ["body", "config", field], doc
    for path in ("../x", str(outside), "models/link-out"):
        r = api.client.post("/v1/models/register", json={"path": path}, headers=api.headers)
        assert_problem(r, 422, "path")
    assert snapshot(api) == before
    assert not any(outside.iterdir())
    inside = submit(api, {**TOY, "out": str(api.data_dir / "models" / "abs")}).json()
    assert inside["config"]["out"] == "models/abs"  # absolute inside: stored relative


def test_writes_need_a_valid_unrevoked_key(api, snapshot):
    with api.session() as s:
        key, revoked = create_key(s, name="leaver")
        revoke_key(s, key_id=key.id)
    before = snapshot(api)
    job = {"kind": "train-toy", "config": TOY}
    for headers, fragment in (
        ({}, "X-API-Key"),
        ({"X-API-Key": "sc_not-a-key"}, "unknown"),
        ({"X-API-Key": revoked}, "revoked"),
        ({"X-API-Key": ""}, "X-API-Key"),
    ):
        assert_problem(api.client.post("/v1/jobs", json=job, headers=headers), 401, fragment)
        r = api.client.post("/v1/models/register", json={"path": "models/x"}, headers=headers)
        assert_problem(r, 401)
        assert_problem(api.client.post("/v1/jobs/x/cancel", headers=headers), 401)
    assert snapshot(api) == before
    assert api.client.get("/v1/jobs").status_code == 200  # reads are open by default


def test_reads_can_require_a_key(api_factory):
    api = api_factory(read_requires_key=True)
    for path in ("/v1/jobs", "/v1/models", "/v1/jobs/x"):
        assert_problem(api.client.get(path), 401, "reads")
    assert api.client.get("/v1/jobs", headers=api.headers).status_code == 200
    assert api.client.get("/healthz").status_code == 200  # probes stay open


# ----------------------------------------------------------------------------- artifacts


def test_models_register_list_get_and_metrics_log(api, snapshot, make_tiny_model):
    model_dir = save_model(make_tiny_model(), api.data_dir / "models" / "tiny")
    (model_dir / "metrics.json").write_text(json.dumps({"loss": 1.5}))
    (model_dir / "metrics.jsonl").write_text('{"step": 0, "loss": 3.0}\n{"step": 10, "loss": 2}\n')
    assert api.client.get("/v1/models").json() == {"data": [], "count": 0}
    r = api.client.post("/v1/models/register", json={"path": "models/tiny"}, headers=api.headers)
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["kind"] == "model" and model["path"] == "models/tiny"
    assert model["name"] == "tiny" and model["metrics"] == {"loss": 1.5}
    again = api.client.post(
        "/v1/models/register", json={"path": str(model_dir)}, headers=api.headers
    )
    assert again.status_code == 200 and again.json()["id"] == model["id"]
    listed = api.client.get("/v1/models").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == model["id"]
    assert api.client.get(f"/v1/models/{model['id']}").json() == model
    log = api.client.get(f"/v1/models/{model['id']}/metrics-log").json()
    assert [x["step"] for x in log] == [0, 10]
    # the other kinds do not hold it
    assert_problem(api.client.get(f"/v1/transcoders/{model['id']}"), 404)
    assert api.client.get("/v1/stores").json()["count"] == 0
    before = snapshot(api)
    r = api.client.post(
        "/v1/transcoders/register", json={"path": "models/tiny"}, headers=api.headers
    )
    assert_problem(r, 422, "not a transcoder")
    (api.data_dir / "junk").mkdir()
    before = snapshot(api)
    for path in ("junk", "missing"):
        r = api.client.post("/v1/models/register", json={"path": path}, headers=api.headers)
        assert_problem(r, 422, "path")
    assert snapshot(api) == before


def test_artifacts_in_the_data_dir_are_registered_at_start(api_factory, tmp_path, make_tiny_model):
    save_model(make_tiny_model(), tmp_path / "other" / "models" / "c")
    off = api_factory(data_dir=tmp_path / "other", scan_on_start=False)
    assert off.client.get("/v1/models").json()["count"] == 0
    data = tmp_path / "scanned"
    save_model(make_tiny_model(), data / "models" / "a")
    save_model(make_tiny_model(seed=1), data / "models" / "b")
    api = api_factory(data_dir=data)
    names = sorted(m["name"] for m in api.client.get("/v1/models").json()["data"])
    assert names == ["a", "b"]


# ----------------------------------------------------------------------------- middleware, metrics


def test_cors_and_frame_ancestors(api_factory):
    api = api_factory(
        cors_origins=["https://dash.example"], frame_ancestors=["https://dash.example"]
    )
    r = api.client.options(
        "/v1/jobs",
        headers={"Origin": "https://dash.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "X-API-Key"},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://dash.example"
    assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
    r = api.client.get("/v1/jobs", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["content-security-policy"] == "frame-ancestors https://dash.example"
    closed = api_factory()  # default: no CORS, frames from the same origin only
    r = closed.client.get("/v1/jobs", headers={"Origin": "https://dash.example"})
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["content-security-policy"] == "frame-ancestors 'self'"


def test_prometheus_metrics(api):
    from sparse_circuits.server.metrics import GRAPH_CACHE

    submit(api)
    submit(api, {**TOY, "out": "models/b"})
    job = submit(api, {**TOY, "out": "models/c"}).json()
    api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers)
    api.client.get("/v1/jobs/nope")
    GRAPH_CACHE.labels(result="hit").inc()
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'sparse_circuits_jobs_queue_depth{state="queued"} 2.0' in text
    assert 'sparse_circuits_jobs_finished{kind="train-toy",state="cancelled"} 1.0' in text
    assert 'method="GET",route="/v1/jobs/{job_id}",status="404"' in text  # template, not id
    assert 'route="<unmatched>"' not in text or "nope" not in text
    assert "sparse_circuits_http_request_seconds_bucket" in text
    assert 'sparse_circuits_graph_cache_total{result="hit"}' in text


def test_concurrent_writes_queue_instead_of_failing(live_server):
    """Writes at once (submits, cancels, registrations) on a live server: on SQLite each one
    holds the write lock from its key check on, so none fails with "database is locked"."""
    from concurrent.futures import ThreadPoolExecutor

    api = live_server.api
    headers = api.headers

    def write(i: int) -> int:
        with httpx.Client(base_url=live_server.url, headers=headers, timeout=60) as c:
            r = c.post("/v1/jobs", json={"kind": "train-toy", "config": {**TOY, "out": f"m/{i}"}})
            if r.status_code != 201:
                return r.status_code
            return c.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(write, range(24)))
    assert statuses == [200] * 24
    assert api.client.get("/v1/jobs", params={"state": "cancelled"}).json()["count"] == 24


# ----------------------------------------------------------------------------- event streams


def _events(lines) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
    return out


def test_job_event_stream_follows_changes_until_terminal(live_server):
    api = live_server.api
    api.app.state.settings.events_poll_s = 0.05
    job = submit(api).json()
    following = threading.Event()

    def worker():  # what a worker does, from another thread: progress, then success
        import time

        assert following.wait(30)
        for step in (1, 2):
            time.sleep(0.3)
            with api.session() as s:
                j = s.get(Job, job["id"])
                j.state, j.step, j.total = "running", step, 2
                s.commit()
        time.sleep(0.3)
        with api.session() as s:
            j = s.get(Job, job["id"])
            j.state, j.finished_at = "succeeded", utcnow()
            s.commit()

    t = threading.Thread(target=worker)
    t.start()
    events = []
    with httpx.stream("GET", f"{live_server.url}/v1/jobs/{job['id']}/events", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():  # the stream ends by itself after the terminal state
            events += _events([line])
            following.set()
    t.join()
    assert events[0]["state"] == "queued"
    assert [e["step"] for e in events if e["state"] == "running"] == [1, 2]
    assert events[-1]["state"] == "succeeded"


def test_all_jobs_event_stream(live_server):
    """Every job's changes from the moment the stream opens (it ends after max_seconds)."""
    api = live_server.api
    api.app.state.settings.events_poll_s = 0.05
    url = f"{live_server.url}/v1/jobs/events?max_seconds=3"
    before = submit(api, {**TOY, "out": "models/old"}).json()  # made before: not sent
    seen, opened = [], threading.Event()

    def follow():
        with httpx.stream("GET", url, timeout=30) as r:
            for line in r.iter_lines():
                opened.set()  # the stream's first line (a comment) comes as it opens
                seen.extend(_events([line]))

    t = threading.Thread(target=follow)
    t.start()
    assert opened.wait(30)
    a = submit(api).json()
    b = submit(api, {**TOY, "out": "models/b"}).json()
    api.client.post(f"/v1/jobs/{a['id']}/cancel", headers=api.headers)
    t.join()
    states = [(e["id"], e["state"]) for e in seen]
    assert (b["id"], "queued") in states and (a["id"], "cancelled") in states
    assert before["id"] not in {job_id for job_id, _ in states}
    assert states.index((a["id"], "cancelled")) == max(
        i for i, (job_id, _) in enumerate(states) if job_id == a["id"]
    )  # the last word on a job is its latest state


# ----------------------------------------------------------------------------- fuzz


def test_fuzz_openapi_no_5xx_and_refusals_write_nothing(api, snapshot, make_tiny_model):
    """Schemathesis draws requests for every operation of the OpenAPI document, valid ones and
    invalid ones (15 each, 30 per operation, derandomized), with a valid key: no answer is a 5xx
    (its ASGI transport raises the server's exceptions), and any 4xx, and any read, leaves the
    database rows and the data dir's files as they were."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    save_model(make_tiny_model(), api.data_dir / "models" / "tiny")
    api.client.post("/v1/models/register", json={"path": "models/tiny"}, headers=api.headers)
    submit(api)
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    failures, statuses = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # endless streams: tested on a live server above
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=15, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(mode))
            def check(case):
                case.headers = {**(case.headers or {}), "X-API-Key": api.secret}
                before = snapshot(api)
                response = case.call()
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.as_curl_command(), response.text[:300]))
                elif response.status_code >= 400 or case.method == "GET":
                    if snapshot(api) != before:
                        failures.append((case.as_curl_command(), response.status_code, "wrote"))

            try:
                check()
            except Unsatisfiable:  # no invalid request exists (an operation without inputs)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert len(statuses) > 300 and any(400 <= s < 500 for s in statuses)
    assert not failures, failures[:10]


# ----------------------------------------------------------------------------- CLI


def test_keys_cli_stores_only_the_hash(tmp_path, capsys):
    import hashlib

    from sqlalchemy import select

    from sparse_circuits.cli import main
    from sparse_circuits.jobs.db import ApiKey, database_url, make_engine, make_sessionmaker

    data = tmp_path / "data"
    assert main(["keys", "create", "alice", "--data-dir", str(data)]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("sc_") and len(secret) > 30
    engine = make_engine(database_url(data))
    with make_sessionmaker(engine)() as s:
        (key,) = s.scalars(select(ApiKey)).all()
        assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert key.name == "alice" and secret[:10] == key.prefix
    stored = (data / "sparse-circuits.db").read_bytes()
    assert secret.encode() not in stored
    assert main(["keys", "list", "--data-dir", str(data)]) == 0
    listed = capsys.readouterr().out
    assert key.id in listed and "alice" in listed and secret not in listed
    assert main(["keys", "revoke", key.id, "--data-dir", str(data)]) == 0
    assert main(["keys", "revoke", "nope", "--data-dir", str(data)]) == 2
    capsys.readouterr()
    main(["keys", "list", "--data-dir", str(data)])
    assert "revoked" in capsys.readouterr().out
    engine.dispose()


def test_serve_command_runs_the_api_with_a_worker(tmp_path):
    """`sparse-circuits serve` as a user starts it: SQLite made in the data dir, a key from
    `keys create`, one worker that runs a submitted job, the worker stopped with the server."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from sparse_circuits.client import Client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "sparse_circuits.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    made = subprocess.run([*cli, "keys", "create", "me", "--data-dir", str(data)],
                          capture_output=True, text=True, check=True, env=env)  # fmt: skip
    secret = made.stdout.strip().splitlines()[-1]
    server = subprocess.Popen(
        [*cli, "serve", "--data-dir", str(data), "--port", str(port), "--log-level", "warning"],
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.3)
        with Client(url, api_key=secret) as sc:
            config = {**TOY, "steps": 10, "batch_size": 8, "device": "cpu"}
            job = sc.wait(sc.submit("train-toy", config), progress=False, timeout=300)
            assert job.state == "succeeded" and job.artifacts[0].kind == "model"
            assert job.host and job.pid
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    worker_alive = subprocess.run(["pgrep", "-f", f"worker --data-dir {data}"], capture_output=True)
    assert worker_alive.returncode == 1, worker_alive.stdout  # no worker left behind
