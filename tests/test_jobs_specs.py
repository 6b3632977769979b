"""Job specs (kind and config validated, paths confined to the data dir), artifact registration
with lineage, and the `db` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_circuits.cli import main
from sparse_circuits.io import write_json
from sparse_circuits.jobs.artifacts import (
    ArtifactError,
    register_artifact,
    relative_path,
    scan_data_dir,
)
from sparse_circuits.jobs.db import Artifact, make_engine, make_sessionmaker, schema_is_current
from sparse_circuits.jobs.specs import JobSpecError, validate_job


@pytest.fixture
def data_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "models").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    (root / "inner").symlink_to(root / "models")
    return root


def _errors(kind: str, config: dict, data_dir: Path) -> list[dict]:
    with pytest.raises(JobSpecError) as e:
        validate_job(kind, config, data_dir)
    return e.value.errors


def test_a_valid_spec_comes_back_with_paths_relative_to_the_data_dir(data_dir):
    config = validate_job(
        "train-clt",
        {"activations": "s3://bucket/a.zarr", "out": str(data_dir / "clts/c")},
        data_dir,
    )
    assert (config.activations, str(config.out)) == ("s3://bucket/a.zarr", "clts/c")
    config = validate_job("sparsify", {"model": "inner/dense", "out": "models/s"}, data_dir)
    assert (str(config.model), str(config.out)) == ("models/dense", "models/s")  # symlink inside


@pytest.mark.parametrize(
    "field, value",
    [("out", "../escape"), ("out", "/etc"), ("out", "link/clt"), ("activations", "models/../../x")],
)
def test_paths_outside_the_data_dir_are_refused_naming_the_field(data_dir, field, value):
    config = {"activations": "a.zarr", "out": "clts/c", field: value}
    (error,) = _errors("train-clt", config, data_dir)
    assert error["loc"] == ("config", field) and "outside the data dir" in error["msg"]


def test_nested_and_listed_paths_are_confined_too(data_dir):
    config = {"model": "models/m", "out": "activations/a.zarr", "data": {"corpus": ["/etc/*.conf"]}}
    (error,) = _errors("harvest", config, data_dir)
    assert error["loc"] == ("config", "data", "corpus", 0)
    errors = _errors(
        "sparsify", {"model": "/m", "out": "../s", "data": ["stdlib", "../t"]}, data_dir
    )
    assert {e["loc"] for e in errors} == {
        ("config", "model"), ("config", "out"), ("config", "data", 1),
    }  # fmt: skip
    ok = validate_job("pretrain", {"out": "models/p", "corpus": ["texts/*.txt"]}, data_dir)
    assert ok.corpus == ["texts/*.txt"]
    assert validate_job("pretrain", {"out": "models/p", "corpus": ["user/set"]}, data_dir).corpus


def test_kind_and_config_are_validated_by_the_stage_naming_the_field(data_dir):
    assert _errors("nope", {}, data_dir)[0]["loc"] == ("kind",)
    errors = _errors("train-toy", {"out": "models/t", "steps": "many", "bogus": 1}, data_dir)
    assert {e["loc"] for e in errors} == {("config", "steps"), ("config", "bogus")}
    assert _errors("train-clt", {"out": "clts/c"}, data_dir)[0]["loc"] == ("config", "activations")
    assert _errors("train-toy", [], data_dir)[0]["loc"] == ("config",)


# ----------------------------------------------------------------------------- artifacts


@pytest.fixture
def session(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    assert main(["db", "upgrade", "--database-url", url]) == 0
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        yield s
    engine.dispose()


def _model(path: Path, parent: str | None = None) -> None:
    write_json(path / "config.json", {"format": "sparse-circuits-model", "n_layers": 2})
    write_json(path / "metrics.json", {"loss": 1.0})
    if parent:
        write_json(path / "run.json", {"stage": "sparsify", "config": {"model": parent}})


def test_artifacts_are_registered_with_their_lineage(session, data_dir):
    _model(data_dir / "models/dense")
    _model(data_dir / "models/sparse", parent="models/dense")
    store = data_dir / "activations/a.zarr"
    attrs = {"format": "sparse-circuits-activations", "model": str(data_dir / "models/sparse")}
    write_json(store / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    clt = data_dir / "clts/c"
    write_json(clt / "config.json", {"format": "sparse-circuits-clt", "clt": {"d_features": 8}})
    write_json(
        clt / "run.json", {"stage": "train-clt", "config": {"activations": "activations/a.zarr"}}
    )
    write_json(clt / "metrics.json", {"fvu": 0.1})
    graph = {"metadata": {"slug": "g", "prompt": "1+1="}, "nodes": [{}], "links": []}
    write_json(data_dir / "graphs/g.json", graph)

    registered = register_artifact(session, data_dir, clt)  # registers store and models on the way
    assert (registered.kind, registered.path, registered.metrics) == (
        "transcoder",
        "clts/c",
        {"fvu": 0.1},
    )
    found = {a.path: a for a in scan_data_dir(session, data_dir)}
    assert set(found) == {
        "models/dense",
        "models/sparse",
        "activations/a.zarr",
        "clts/c",
        "graphs/g.json",
    }
    assert found["activations/a.zarr"].state == "partial"  # not complete
    assert found["clts/c"].store_id == found["activations/a.zarr"].id
    assert found["activations/a.zarr"].model_id == found["models/sparse"].id
    assert found["models/sparse"].model_id == found["models/dense"].id
    assert found["clts/c"].model_id == found["models/sparse"].id
    assert found["graphs/g.json"].kind == "graph"
    assert session.query(Artifact).count() == 5  # registering again updates, never duplicates
    with pytest.raises(ArtifactError):
        register_artifact(session, data_dir, "models")  # no artifact
    with pytest.raises(ArtifactError):
        relative_path(data_dir, data_dir.parent / "elsewhere")


def test_db_command_upgrades_once_and_reports(database_url, tmp_path):
    assert main(["db", "current", "--database-url", database_url]) == 1
    assert main(["db", "upgrade", "--database-url", database_url]) == 0
    assert main(["db", "upgrade", "--database-url", database_url]) == 0  # at head: nothing
    assert main(["db", "current", "--database-url", database_url]) == 0
    engine = make_engine(database_url)
    assert schema_is_current(engine)
    engine.dispose()
    assert main(["db", "upgrade"]) == 2  # neither a data dir nor a URL
    assert main(["db", "upgrade", "--data-dir", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d/sparse-circuits.db").is_file()
