"""Artifacts on S3 (the loopback moto server of conftest.py), written whole or not at all.

Directories (models, CLTs) go up with their manifest last; an upload killed part-way leaves a
prefix that reads as absent; a replacement never reads as a mix of two versions. Activation
stores are zarr on S3 end to end: harvested there, and a CLT trained from there with only the
environment's S3 settings (what a Ray node or a worker on another machine has) equals one
trained from the same store on disk.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparse_circuits import storage
from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.clt.train import TrainCLTConfig, train_clt
from sparse_circuits.storage import MANIFEST, StorageError


def _tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _artifact(root, version: int):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"version": version}))
    (root / "sub" / "weights.bin").write_bytes(np.arange(1000 * version, dtype=np.int32).tobytes())
    if version == 1:
        (root / "only_in_v1.txt").write_text("old")
    return root


def test_directory_round_trip_manifest_last(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/clts/c1"
    src = _artifact(tmp_path / "v1", 1)
    assert not storage.dir_complete(url, options)
    manifest = storage.put_dir(src, url, options)
    assert set(manifest["files"]) == {"config.json", "sub/weights.bin", "only_in_v1.txt"}
    assert storage.dir_complete(url, options)
    got = storage.get_artifact(url, tmp_path / "down", options)
    assert _tree(got) == _tree(src)

    # replaced by v2: files v2 lacks are gone, the rest are v2's
    storage.put_dir(_artifact(tmp_path / "v2", 2), url, options)
    assert _tree(storage.get_dir(url, tmp_path / "down", options)) == _tree(tmp_path / "v2")
    fs, root = storage.filesystem(url, options)
    assert not fs.exists(f"{root}/only_in_v1.txt")


def test_upload_killed_part_way_reads_as_absent(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/models/m"
    storage.put_dir(_artifact(tmp_path / "v1", 1), url, options)
    fs, _ = storage.filesystem(url, options)
    real_put, calls = fs.put_file, []  # fsspec caches the instance: put_dir gets this one

    def dies_after_one(lpath, rpath, *a, **kw):  # the process "dies" at the second file
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(rpath)
        return real_put(lpath, rpath, *a, **kw)

    monkeypatch.setattr(fs, "put_file", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        storage.put_dir(_artifact(tmp_path / "v2", 2), url, options)
    monkeypatch.undo()
    # one v2 file is up and the v1 manifest is gone: neither version is readable
    assert storage.read_manifest(url, options) is None
    assert not storage.dir_complete(url, options)
    with pytest.raises(StorageError, match="no complete artifact"):
        storage.get_dir(url, tmp_path / "down", options)
    # a torn object under a manifest is caught too
    storage.put_dir(_artifact(tmp_path / "v3", 2), url, options)
    fs.pipe_file(f"{bucket}/models/m/sub/weights.bin", b"torn")
    assert not storage.dir_complete(url, options)
    with pytest.raises(StorageError, match="does not match"):
        storage.get_dir(url, tmp_path / "down2", options)
    assert not (tmp_path / "down2").exists()


def test_single_file_is_one_put(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/graphs/g.json"
    (tmp_path / "g.json").write_text('{"nodes": []}')
    storage.put_artifact(tmp_path / "g.json", url, options)
    assert storage.read_bytes(url, options) == b'{"nodes": []}'
    assert storage.get_artifact(url, tmp_path / "back.json", options).read_text() == '{"nodes": []}'
    assert MANIFEST not in storage.filesystem(f"s3://{bucket}/graphs", options)[0].ls(
        f"{bucket}/graphs"
    )


def test_clt_trained_from_s3_store_with_environment_settings(
    tmp_path, s3_bucket, tiny_model_dir, token_file, monkeypatch
):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/activations/a.zarr"
    harvest_cfg = dict(
        model=tiny_model_dir, tokens_file=token_file, tokens=256, batch_size=8,
        shard_rows=256, shuffle_shards=1, device="cpu",
    )  # fmt: skip
    creds = {"key": options["key"], "secret": options["secret"]}
    harvest(
        HarvestConfig(
            out=url, endpoint_url=options["endpoint_url"], storage_options=creds, **harvest_cfg
        )
    )
    harvest(HarvestConfig(out=str(tmp_path / "a.zarr"), **harvest_cfg))
    # What a Ray node or remote worker has: S3 settings in its environment, none in the config.
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    train = dict(d_features=32, batch_size=64, steps=6, lr_warmup_steps=1, device="cpu")
    remote = train_clt(TrainCLTConfig(activations=url, out=tmp_path / "c_s3", **train))
    local = train_clt(
        TrainCLTConfig(activations=str(tmp_path / "a.zarr"), out=tmp_path / "c", **train)
    )
    for f in sorted(local.glob("W_*.safetensors")):
        want, got = load_file(f), load_file(remote / f.name)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # and the CLT goes up whole, for a machine with no shared disk
    storage.put_dir(remote, f"s3://{bucket}/clts/c", options)
    assert storage.dir_complete(f"s3://{bucket}/clts/c", options)


# ----------------------------------------------------------------------------- a data dir on S3


def test_remote_data_dir_fetches_whole_and_only_what_changed(tmp_path, s3_bucket, monkeypatch):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/data"
    here = storage.RemoteDataDir(url, tmp_path / "here", options)
    there = storage.RemoteDataDir(url, tmp_path / "there", options)  # another machine's cache
    assert here.fetch("models/m") is None  # nothing there yet
    _artifact(there.local / "models/m", 1)
    there.upload("models/m", {"state": "complete"})
    assert storage.read_manifest(f"{url}/models/m", options)["state"] == "complete"
    got = here.fetch("models/m")
    assert got == here.local / "models/m" and _tree(got) == _tree(there.local / "models/m")

    fs, _ = storage.filesystem(url, options)
    real_get, gets = fs.get_file, []
    monkeypatch.setattr(fs, "get_file", lambda *a, **kw: gets.append(a[0]) or real_get(*a, **kw))
    here.fetch("models/m")
    assert gets == []  # unchanged since the last sync: nothing downloaded

    # written here since (a run killed before it uploaded): kept while the prefix's copy is
    # the one it was synced with
    (here.local / "models/m/config.json").write_text('{"version": "local"}')
    here.fetch("models/m")
    assert (here.local / "models/m/config.json").read_text() == '{"version": "local"}'
    # the prefix's copy changed (a later attempt elsewhere uploaded): it replaces the local one
    shutil.rmtree(there.local / "models/m")
    _artifact(there.local / "models/m", 2)
    puts = []
    real_put = fs.put_file
    monkeypatch.setattr(fs, "put_file", lambda *a, **kw: puts.append(a[1]) or real_put(*a, **kw))
    there.upload("models/m")
    assert sorted(p.rsplit("/", 1)[-1] for p in puts) == ["config.json", "weights.bin"]
    here.fetch("models/m")
    assert _tree(here.local / "models/m") == _tree(there.local / "models/m")
    assert not (here.local / "models/m/only_in_v1.txt").exists()
    # re-uploading an unchanged directory sends nothing but its manifest
    puts.clear()
    there.upload("models/m")
    assert puts == []

    # one object (a graph JSON, a token file) syncs by its ETag
    (there.local / "tokens.npy").write_bytes(b"v1")
    there.upload("tokens.npy")
    assert here.fetch("tokens.npy").read_bytes() == b"v1"
    gets.clear()
    here.fetch("tokens.npy")
    assert gets == []


def test_remote_data_dir_refuses_a_torn_upload(tmp_path, s3_bucket):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/data"
    cache = storage.RemoteDataDir(url, tmp_path / "cache", options)
    fs, _ = storage.filesystem(url, options)
    fs.pipe_file(f"{bucket}/data/clts/c/W_enc_0.safetensors", b"half an upload")
    with pytest.raises(StorageError, match="no MANIFEST.json"):
        cache.fetch("clts/c")
    assert not (cache.local / "clts/c").exists()
    # a corpus folder uploaded by hand is taken as it is where a folder is expected
    fs.pipe_file(f"{bucket}/data/corpus/a.txt", b"some text")
    assert (cache.fetch("corpus", folders=True) / "a.txt").read_bytes() == b"some text"
    assert cache.glob("corpus/*.txt") == ["corpus/a.txt"]
    for bad in ("../x", "/etc", "s3://elsewhere/x"):
        with pytest.raises(StorageError, match="not a path inside the data dir"):
            cache.fetch(bad)


def test_configs_take_an_s3_data_dir(tmp_path, monkeypatch):
    from pydantic import ValidationError  # noqa: PLC0415

    from sparse_circuits.jobs.worker import WorkerConfig  # noqa: PLC0415
    from sparse_circuits.server.settings import ServerSettings  # noqa: PLC0415

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    settings = ServerSettings(data_dir="s3://lab/shared/")
    assert settings.data_url == "s3://lab/shared"
    assert settings.data_dir == tmp_path / "sparse-circuits/data/lab/shared"
    assert ServerSettings.model_validate(settings.model_dump()) == settings  # round trip
    worker = WorkerConfig(data_url="s3://lab/shared", data_dir=tmp_path / "cache")
    assert (worker.data_url, worker.data_dir) == ("s3://lab/shared", tmp_path / "cache")
    for bad, message in (
        ({"data_dir": "gs://lab/x"}, "s3://bucket/prefix"),
        ({"data_dir": "s3://"}, "s3://bucket/prefix"),
        ({"data_dir": "s3://lab/x", "data_url": "s3://lab/y"}, "give the s3:// prefix once"),
    ):
        with pytest.raises(ValidationError, match=message):
            WorkerConfig(**bad)


def test_a_job_that_did_not_succeed_uploads_only_what_it_changed(tmp_path, s3_bucket):
    from sparse_circuits.jobs.remote import upload_job_outputs  # noqa: PLC0415

    bucket, options = s3_bucket
    remote = storage.RemoteDataDir(f"s3://{bucket}/data", tmp_path / "cache", options)
    _artifact(remote.local / "models/m", 1)
    upload_job_outputs(remote, "train-toy", {"out": "models/m"}, state="succeeded",
                       job_id="first", attempt=1)  # fmt: skip
    url = f"s3://{bucket}/data/models/m"
    assert storage.read_manifest(url, options)["state"] == "complete"
    assert not remote.changed_here("models/m")
    # a later job refused that out dir (it holds another run) and failed: nothing goes up
    sent = upload_job_outputs(remote, "train-toy", {"out": "models/m"}, state="failed",
                              job_id="second", attempt=1)  # fmt: skip
    assert sent == []
    assert storage.read_manifest(url, options)["job_id"] == "first"
    # one stopped after writing a checkpoint goes up, marked partial
    (remote.local / "models/m/checkpoint.bin").write_bytes(b"step 10")
    assert remote.changed_here("models/m")
    sent = upload_job_outputs(remote, "train-toy", {"out": "models/m"}, state="cancelled",
                              job_id="third", attempt=2)  # fmt: skip
    manifest = storage.read_manifest(url, options)
    assert sent == ["models/m"] and "checkpoint.bin" in manifest["files"]
    assert (manifest["state"], manifest["job_id"], manifest["attempt"]) == ("partial", "third", 2)
