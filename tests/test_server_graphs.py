"""Graphs and features over HTTP, on SQLite and PostgreSQL (`api` fixture): a tiny model and CLT
registered, graphs created inline and by a worker's job, the JSON of two prunings against
prune() on the same graph, head loadings summing to link weights, QK on demand against
QKContext, subgraphs, delete, the features endpoint before and after feature-stats; bad input
answers a 4xx problem and writes nothing (`snapshot`)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import jsonschema
import pytest

from sparse_circuits.attribution.attention import QKContext
from sparse_circuits.attribution.graph_json import load_schema, qk_json
from sparse_circuits.attribution.graph_store import graph_json_at, load_graph
from sparse_circuits.attribution.prune import prune
from sparse_circuits.attribution.replacement import ReplacementModel
from sparse_circuits.attribution.sources import SourceTable
from sparse_circuits.clt.cltdir import load_clt
from sparse_circuits.clt.features import FeatureStatsConfig, feature_stats, read_feature
from sparse_circuits.jobs.db import Artifact
from sparse_circuits.server.metrics import GRAPH_CACHE
from sparse_circuits.sparse_attention.modeldir import load_model

PROBLEM = "application/problem+json"
PROMPT = "<bos>12+34="


def assert_problem(r, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    doc = r.json()
    assert doc["status"] == status and doc["title"]
    for fragment in fragments:
        assert fragment in json.dumps(doc), (fragment, doc)
    return doc


def registered(api, graph_artifacts) -> tuple[str, str]:
    """Copy the tiny model and CLT into the api's data dir and register them: their ids."""
    ids = []
    for plural, folder, src in (("models", "models", graph_artifacts.model),
                                ("transcoders", "clts", graph_artifacts.clt)):  # fmt: skip
        rel = f"{folder}/{src.name}"
        shutil.copytree(src, api.data_dir / rel)
        r = api.client.post(f"/v1/{plural}/register", json={"path": rel}, headers=api.headers)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids[0], ids[1]


def create(api, model_id, clt_id, **kw):
    body = {"model": model_id, "transcoder": clt_id, "prompt": PROMPT, **kw}
    return api.client.post("/v1/graphs", json=body, headers=api.headers)


def cache_count(result: str) -> float:
    return GRAPH_CACHE.labels(result=result)._value.get()


@pytest.fixture
def made(api, graph_artifacts):
    """The api with the tiny model and CLT registered and one graph made inline."""
    model_id, clt_id = registered(api, graph_artifacts)
    r = create(api, model_id, clt_id, qk_edges=2, slug="addition")
    assert r.status_code == 201, r.text
    return api, model_id, clt_id, r.json()


