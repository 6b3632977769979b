"""Harvest and loader: the store read back with plain zarr against a direct forward pass,
resume after SIGKILL, S3 through a loopback server, the loader's coverage, and bad stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import FsspecStore

from sparse_circuits.clt.harvest import HarvestConfig, harvest
from sparse_circuits.clt.loader import ActivationLoader, open_store
from sparse_circuits.clt.store import StoreError, create_arrays, read_shard
from sparse_circuits.sparse_attention.hooks import capture
from sparse_circuits.sparse_attention.modeldir import load_model

ROWS, SHARD = 500, 64  # 8 shards, the last one partial
REPO = Path(__file__).resolve().parents[1]


def config(model_dir, token_file, out, **kw) -> HarvestConfig:
    base = dict(
        model=model_dir,
        out=str(out),
        tokens_file=token_file,
        tokens=ROWS,
        batch_size=8,
        shard_rows=SHARD,
        shuffle_shards=2,
        device="cpu",
    )
    return HarvestConfig(**(base | kw))


def as_float(a: np.ndarray) -> np.ndarray:
    """Stored bf16 bit patterns (uint16) as float32, with numpy alone."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def read_plain(group: zarr.Group) -> dict[str, np.ndarray]:
    return {name: group[name][...] for name in ("inputs", "targets", "tokens", "doc", "pos")}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, tiny_model_dir, token_file):
    out = tmp_path_factory.mktemp("store") / "acts.zarr"
    result = harvest(config(tiny_model_dir, token_file, out))
    return out, result


# ----------------------------------------------------------------------------- contents


