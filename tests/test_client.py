"""The Python client against a live server on loopback (uvicorn) with a real worker process:
a real short job submitted and waited for, and problems raised as exceptions."""

from __future__ import annotations

import pytest

from sparse_circuits.client import Client, JobFailed, ProblemError
from sparse_circuits.server.routes.jobs import JobPublic

TOY = {"out": "models/toy", "steps": 30, "n_layers": 1, "d_model": 16, "n_heads": 2,
       "batch_size": 16, "log_every": 5, "checkpoint_every": 1000, "device": "cpu"}  # fmt: skip


def test_client_submits_a_real_job_and_waits_for_it(live_server, worker_process):
    with Client(live_server.url, api_key=live_server.api.secret) as sc:
        job = sc.submit("train-toy", TOY)
        assert isinstance(job, JobPublic) and job.state == "queued"
        done = sc.wait(job, progress=True, timeout=600)
        assert done.state == "succeeded", done.error
        assert done.step == done.total and done.total is not None
        assert done.metrics and "loss" in done.metrics
        assert [a.kind for a in done.artifacts] == ["model"]
        model = done.artifacts[0]
        assert model.path == "models/toy" and model.job_id == job.id
        assert "accuracy" in model.metrics
        assert [m.id for m in sc.models()] == [model.id]
        assert sc.artifact("model", model.id) == model
        curve = sc.metrics_log(job)
        assert curve and curve[-1]["step"] <= TOY["steps"]
        assert sc.artifact_metrics_log("model", model) == curve
        assert sc.jobs(state="succeeded").count == 1
        assert (live_server.api.data_dir / "models" / "toy" / "model.safetensors").is_file()


def test_client_raises_problems_and_failed_jobs(live_server):
    url, secret = live_server.url, live_server.api.secret
    with Client(url) as anonymous:
        with pytest.raises(ProblemError) as e:
            anonymous.submit("train-toy", TOY)
        assert e.value.status == 401 and "X-API-Key" in e.value.detail
        assert anonymous.jobs().count == 0  # reads are open
    with Client(url, api_key=secret) as sc:
        with pytest.raises(ProblemError) as e:
            sc.submit("train-toy", {**TOY, "steps": "many"})
        assert e.value.status == 422
        assert e.value.errors[0]["loc"] == ["body", "config", "steps"]
        with pytest.raises(ProblemError) as e:
            sc.submit("train-toy", {**TOY, "out": "../outside"})
        assert e.value.status == 422 and "outside" in str(e.value)
        with pytest.raises(ProblemError) as e:
            sc.job("nope")
        assert e.value.status == 404 and "nope" in e.value.detail
        with pytest.raises(ValueError):
            sc.artifacts("graphz")
        job = sc.submit("train-toy", TOY)
        sc.cancel(job)
        with pytest.raises(JobFailed) as failed:
            sc.wait(job, progress=False, timeout=30)
        assert failed.value.job.state == "cancelled"
        assert sc.wait(job, progress=False, raise_on_failure=False).state == "cancelled"
        assert sc.retry(job).state == "queued"
        with pytest.raises(TimeoutError):
            sc.wait(job, progress=False, timeout=0.5)  # no worker here: it stays queued


def test_client_graphs_inline_and_queued_and_features(live_server, worker_process, graph_artifacts):
    """Graphs through the client: made inline (201), made by a job past the inline budget (202,
    followed to the end), fetched pruned on the server, listed, deleted; a feature without
    statistics is a 409 problem naming the feature-stats job."""
    import shutil

    api = live_server.api
    for sub in ("models", "clts"):
        shutil.copytree(graph_artifacts.root / sub, api.data_dir / sub)
    with Client(live_server.url, api_key=api.secret) as sc:
        model = sc.register("model", "models/addition-tiny")
        clt = sc.register("transcoder", "clts/addition-tiny")
        assert clt.kind == "transcoder" and sc.transcoders()[0].id == clt.id
        inline = sc.create_graph(model=model, transcoder=clt, prompt="36+47=", max_feature_nodes=16)
        assert inline.state == "complete" and inline.job_id is None and inline.n_nodes
        full = sc.graph_json(inline, node_threshold=1.0, edge_threshold=1.0)
        pruned = sc.graph_json(inline, node_threshold=0.5, edge_threshold=0.8)
        assert 0 < len(pruned["nodes"]) <= len(full["nodes"])
        assert len(pruned["links"]) <= len(full["links"])
        api.app.state.settings.inline_graph_budget_s = 0.0  # from now on every graph is a job
        queued = sc.create_graph(model=model, transcoder=clt, prompt="12+34=", wait=False,
                                 max_feature_nodes=16)  # fmt: skip
        assert queued.job.kind == "attribute" and queued.graph.state == "pending"
        made = sc.create_graph(model=model, transcoder=clt, prompt_ids=[0, 3, 4, 11, 5, 6, 12],
                               max_feature_nodes=16, progress=False, timeout=300)  # fmt: skip
        assert made.state == "complete" and made.job_id is not None
        assert sc.wait(queued.job, progress=False, timeout=300).state == "succeeded"
        assert sc.graph(queued.graph_id).state == "complete"
        assert sc.graphs().count == 3
        sc.delete_graph(inline)
        with pytest.raises(ProblemError) as e:
            sc.graph(inline)
        assert e.value.status == 404
        with pytest.raises(ProblemError) as e:
            sc.feature(clt, 0, 1)
        assert e.value.status == 409 and e.value.problem["job"]["kind"] == "feature-stats"