def test_create_inline_then_prunings_match_prune(made):
    api, model_id, clt_id, graph = made
    assert graph["state"] == "complete" and graph["store"] and graph["slug"] == "addition"
    assert (graph["model_id"], graph["transcoder_id"]) == (model_id, clt_id)
    assert graph["prompt_tokens"] == ["<bos>", "1", "2", "+", "3", "4", "="]
    assert graph["scores"]["full"]["replacement"] > 0 and graph["n_edges"] > 0
    gid = graph["id"]
    assert api.client.get(f"/v1/graphs/{gid}").json() == graph
    listed = api.client.get("/v1/graphs").json()
    assert listed["count"] == 1 and listed["data"][0]["id"] == gid
    assert api.client.get("/v1/graphs", params={"model_id": "nope"}).json()["count"] == 0

    stored = load_graph(api.data_dir / graph["path"])
    assert stored.graph.n_nodes == graph["n_nodes"] and stored.graph.n_edges == graph["n_edges"]
    counts = set()
    for nt, et in ((0.8, 0.98), (0.5, 0.9)):
        params = {"node_threshold": nt, "edge_threshold": et}
        r = api.client.get(f"/v1/graphs/{gid}/json", params=params)
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"  # httpx asks
        doc = r.json()
        jsonschema.validate(doc, load_schema())
        pruned = prune(stored.graph, nt, et)
        assert len(doc["nodes"]) == int(pruned.node_mask.sum())
        assert len(doc["links"]) == int(pruned.edge_mask.sum())
        want = graph_json_at(stored, nt, et)
        for d in (doc, want):
            del d["metadata"]["info"]["create_time_ms"]
        assert doc == want
        counts.add((len(doc["nodes"]), len(doc["links"])))
    assert len(counts) == 2  # the two prunings differ

    # cached: a hit, the same bytes; without gzip when not accepted; 304 on its ETag
    hits = cache_count("hit")
    plain = api.client.get(f"/v1/graphs/{gid}/json", params=params,
                           headers={"Accept-Encoding": "identity"})  # fmt: skip
    assert cache_count("hit") == hits + 1 and "content-encoding" not in plain.headers
    assert plain.json()["nodes"] == doc["nodes"]
    again = api.client.get(f"/v1/graphs/{gid}/json", params=params,
                           headers={"If-None-Match": plain.headers["etag"]})  # fmt: skip
    assert again.status_code == 304
    default = api.client.get(f"/v1/graphs/{gid}/json").json()  # the graph's own pruning
    assert default["metadata"]["pruning_settings"] == {
        "node_threshold": 0.8,
        "edge_threshold": 0.98,
    }


def test_link_loadings_sum_to_the_weight_and_head_shares(made):
    api, _, _, graph = made
    gid = graph["id"]
    doc = api.client.get(f"/v1/graphs/{gid}/json").json()
    crossing = [lk for lk in doc["links"] if lk.get("head_loadings")]
    assert crossing
    for link in crossing:
        r = api.client.get(f"/v1/graphs/{gid}/links/attention",
                           params={"source": link["source"], "target": link["target"]})  # fmt: skip
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["cross_position"] and got["weight"] == pytest.approx(link["weight"], rel=1e-5)
        total = sum(v for _, _, v in got["loadings"])
        assert total == pytest.approx(got["weight"], rel=1e-4, abs=1e-6)
    heads = doc["attention"]["summary"]["heads"]
    for rank, h in enumerate(heads[:2], start=1):
        r = api.client.get(f"/v1/graphs/{gid}/heads/{h['layer']}/{h['head']}")
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["share"] == pytest.approx(h["share"], rel=1e-4) and got["rank"] == rank
        assert got["total_heads"] == 4 and got["n_links"] > 0
        links = {(lk["source"], lk["target"]) for lk in doc["links"]}
        assert all((e["source"], e["target"]) in links for e in got["top_links"])


def test_qk_on_demand_equals_qk_context(made, graph_artifacts):
    api, _, _, graph = made
    gid = graph["id"]
    before = api.client.get(f"/v1/graphs/{gid}/json").json()["attention"]["qk"]
    edge = {"layer": 1, "head": 0, "query": 6, "key": 2}
    r = api.client.post(f"/v1/graphs/{gid}/qk", json=edge, headers=api.headers)
    assert r.status_code == 201, r.text
    got = r.json()

    stored = load_graph(api.data_dir / graph["path"])
    model, _ = load_model(graph_artifacts.model)
    clt = load_clt(graph_artifacts.clt)
    g = stored.graph
    rm = ReplacementModel(model, clt, include_bos=g.settings["include_bos"], embedding=g.embedding)
    run = rm.run_prompt(g.tokens)
    direct = QKContext(rm, run, SourceTable(rm, run)).attribute(1, 0, 6, 2)
    want = json.loads(json.dumps(qk_json(direct, stored.gate_offset)))
    assert [t[:2] for t in got["terms"]] == [t[:2] for t in want["terms"]]
    for a, b in zip(got["terms"], want["terms"], strict=True):
        assert a[2] == pytest.approx(b[2], rel=1e-4, abs=1e-6)
    assert got["score"] == pytest.approx(want["score"], rel=1e-5)
    assert sum(t[2] for t in got["terms"]) + got["other"] == pytest.approx(
        got["score"], rel=1e-3, abs=1e-4
    )

    r = api.client.post(f"/v1/graphs/{gid}/qk", json=edge, headers=api.headers)
    assert r.status_code == 200 and r.json() == got  # stored with the graph
    after = api.client.get(f"/v1/graphs/{gid}/json").json()["attention"]["qk"]
    assert after[: len(before)] == before and len(after) == len(before) + 1
    assert (
        after[-1]["layer"],
        after[-1]["head"],
        after[-1]["query_pos"],
        after[-1]["key_pos"],
    ) == (1, 0, 6, 2)