def test_store_equals_direct_forward_pass(local_store, tiny_model_dir, token_file):
    out, result = local_store
    group = zarr.open_group(str(out), mode="r")  # plain zarr, none of our code
    attrs = group.attrs.asdict()
    rows = read_plain(group)
    assert attrs["complete"] and attrs["rows_written"] == attrs["rows_total"] == ROWS
    assert attrs["activation_dtype"] == "bfloat16" and group["inputs"].dtype == np.uint16
    assert attrs["hooks"] == {
        "inputs": "blocks.{l}.hook_mlp_in",
        "targets": "blocks.{l}.hook_mlp_out",
    }
    assert group["inputs"].shape == (ROWS, 2, 16) and group["inputs"].shards == (SHARD, 2, 16)
    assert (
        result == str(out) and result.metrics["rows"] == ROWS and result.metrics["tokens_per_s"] > 0
    )
    assert attrs["metrics"] == result.metrics

    seqs = np.load(token_file)
    doc, pos = rows["doc"], rows["pos"]
    np.testing.assert_array_equal(rows["tokens"], seqs[doc, pos])
    assert len(set(zip(doc.tolist(), pos.tolist(), strict=True))) == ROWS  # no row twice
    assert (pos > 0).all()  # the BOS rows are left out
    assert len(set(doc[:SHARD].tolist())) > 4  # one shard mixes many sequences
    assert not (np.diff(doc) >= 0).all()  # and rows are not in data order

    model, _ = load_model(tiny_model_dir)
    names = [f"blocks.{i}.hook_mlp_{w}" for w in ("in", "out") for i in range(2)]
    with torch.no_grad(), capture(model, names) as acts:
        model(torch.from_numpy(seqs))
    want_in = torch.stack([acts[f"blocks.{i}.hook_mlp_in"] for i in range(2)], 2).numpy()  # N,T,L,M
    want_out = torch.stack([acts[f"blocks.{i}.hook_mlp_out"] for i in range(2)], 2).numpy()
    for got, want in ((rows["inputs"], want_in), (rows["targets"], want_out)):
        np.testing.assert_allclose(as_float(got), want[doc, pos], rtol=1 / 128, atol=1e-6)

    x = as_float(rows["inputs"]).astype(np.float64)  # N,L,M
    mean = x.mean(0)
    scale = np.sqrt(((x - mean) ** 2).sum(-1).mean(0) / x.shape[-1])
    np.testing.assert_allclose(group["stats/inputs_mean"][...], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(group["stats/inputs_scale"][...], scale, rtol=1e-5)


def test_float16_and_every_token(tmp_path, tiny_model_dir, token_file):
    out = tmp_path / "f16.zarr"
    harvest(config(tiny_model_dir, token_file, out, tokens=None, include_bos=True, dtype="float16"))
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["rows_total"] == 40 * 16 and group["inputs"].dtype == np.float16
    assert (group["pos"][...] == 0).sum() == 40
    batches = list(ActivationLoader(str(out), batch_size=100))  # float16 widened on the way out
    got = np.sort(np.concatenate([x.numpy() for x, _ in batches]).reshape(640, -1), axis=0)
    want = np.sort(group["inputs"][...].astype(np.float32).reshape(640, -1), axis=0)
    np.testing.assert_array_equal(got, want)


def test_rerun_of_complete_store_returns_its_metrics(local_store, tiny_model_dir, token_file):
    out, first = local_store
    before = (out / "inputs" / "c" / "0" / "0" / "0").stat().st_mtime_ns
    again = harvest(config(tiny_model_dir, token_file, out))
    assert again.metrics == first.metrics
    assert (out / "inputs" / "c" / "0" / "0" / "0").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- resume


def test_killed_while_finishing_completes_without_rewriting(
    tmp_path, local_store, tiny_model_dir, token_file
):
    out = copy_store(local_store[0], tmp_path / "finishing.zarr")
    group = zarr.open_group(str(out), mode="r+")
    group.attrs.update({"complete": False})
    for name in ("inputs_mean", "inputs_scale"):
        del group["stats"][name]
    shard = out / "inputs" / "c" / "7" / "0" / "0"  # the last, partial one
    before = shard.stat().st_mtime_ns
    harvest(config(tiny_model_dir, token_file, out))
    assert shard.stat().st_mtime_ns == before
    done = zarr.open_group(str(out), mode="r")
    assert done.attrs["complete"]
    clean = zarr.open_group(str(local_store[0]), mode="r")
    np.testing.assert_array_equal(done["stats/inputs_scale"][...], clean["stats/inputs_scale"][...])


KILLABLE = """
import sys, time
from sparse_circuits.clt import harvest as h
from sparse_circuits.clt.harvest import HarvestConfig, harvest
real = h.shard_sums
def slow(*a):  # between a shard's arrays and its rows_written: where a kill hurts most
    time.sleep(0.25)
    return real(*a)
h.shard_sums = slow
harvest(HarvestConfig.model_validate_json(sys.argv[1]))
"""


def test_resume_after_sigkill(tmp_path, tiny_model_dir, token_file, local_store):
    out = tmp_path / "killed.zarr"
    cfg = config(tiny_model_dir, token_file, out)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, cfg.model_dump_json()], env=env, stderr=subprocess.PIPE
    )
    meta = out / "zarr.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if meta.is_file() and json.loads(meta.read_text())["attributes"]["rows_written"] >= SHARD:
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        f"harvest ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    written = json.loads(meta.read_text())["attributes"]["rows_written"]
    assert SHARD <= written < ROWS
    with pytest.raises(StoreError, match="incomplete"):
        open_store(str(out))
    partial = ActivationLoader(str(out), batch_size=32, allow_incomplete=True)
    assert partial.n_rows == written and sum(len(x) for x, _ in partial) == written

    harvest(cfg)  # the same command again
    clean = zarr.open_group(str(local_store[0]), mode="r")
    resumed = zarr.open_group(str(out), mode="r")
    assert resumed.attrs["complete"] and resumed.attrs["rows_written"] == ROWS
    for name, want in read_plain(clean).items():
        np.testing.assert_array_equal(resumed[name][...], want, err_msg=name)
    for name in ("inputs_mean", "inputs_scale", "targets_mean", "targets_scale"):
        np.testing.assert_array_equal(resumed[f"stats/{name}"][...], clean[f"stats/{name}"][...])
    assert not list(out.rglob("*.partial"))


# ----------------------------------------------------------------------------- S3


def test_s3_store_through_loopback_server(tmp_path, s3_bucket, tiny_model_dir, token_file):
    """The same harvest to S3 and to disk gives the same store; both read back alike."""
    bucket, options = s3_bucket
    url = f"s3://{bucket}/runs/acts.zarr"
    creds = {k: v for k, v in options.items() if k != "endpoint_url"}
    s3 = dict(storage_options=creds, endpoint_url=options["endpoint_url"])
    big_shards = dict(
        shard_rows=256, shuffle_shards=1
    )  # few objects: the loopback server is slow per request
    assert harvest(config(tiny_model_dir, token_file, url, **s3, **big_shards)) == url
    harvest(config(tiny_model_dir, token_file, tmp_path / "twin.zarr", **big_shards))

    remote = zarr.open_group(
        FsspecStore.from_url(url, storage_options=options, read_only=True), mode="r"
    )
    local = zarr.open_group(str(tmp_path / "twin.zarr"), mode="r")
    assert remote.attrs.asdict() == local.attrs.asdict() | {"metrics": remote.attrs["metrics"]}
    for name, want in read_plain(local).items():
        np.testing.assert_array_equal(remote[name][...], want, err_msg=name)

    loader = ActivationLoader(url, batch_size=100, storage_options=options, normalize=True)
    torch.testing.assert_close(
        loader.stats, ActivationLoader(str(tmp_path / "twin.zarr"), batch_size=100).stats
    )
    assert sum(len(x) for x, _ in loader) == ROWS

    with pytest.raises(StoreError, match="another harvest"):
        harvest(config(tiny_model_dir, token_file, url, **s3, **big_shards, seed=1))


# ----------------------------------------------------------------------------- loader


def test_shard_reader_equals_zarr(tmp_path):
    """The loader's own shard parser against zarr's reader: several inner chunks, a partial last shard."""
    attrs = dict(
        rows_total=100,
        n_layers=3,
        d_model=5,
        shard_rows=32,
        chunk_rows=8,
        activation_dtype="bfloat16",
    )
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    create_arrays(group, attrs)
    values = np.random.default_rng(0).integers(0, 2**16, size=(100, 3, 5), dtype=np.uint16)
    group["inputs"][...] = values
    for k in range(4):
        rows = min(32, 100 - 32 * k)
        np.testing.assert_array_equal(
            read_shard(group["inputs"], k, rows), group["inputs"][32 * k : 32 * k + rows]
        )
    np.testing.assert_array_equal(read_shard(group["inputs"], 3, 4), values[96:])


def row_keys(batches) -> Counter:
    return Counter(row.tobytes() for x, _ in batches for row in x.numpy())