def test_subgraphs_round_trip(made, snapshot):
    api, _, _, graph = made
    gid = graph["id"]
    doc = api.client.get(f"/v1/graphs/{gid}/json").json()
    ids = [n["node_id"] for n in doc["nodes"]]
    body = {"pinnedIds": ids[:3], "supernodes": [["both", ids[0], ids[1]]]}
    url = f"/v1/graphs/{gid}/subgraphs/mine"
    assert_problem(api.client.get(url), 404, "mine")
    r = api.client.put(url, json=body, headers=api.headers)
    assert r.status_code == 201 and r.json() == body
    assert api.client.get(url).json() == body
    body["pinnedIds"] = ids[:1]
    assert api.client.put(url, json=body, headers=api.headers).status_code == 200
    assert api.client.get(url).json() == body
    assert api.client.get(f"/v1/graphs/{gid}/subgraphs").json() == ["mine"]
    state = snapshot(api)
    bad = {"pinnedIds": [ids[0], "99_99_99"], "supernodes": [["x", "E_1_99"]]}
    problem = assert_problem(api.client.put(url, json=bad, headers=api.headers), 422, "99_99_99")
    assert [e["loc"] for e in problem["errors"]] == [
        ["body", "pinnedIds", 1],
        ["body", "supernodes", 0, 1],
    ]
    assert_problem(
        api.client.put(f"/v1/graphs/{gid}/subgraphs/.hidden", json=body, headers=api.headers), 422
    )
    assert_problem(api.client.put(url, json=body), 401)
    assert snapshot(api) == state
    assert api.client.get(url).json() == body