def test_ranks_are_disjoint_and_cover_every_row_once(local_store):
    url = str(local_store[0])
    stored = as_float(zarr.open_group(url, mode="r")["inputs"][...])
    want = Counter(row.tobytes() for row in stored)
    seen: Counter = Counter()
    for rank in range(3):
        loader = ActivationLoader(
            url, batch_size=48, rank=rank, world_size=3, shuffle_buffer_rows=128, seed=5
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(
            x.shape[1:] == (2, 16) and x.dtype == torch.float32 and y.shape == x.shape
            for x, y in batches
        )
        seen += row_keys(batches)
    assert seen == want  # as a multiset: rows with equal values (same token and position) exist


def test_loader_shuffles_and_pairs_rows(local_store):
    url = str(local_store[0])
    group = zarr.open_group(url, mode="r")
    stored_in, stored_out = as_float(group["inputs"][...]), as_float(group["targets"][...])
    target_of = {a.tobytes(): b for a, b in zip(stored_in, stored_out, strict=True)}
    loader = ActivationLoader(url, batch_size=50, epochs=2, seed=0, shuffle_buffer_rows=256)
    batches = list(loader)
    assert len(batches) == 2 * len(loader) == 20
    for x, y in batches:  # each target row still belongs to its input row
        for a, b in zip(x.numpy(), y.numpy(), strict=True):
            np.testing.assert_array_equal(target_of[a.tobytes()], b)
    order = [r.tobytes() for x, _ in batches for r in x.numpy()]
    epoch0, epoch1 = order[:ROWS], order[ROWS:]
    assert Counter(epoch0) == Counter(epoch1) == Counter(r.tobytes() for r in stored_in)
    assert epoch0 != epoch1
    assert epoch0 != [r.tobytes() for r in stored_in]
    reseeded = [
        r.tobytes()
        for x, _ in ActivationLoader(url, batch_size=50, seed=0, shuffle_buffer_rows=256)
        for r in x.numpy()
    ]
    assert reseeded == epoch0  # a seed fixes the order


def test_loader_starts_at_a_batch_without_reading_the_ones_before(local_store):
    url = str(local_store[0])
    kw = dict(batch_size=40, epochs=2, seed=3, shuffle_buffer_rows=128)
    full = list(ActivationLoader(url, **kw))
    assert len(full) == 2 * 13
    for start in (0, 5, 13, 14, len(full) - 1, len(full)):
        resumed = ActivationLoader(url, start_batch=start, **kw)
        reads = []
        resumed.read_shard = lambda k, log=reads, read=resumed.read_shard: log.append(k) or read(k)
        got = list(resumed)
        assert len(got) == len(full) - start
        for (x, y), (fx, fy) in zip(got, full[start:], strict=True):
            torch.testing.assert_close((x, y), (fx, fy), rtol=0, atol=0)
        if start == 13:  # the second epoch's 8 shards, once each; the first epoch's left unread
            assert sorted(reads) == list(range(8))


def test_loader_normalises_with_store_stats(local_store):
    url = str(local_store[0])
    loader = ActivationLoader(url, batch_size=64, normalize=True)
    assert set(loader.stats) == {"inputs_mean", "inputs_scale", "targets_mean", "targets_scale"}
    assert loader.stats["inputs_mean"].shape == (2, 16) and loader.stats["inputs_scale"].shape == (
        2,
    )
    xs, ys = zip(*loader, strict=True)
    for z in (torch.cat(xs), torch.cat(ys)):  # N,L,M
        torch.testing.assert_close(z.mean(0), torch.zeros(2, 16), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.pow(2).mean((0, 2)), torch.ones(2), atol=1e-4, rtol=0)


def test_stored_batches_are_the_batches_before_widening(local_store):
    """The 16-bit hand-over and the float32 batches hold the same rows; widening is exact and
    normalising is (x - mean) / scale."""
    loader = ActivationLoader(
        str(local_store[0]), batch_size=48, seed=2, shuffle_buffer_rows=128, normalize=True
    )
    stored, widened = list(loader.stored_batches()), list(loader)
    assert len(stored) == len(widened) == len(loader)
    stats = loader.stats
    for (x16, y16), (x, y) in zip(stored, widened, strict=True):
        assert x16.dtype == y16.dtype == torch.bfloat16 and x.dtype == torch.float32
        for raw, got, name in ((x16, x, "inputs"), (y16, y, "targets")):
            want = (raw.float() - stats[f"{name}_mean"]) / stats[f"{name}_scale"][:, None]
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reader_threads_and_read_ahead_leave_the_batches_unchanged(local_store):
    kw = dict(batch_size=40, epochs=2, seed=4, shuffle_buffer_rows=128)
    one = list(ActivationLoader(str(local_store[0]), readers=1, prefetch=1, **kw))
    many = list(ActivationLoader(str(local_store[0]), readers=4, prefetch=6, **kw))
    assert len(one) == len(many) == 2 * 13
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stopping_early_ends_the_loader_threads(local_store):
    def loader_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("activation-")]

    assert loader_threads() == []
    batches = iter(ActivationLoader(str(local_store[0]), batch_size=16, shuffle_buffer_rows=64))
    next(batches)
    assert loader_threads()  # the batch thread and its readers are at work
    batches.close()  # what a training loop that stops early (or is garbage collected) does
    deadline = time.monotonic() + 10
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loader_threads() == []