def test_bad_input_is_a_4xx_problem_and_writes_nothing(made, snapshot):
    api, model_id, clt_id, graph = made
    gid = graph["id"]
    doc = api.client.get(f"/v1/graphs/{gid}/json").json()
    same_pos = next(lk for lk in doc["links"] if "head_loadings" not in lk)
    state = snapshot(api)
    c, h = api.client, api.headers
    cases = [
        (create(api, "nope", clt_id), 422, "model"),
        (create(api, model_id, "nope"), 422, "transcoder"),
        (create(api, clt_id, model_id), 422, "no model with id"),
        (create(api, model_id, clt_id, prompt="<bos>" + "1+" * 8), 422, "context length"),
        (create(api, model_id, clt_id, prompt="12x"), 422, "x"),
        (create(api, model_id, clt_id, prompt_ids=[1, 2]), 422, "exactly one"),
        (create(api, model_id, clt_id, targets=['"x"']), 422, "targets"),
        (create(api, model_id, clt_id, qk_at=["5,0,3,1"]), 422, "qk_at"),
        (create(api, model_id, clt_id, qk_at=["1,0"]), 422, "qk_at"),
        (create(api, model_id, clt_id, prompt=None, prompt_ids=[0, 99]), 422, "vocabulary"),
        (create(api, model_id, clt_id, prompt=None, prompt_ids=[2**40]), 422, "prompt_ids"),
        (create(api, model_id, clt_id, node_threshold=1.5), 422, "node_threshold"),
        (c.post("/v1/graphs", json={"model": model_id, "transcoder": clt_id, "prompt": PROMPT}), 401, "API key"),
        (c.get(f"/v1/graphs/{gid}/json", params={"node_threshold": 1.2}), 422, "node_threshold"),
        (c.get(f"/v1/graphs/{gid}/json", params={"edge_threshold": -0.1}), 422, "edge_threshold"),
        (c.get("/v1/graphs/nope"), 404, "nope"),
        (c.get("/v1/graphs/nope/json"), 404, "nope"),
        (c.get(f"/v1/graphs/{gid}/links/attention", params={"source": "9_9_9", "target": same_pos["target"]}), 404, "source"),
        (c.get(f"/v1/graphs/{gid}/links/attention", params={"source": same_pos["source"], "target": "9_9_9"}), 404, "target"),
        (c.get(f"/v1/graphs/{gid}/links/attention", params=same_pos), 422, "no attention head"),
        (c.get(f"/v1/graphs/{gid}/heads/7/0"), 404, "layer"),
        (c.get(f"/v1/graphs/{gid}/heads/0/9"), 404, "head"),
        (c.post(f"/v1/graphs/{gid}/qk", json={"layer": 9, "head": 0, "query": 3, "key": 1}, headers=h), 422, "layer"),
        (c.post(f"/v1/graphs/{gid}/qk", json={"layer": 0, "head": 0, "query": 3, "key": 4}, headers=h), 422, "key"),
        (c.post(f"/v1/graphs/{gid}/qk", json={"layer": 0, "head": 0, "query": 30, "key": 1}, headers=h), 422, "query"),
        (c.post("/v1/graphs/nope/qk", json={"layer": 0, "head": 0, "query": 3, "key": 1}, headers=h), 404, "nope"),
        (c.delete("/v1/graphs/nope", headers=h), 404, "nope"),
        (c.delete(f"/v1/graphs/{gid}"), 401, "API key"),
    ]  # fmt: skip
    for r, status, fragment in cases:
        assert_problem(r, status, fragment)
    assert snapshot(api) == state


def test_a_pruning_over_the_node_limit_is_refused_naming_the_threshold(
    api_factory, graph_artifacts
):
    api = api_factory()
    model_id, clt_id = registered(api, graph_artifacts)
    gid = create(api, model_id, clt_id).json()["id"]
    small = api.client.get(
        f"/v1/graphs/{gid}/json", params={"node_threshold": 0.5, "edge_threshold": 0.9}
    )
    limit = len(small.json()["nodes"])
    strict = api_factory(data_dir=api.data_dir, max_graph_nodes=limit)
    r = strict.client.get(
        f"/v1/graphs/{gid}/json", params={"node_threshold": 0.5, "edge_threshold": 0.9}
    )
    assert r.status_code == 200
    r = strict.client.get(
        f"/v1/graphs/{gid}/json", params={"node_threshold": 1.0, "edge_threshold": 1.0}
    )
    doc = assert_problem(r, 422, "node_threshold", str(limit))
    assert doc["errors"][0]["loc"] == ["query", "node_threshold"] and doc["n_nodes"] > limit
    short = api_factory(data_dir=api.data_dir, max_prompt_tokens=4)
    assert_problem(create(short, model_id, clt_id), 422, "prompt", "limit of 4")


def test_a_graph_over_the_budget_is_made_by_a_worker_job(api_factory, graph_artifacts):
    from sparse_circuits.jobs.worker import WorkerConfig, run_worker

    api = api_factory(inline_graph_budget_s=0)
    model_id, clt_id = registered(api, graph_artifacts)
    r = create(
        api, model_id, clt_id, slug="queued", max_feature_nodes=None, loadings_node_threshold=1.0
    )
    assert r.status_code == 202, r.text
    body = r.json()
    gid, job = body["graph_id"], body["job"]
    assert job["config"]["max_feature_nodes"] is None  # every active feature, as asked
    assert body["graph"]["state"] == "pending" and body["estimated_s"] > 0
    assert job["kind"] == "attribute" and job["config"]["store_dir"] == f"graphs/{gid}"
    assert api.client.get(f"/v1/graphs/{gid}").json()["state"] == "pending"
    assert_problem(api.client.get(f"/v1/graphs/{gid}/json"), 409, "pending")
    assert_problem(api.client.delete(f"/v1/graphs/{gid}", headers=api.headers), 409, job["id"])

    stop = threading.Event()
    cfg = WorkerConfig(
        data_dir=api.data_dir, database_url=api.database_url, poll_s=0.2, heartbeat_s=1
    )
    worker = threading.Thread(target=run_worker, args=(cfg, stop), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 240
        while api.client.get(f"/v1/jobs/{job['id']}").json()["state"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline, "the attribute job did not finish"
            time.sleep(0.3)
    finally:
        stop.set()
        worker.join(60)
    done = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert done["state"] == "succeeded", done["error"]
    graph = api.client.get(f"/v1/graphs/{gid}").json()
    assert graph["state"] == "complete" and graph["job_id"] == job["id"] and graph["n_nodes"] > 0
    assert graph["loadings_node_threshold"] == 1.0
    assert (graph["model_id"], graph["transcoder_id"]) == (model_id, clt_id)
    with api.session() as session:  # one row for the graph: the worker's registration found it
        assert session.query(Artifact).filter(Artifact.kind == "graph").count() == 1
    doc = api.client.get(f"/v1/graphs/{gid}/json").json()
    jsonschema.validate(doc, load_schema())
    assert doc["metadata"]["slug"] == "queued"


def test_delete_removes_the_row_the_files_and_the_cache(made):
    api, _, _, graph = made
    gid = graph["id"]
    assert api.client.get(f"/v1/graphs/{gid}/json").status_code == 200  # cached now
    assert api.client.delete(f"/v1/graphs/{gid}", headers=api.headers).status_code == 204
    assert not (api.data_dir / graph["path"]).exists()
    assert sorted(p.name for p in (api.data_dir / "graphs").iterdir()) == []
    assert_problem(api.client.get(f"/v1/graphs/{gid}"), 404)
    assert_problem(api.client.get(f"/v1/graphs/{gid}/json"), 404)
    assert_problem(
        api.client.get(
            f"/v1/graphs/{gid}/json", params={"node_threshold": 0.8, "edge_threshold": 0.98}
        ),
        404,
    )
    assert api.client.get("/v1/graphs").json()["count"] == 0


def test_features_before_and_after_feature_stats(api, graph_artifacts, snapshot):
    model_id, clt_id = registered(api, graph_artifacts)
    with api.session() as session:  # the lineage a train-clt job would have recorded
        session.get(Artifact, clt_id).model_id = model_id
        session.commit()
    url = f"/v1/features/{clt_id}/1/3"
    state = snapshot(api)
    doc = assert_problem(api.client.get(url), 409, clt_id, "feature-stats")
    assert doc["transcoder_id"] == clt_id
    assert doc["job"] == {
        "kind": "feature-stats",
        "config": {"clt": "clts/addition-tiny", "model": "models/addition-tiny"},
    }
    assert_problem(api.client.get("/v1/features/nope/0/0"), 404, "nope")
    assert_problem(api.client.get(f"/v1/features/{model_id}/0/0"), 404, "transcoder")
    assert snapshot(api) == state
    r = api.client.post("/v1/jobs", json=doc["job"], headers=api.headers)  # as the problem says
    assert r.status_code == 201, r.text
    doc = assert_problem(api.client.get(url), 409, r.json()["id"])
    assert doc["job"]["id"] == r.json()["id"] and doc["job"]["state"] == "queued"

    clt_dir = api.data_dir / "clts" / "addition-tiny"
    feature_stats(FeatureStatsConfig(clt=clt_dir, model=api.data_dir / "models" / "addition-tiny",
                                     tokens_file=graph_artifacts.tokens, device="cpu", top_k=5, window=2))  # fmt: skip
    r = api.client.get(url)
    assert r.status_code == 200, r.text
    got = r.json()
    want = read_feature(clt_dir, 1, 3)
    assert (
        got["frequency"] == pytest.approx(want["frequency"]) and got["n_tokens"] == want["n_tokens"]
    )
    assert len(got["histogram"]["edges"]) == len(got["histogram"]["counts"]) + 1
    assert [c["values"] for c in got["top_contexts"]] == [
        c["activations"] for c in want["top_contexts"]
    ]
    vocab = {"<bos>", "+", "=", *map(str, range(10))}
    for c in got["top_contexts"]:
        assert set(c["tokens"]) <= vocab and len(c["tokens"]) == len(c["values"]) == len(
            c["token_ids"]
        )
        assert c["values"][c["center"]] == pytest.approx(c["activation"])
    assert got["top_logits"] and {e["token"] for e in got["top_logits"]} <= vocab
    assert got["top_logits"][0]["value"] >= got["bottom_logits"][0]["value"]
    state = snapshot(api)
    assert_problem(api.client.get(f"/v1/features/{clt_id}/2/0"), 404, "layer")
    assert_problem(api.client.get(f"/v1/features/{clt_id}/1/24"), 404, "index")
    assert_problem(api.client.get(f"/v1/features/{clt_id}/-1/0"), 422)
    assert snapshot(api) == state


def test_a_graph_json_file_the_cli_wrote_is_served_for_its_own_pruning(
    api_factory, graph_artifacts
):
    from sparse_circuits.attribution.attribute import AttributeConfig, run_attribute

    api = api_factory()
    registered(api, graph_artifacts)
    out = api.data_dir / "graphs" / "cli.json"
    run_attribute(AttributeConfig(model=api.data_dir / "models" / "addition-tiny",
                                  clt=api.data_dir / "clts" / "addition-tiny", prompt=PROMPT,
                                  out=out, batch_size=16, device="cpu"))  # fmt: skip
    again = api_factory(data_dir=api.data_dir)  # a server start registers what the CLI wrote
    listed = again.client.get("/v1/graphs").json()["data"]
    assert [g["path"] for g in listed] == ["graphs/cli.json"] and not listed[0]["store"]
    gid = listed[0]["id"]
    assert again.client.get(f"/v1/graphs/{gid}/json").json() == json.loads(out.read_text())
    same = {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert again.client.get(f"/v1/graphs/{gid}/json", params=same).status_code == 200
    other = {"node_threshold": 0.5, "edge_threshold": 0.98}
    assert_problem(again.client.get(f"/v1/graphs/{gid}/json", params=other), 409, "node_threshold")
    assert_problem(again.client.get(f"/v1/graphs/{gid}/subgraphs"), 409, "graph store")


def test_fuzz_the_graph_routes_of_an_existing_graph(made, snapshot):
    """Schemathesis requests (valid and invalid, 15 each, derandomized) against every route of
    one existing graph but DELETE: no 5xx, and a 4xx writes nothing."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    api, _, _, graph = made
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    failures, statuses = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/v1/graphs/{graph_id}") or operation.method == "delete":
            continue
        for mode in schemathesis.GenerationMode:

            @settings(max_examples=15, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(mode))
            def check(case):
                case.path_parameters = {**(case.path_parameters or {}), "graph_id": graph["id"]}
                case.headers = {**(case.headers or {}), "X-API-Key": api.secret}
                before = snapshot(api)
                response = case.call()
                statuses.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.as_curl_command(), response.text[:300]))
                elif 400 <= response.status_code < 500 and snapshot(api) != before:
                    failures.append((case.as_curl_command(), response.status_code, "wrote"))

            try:
                check()
            except Unsatisfiable:
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    assert not failures, failures[:10]