def test_loader_drop_last_and_rank_default(local_store):
    loader = ActivationLoader(str(local_store[0]), batch_size=64, drop_last=True)
    assert (loader.rank, loader.world_size) == (0, 1)
    sizes = [len(x) for x, _ in loader]
    assert sizes == [64] * (ROWS // 64) == [64] * len(loader)


# ----------------------------------------------------------------------------- bad input


def copy_store(src: Path, dst: Path) -> Path:
    import shutil  # noqa: PLC0415

    shutil.copytree(src, dst)
    return dst


def test_store_of_another_model_or_context_is_refused(
    tmp_path, local_store, tiny_model_dir, other_model_dir, token_file
):
    out = copy_store(local_store[0], tmp_path / "acts.zarr")
    before = (out / "zarr.json").read_text()
    with pytest.raises(StoreError, match="model_sha256"):
        harvest(config(other_model_dir, token_file, out))
    with pytest.raises(StoreError, match="context_length"):
        harvest(config(tiny_model_dir, token_file, out, context_length=8, tokens=100))
    assert (out / "zarr.json").read_text() == before


def test_foreign_directory_is_refused(tmp_path, tiny_model_dir, token_file):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        harvest(config(tiny_model_dir, token_file, out))
    assert [p.name for p in out.iterdir()] == ["todo.txt"]
    with pytest.raises(StoreError, match="no activation store"):
        open_store(str(out))


def test_corrupt_truncated_and_missing_shards_are_named(tmp_path, local_store):
    shard3 = Path("inputs") / "c" / "3" / "0" / "0"

    out = copy_store(local_store[0], tmp_path / "flipped.zarr")
    data = bytearray((out / shard3).read_bytes())
    data[100] ^= 0xFF
    (out / shard3).write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"array 'inputs' shard 3 .*inputs/c/3/0/0"):
        list(ActivationLoader(str(out), batch_size=64))

    out = copy_store(local_store[0], tmp_path / "truncated.zarr")
    (out / shard3).write_bytes((out / shard3).read_bytes()[:-7])
    with pytest.raises(StoreError, match=r"array 'inputs' shard 3"):
        list(ActivationLoader(str(out), batch_size=64))

    out = copy_store(local_store[0], tmp_path / "missing.zarr")
    (out / "targets" / "c" / "5" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"array 'targets' is missing shard 5"):
        open_store(str(out))


def test_mixed_dtypes_are_refused(tmp_path, local_store):
    out = copy_store(local_store[0], tmp_path / "mixed.zarr")
    group = zarr.open_group(str(out), mode="r+")
    old = group["targets"]
    group.create_array(
        "targets", shape=old.shape, dtype="float16", chunks=old.chunks, overwrite=True
    )
    with pytest.raises(StoreError, match="mixed dtypes"):
        open_store(str(out))


def test_bad_config_and_data(tmp_path, tiny_model_dir, token_file):
    with pytest.raises(ValueError, match="at most one data source"):
        HarvestConfig(
            model=tiny_model_dir, out=str(tmp_path / "a"), tokens_file=token_file, corpus=["x.txt"]
        )
    with pytest.raises(ValueError, match="data gives 600"):
        harvest(config(tiny_model_dir, token_file, tmp_path / "b", tokens=601))
    with pytest.raises(ValueError, match="longer than the model's"):
        harvest(config(tiny_model_dir, token_file, tmp_path / "c", context_length=32))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((2, 16)))
    with pytest.raises(ValueError, match="integer array"):
        harvest(config(tiny_model_dir, floats, tmp_path / "d"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_model_own_data_by_default(tmp_path):
    """No data given: the model dir's data.json (here the addition toy) at its own context."""
    from sparse_circuits.sparse_attention.data import DataSpec, load_token_data, save_data_spec  # noqa: PLC0415
    from sparse_circuits.sparse_attention.model import ModelConfig, Transformer  # noqa: PLC0415
    from sparse_circuits.sparse_attention.modeldir import save_model  # noqa: PLC0415
    from sparse_circuits.sparse_attention.toy import addition_tokenizer  # noqa: PLC0415

    cfg = ModelConfig(
        family="llama",
        vocab_size=13,
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_mlp=32,
        context_length=16,
        bos_token_id=0,
    )
    model_dir = save_model(Transformer(cfg), tmp_path / "toy", addition_tokenizer())
    save_data_spec(model_dir, DataSpec(task="addition"))

    out = tmp_path / "own.zarr"
    result = harvest(
        HarvestConfig(model=model_dir, out=str(out), tokens=1000, shard_rows=256, device="cpu")
    )
    group = zarr.open_group(str(out), mode="r")
    seqs = load_token_data(model_dir).train_inputs.numpy()
    assert group.attrs["context_length"] == 9 and result.metrics["rows"] == 1000
    np.testing.assert_array_equal(group["tokens"][...], seqs[group["doc"][...], group["pos"][...]])
    assert (group["pos"][...] > 0).all()  # <bos> rows left out
