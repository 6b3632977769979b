"""The activation store: one zarr v3 group of MLP inputs and outputs, local or on S3.

Layout (N rows, one per token; L layers; M d_model):

    inputs   [N, L, M]  16-bit  MLP input at every layer   (blocks.{l}.hook_mlp_in)
    targets  [N, L, M]  16-bit  MLP output at every layer  (blocks.{l}.hook_mlp_out)
    tokens   [N] int32, doc [N] int64 (sequence index in the data), pos [N] int32
    stats/   inputs_mean [L, M], inputs_scale [L], targets_mean [L, M], targets_scale [L]
             (float32, written when the store completes) and the per-shard sums they
             come from: shard_sum [n_shards, 2, L, M], shard_sumsq [n_shards, 2, L] (float64)

float16 is stored as float16; bfloat16 as its uint16 bit pattern (numpy has no bfloat16).
The activation arrays are sharded: one shard is `shard_rows` rows, written whole; its inner
chunks of `chunk_rows` rows are 1-4 MiB and carry a crc32c, so a torn or flipped byte is an
error, not silent garbage. Rows are pre-shuffled across documents.

Group attrs (see `IDENTITY_KEYS` for those a resumed harvest must match): format,
format_version, generator, model, model_sha256, hooks, context_length, activation_dtype,
n_layers, d_model, shard_rows, chunk_rows, shuffle_shards, seed, include_bos, data_sha256,
rows_total, rows_written (the resume point: rows in complete shards), complete, metrics.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Literal, NamedTuple

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.errors import GroupNotFoundError
from zarr.storage import FsspecStore, LocalStore

from .. import __version__
from ..errors import StageError

FORMAT = "sparse-circuits-activations"
FORMAT_VERSION = 1
ACTIVATIONS = ("inputs", "targets")
HOOKS = {"inputs": "blocks.{l}.hook_mlp_in", "targets": "blocks.{l}.hook_mlp_out"}
ROW_ARRAYS = {"tokens": "int32", "doc": "int64", "pos": "int32"}
STATS = ("inputs_mean", "inputs_scale", "targets_mean", "targets_scale")
# The attrs that decide which rows a store holds; a resumed harvest must match all of them.
IDENTITY_KEYS = (
    "format_version", "model_sha256", "hooks", "context_length", "activation_dtype", "n_layers",
    "d_model", "shard_rows", "chunk_rows", "shuffle_shards", "seed", "include_bos", "data_sha256",
    "rows_total",
)  # fmt: skip

ActivationDtype = Literal["float16", "bfloat16"]
# Inner chunks of 1-4 MiB: big enough for S3 range reads, small enough to index; one object
# per shard and array.
CHUNK_TARGET_BYTES = 2 << 20
SHARD_TARGET_BYTES = 64 << 20


class StoreError(StageError):
    """A store that is missing, incomplete, corrupt, or holds other activations than asked for."""


def generator() -> dict[str, str]:
    return {"name": "sparse-circuits", "version": __version__}


# ----------------------------------------------------------------------------- opening


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def zarr_store(url: str, storage_options: dict | None = None, read_only: bool = True):
    """A zarr store for a local path or an fsspec URL (s3://bucket/prefix with storage_options)."""
    if is_remote(url):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    return LocalStore(url.removeprefix("file://"), read_only=read_only)


def open_group_or_none(store) -> zarr.Group | None:
    try:
        return zarr.open_group(store, mode="r" if store.read_only else "r+", zarr_format=3)
    except (GroupNotFoundError, FileNotFoundError):
        return None


def store_complete(url: str, storage_options: dict | None = None) -> bool:
    """Whether `url` holds a finished harvest (its `complete` attribute is set last)."""
    group = open_group_or_none(zarr_store(url, storage_options))
    return bool(group is not None and group.attrs.get("complete"))


def store_keys(store, prefix: str = "") -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def open_store(
    url: str,
    storage_options: dict | None = None,
    *,
    allow_incomplete: bool = False,
    check_shards: bool = True,
) -> zarr.Group:
    """Open an activation store read-only, refusing one that is not complete and consistent.

    allow_incomplete: open a store a harvest is still writing (or was killed writing); only
    its first `rows_written` rows are then valid. check_shards: list the store once and
    name any shard object that should be there and is not.
    """
    group = open_group_or_none(zarr_store(url, storage_options, read_only=True))
    if group is None:
        raise StoreError(f"no activation store at {url} (no zarr group there)")
    attrs = group.attrs.asdict()
    if attrs.get("format") != FORMAT:
        raise StoreError(
            f"{url} is a zarr group but not an activation store (attrs['format'] != {FORMAT!r})"
        )
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{url} has store format version {attrs.get('format_version')}; this code reads {FORMAT_VERSION}"
        )
    if not attrs.get("complete") and not allow_incomplete:
        raise StoreError(
            f"{url} is incomplete ({attrs.get('rows_written')} of {attrs.get('rows_total')} rows written): "
            "a harvest is still writing it or was stopped; rerun the harvest to finish it, or open it "
            "with allow_incomplete=True to read the rows written so far"
        )
    check_layout(group, url)
    if check_shards:
        check_shards_present(group, url, rows_readable(group))
    return group


def check_layout(group: zarr.Group, url: str) -> None:
    """Every array present, with the shapes and dtypes the attrs promise."""
    attrs = group.attrs
    N, L, M = attrs["rows_total"], attrs["n_layers"], attrs["d_model"]
    want = {name: ((N, L, M), stored_dtype(attrs["activation_dtype"])) for name in ACTIVATIONS}
    want |= {name: ((N,), np.dtype(dt)) for name, dt in ROW_ARRAYS.items()}
    members = dict(group.arrays())
    for name, (shape, dtype) in want.items():
        if name not in members:
            raise StoreError(f"{url}: array {name!r} is missing")
        arr = members[name]
        if arr.shape != shape:
            raise StoreError(f"{url}: array {name!r} has shape {arr.shape}, expected {shape}")
        if arr.dtype != dtype:
            raise StoreError(
                f"{url}: array {name!r} has dtype {arr.dtype}, but the store's activation_dtype "
                f"{attrs['activation_dtype']!r} means {dtype} (mixed dtypes in one store)"
            )


def rows_readable(group: zarr.Group) -> int:
    attrs = group.attrs
    return attrs["rows_total"] if attrs.get("complete") else attrs["rows_written"]


def check_shards_present(group: zarr.Group, url: str, rows: int) -> None:
    """Name the first shard object missing from the rows that should be readable.

    zarr reads a missing object as fill values; a store with a deleted or never-written
    shard would otherwise hand out NaN rows without a word.
    """
    present = set(store_keys(group.store))
    n_shards = math.ceil(rows / group.attrs["shard_rows"])
    for name in (*ACTIVATIONS, *ROW_ARRAYS):
        arr = group[name]
        prefix = f"{group.path}/{name}/" if group.path else f"{name}/"
        for k in range(n_shards):
            key = prefix + arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))
            if key not in present:
                a, b = shard_range(k, group.attrs["shard_rows"], rows)
                raise StoreError(
                    f"{url}: array {name!r} is missing shard {k} (object {key!r}, rows {a}-{b})"
                )


# ----------------------------------------------------------------------------- layout


def shard_range(k: int, shard_rows: int, n_rows: int) -> tuple[int, int]:
    return k * shard_rows, min((k + 1) * shard_rows, n_rows)


def default_layout(n_layers: int, d_model: int, shard_rows: int | None) -> tuple[int, int]:
    """(shard_rows, chunk_rows): shards of ≈64 MiB and inner chunks of ≈1-4 MiB per array.

    chunk_rows is the largest divisor of shard_rows whose chunk stays within the target,
    so a shard is a whole number of inner chunks.
    """
    row_bytes = n_layers * d_model * 2
    target = max(1, 2 ** int(math.log2(max(1, CHUNK_TARGET_BYTES // row_bytes))))
    if shard_rows is None:
        shard_rows = max(target, 2 ** int(math.log2(max(1, SHARD_TARGET_BYTES // row_bytes))))
    chunk_rows = max(c for c in range(1, min(target, shard_rows) + 1) if shard_rows % c == 0)
    return shard_rows, chunk_rows


def stored_dtype(activation_dtype: str) -> np.dtype:
    if activation_dtype == "float16":
        return np.dtype("float16")
    if activation_dtype == "bfloat16":
        return np.dtype("uint16")
    raise StoreError(f"unknown activation_dtype {activation_dtype!r} (float16 or bfloat16)")


def stored_as_float32(a: np.ndarray, activation_dtype: ActivationDtype) -> np.ndarray:
    """Stored rows as float32 on the CPU; bf16 by a 16-bit shift (bf16 is fp32's top half),
    several times faster here than torch's bf16 -> fp32 cast."""
    if activation_dtype == "bfloat16":
        return np.left_shift(a, 16, dtype=np.uint32).view(np.float32)
    return a.astype(np.float32)


def from_stored(a: np.ndarray, activation_dtype: ActivationDtype) -> torch.Tensor:
    """The 16-bit tensor behind a stored array (no copy)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.int16).view(torch.bfloat16) if activation_dtype == "bfloat16" else t


def create_arrays(group: zarr.Group, attrs: dict[str, Any]) -> None:
    """(Re)create every array of a fresh store, sized for attrs['rows_total'] rows."""
    N, L, M = attrs["rows_total"], attrs["n_layers"], attrs["d_model"]
    shard, chunk = attrs["shard_rows"], attrs["chunk_rows"]
    n_shards = math.ceil(N / shard)
    # write_empty_chunks: a shard of zeros (doc 0 throughout, say) must still be an object,
    # or the missing-shard check could not tell it from a lost one.
    cfg = {"write_empty_chunks": True}
    # unwritten rows read as NaN
    nan16 = 0xFFFF if attrs["activation_dtype"] == "bfloat16" else float("nan")
    for name in ACTIVATIONS:
        group.create_array(
            name, shape=(N, L, M), dtype=stored_dtype(attrs["activation_dtype"]), chunks=(shard, L, M),
            serializer=activation_codecs((chunk, L, M)), compressors=None, fill_value=nan16, config=cfg,
            overwrite=True,
        )  # fmt: skip
    for name, dtype in ROW_ARRAYS.items():
        group.create_array(
            name, shape=(N,), dtype=dtype, chunks=(shard,), compressors=[ZstdCodec(level=3, checksum=True)],
            fill_value=-1, config=cfg, overwrite=True,
        )  # fmt: skip
    stats = group.require_group("stats")
    for name, shape in (("shard_sum", (n_shards, 2, L, M)), ("shard_sumsq", (n_shards, 2, L))):
        stats.create_array(
            name, shape=shape, dtype="float64", chunks=(1, *shape[1:]), config=cfg, overwrite=True
        )


# ----------------------------------------------------------------------------- reading shards


def activation_codecs(chunk_shape: tuple[int, ...]) -> ShardingCodec:
    """How `create_arrays` stores an activation array: sharded, raw little-endian chunks + crc32c."""
    checked = (BytesCodec(endian="little"), Crc32cCodec())
    return ShardingCodec(chunk_shape=chunk_shape, codecs=checked, index_codecs=checked)


class BufferPool:
    """Byte buffers reused from one shard read to the next.

    A fresh allocation of a shard's size costs a page fault per 4 KiB on every read (about
    a third of a page-cache read); a buffer handed back is filled again instead.
    """

    def __init__(self, keep: int):
        self.keep, self.free, self.lock = keep, [], threading.Lock()

    def take(self, size: int) -> np.ndarray:
        with self.lock:
            for i, buf in enumerate(self.free):
                if len(buf) >= size:
                    return self.free.pop(i)
        return np.empty(size, dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        with self.lock:
            if len(self.free) < self.keep:
                self.free.append(buf)


class ShardRows(NamedTuple):
    """A shard's rows as consecutive views [n, L, M] (its inner chunks, in row order)."""

    chunks: list[np.ndarray]
    buffer: np.ndarray | None  # the pooled bytes they view: given back once copied out


def read_shard(arr: zarr.Array, k: int, rows: int) -> np.ndarray:
    """The first `rows` rows of shard k of a sharded [N, L, M] array, as one array."""
    return np.concatenate(read_shard_rows(arr, k, rows).chunks)


def read_shard_rows(
    arr: zarr.Array, k: int, rows: int, buffers: BufferPool | None = None
) -> ShardRows:
    """The first `rows` rows of shard k of a sharded [N, L, M] array, whole shard read once.

    For the layout `create_arrays` writes, the shard object is parsed here (index at its
    end, crc32c on the index and on every inner chunk; the zarr v3 sharding spec) and the
    rows are views of the bytes read: one read (into a pooled buffer on a local disk), no
    copy. zarr-python, zarrs and tensorstore decode the same shard several times slower
    (benchmarks/bench_harvest.py). Any other layout goes through zarr. Raises ValueError
    naming what is wrong with a torn or corrupt shard.
    """
    shard_rows = arr.shards[0]
    if arr.metadata.codecs != (activation_codecs(arr.chunks),):
        return ShardRows([arr[k * shard_rows : k * shard_rows + rows]], None)
    key = f"{arr.store_path.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"
    raw, buffer = _read_object(arr.store_path.store, key, buffers)
    try:
        return ShardRows(_parse_shard(raw, key, arr, rows), buffer)
    except BaseException:
        if buffer is not None:
            buffers.give(buffer)
        raise


def _read_object(
    store, key: str, buffers: BufferPool | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """An object's bytes (uint8) and the pooled buffer holding them (None: not pooled)."""
    if isinstance(store, LocalStore) and buffers is not None:
        try:
            f = open(store.root / key, "rb", buffering=0)  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise ValueError(f"object {key!r} does not exist") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            buffer = buffers.take(size)
            view, done = memoryview(buffer), 0
            while done < size and (n := f.readinto(view[done:size])):
                done += n
        return buffer[:done], buffer
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        raise ValueError(f"object {key!r} does not exist")
    return buf.as_numpy_array(), None


def _parse_shard(raw: np.ndarray, key: str, arr: zarr.Array, rows: int) -> list[np.ndarray]:
    shard_rows, chunk_rows = arr.shards[0], arr.chunks[0]
    n_chunks = shard_rows // chunk_rows
    index_bytes = 16 * n_chunks + 4
    if len(raw) < index_bytes or not _crc_ok(raw[-index_bytes:]):
        raise ValueError(f"object {key!r} ({len(raw)} bytes) has a torn or corrupt shard index")
    index = raw[-index_bytes:-4].view("<u8").reshape(n_chunks, 2)  # (offset, nbytes) per chunk
    inner = arr.chunks[1:]
    chunk_bytes = chunk_rows * math.prod(inner) * arr.dtype.itemsize + 4
    chunks = []
    for i in range(math.ceil(rows / chunk_rows)):
        offset, nbytes = (int(v) for v in index[i])
        if (
            nbytes != chunk_bytes
            or offset + nbytes > len(raw) - index_bytes
            or not _crc_ok(raw[offset : offset + nbytes])
        ):
            raise ValueError(f"object {key!r}: inner chunk {i} is missing, torn or corrupt")
        n = min(chunk_rows, rows - i * chunk_rows)
        data = raw[offset : offset + nbytes - 4].view(arr.dtype.newbyteorder("<"))
        chunks.append(data.reshape(chunk_rows, *inner)[:n])
    return chunks


def _crc_ok(block: np.ndarray) -> bool:
    """A block of bytes ending in the little-endian crc32c of the bytes before it."""
    return google_crc32c.value(block[:-4]) == int.from_bytes(block[-4:].tobytes(), "little")


# ----------------------------------------------------------------------------- statistics


def shard_sums(
    inputs: np.ndarray, targets: np.ndarray, activation_dtype: ActivationDtype
) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer sum [2, L, M] and summed squared norm [2, L] over one shard's stored rows (R, L, M).

    Accumulated in float64; the squares of 16-bit values are exact in float32.
    """
    sums, sumsq = [], []
    for stored in (inputs, targets):
        x = stored_as_float32(stored, activation_dtype)  # R,L,M
        sums.append(x.sum(0, dtype=np.float64))  # L,M
        sumsq.append(np.square(x).sum((0, 2), dtype=np.float64))  # L
    return np.stack(sums), np.stack(sumsq)


def reduce_stats(sum_: np.ndarray, sumsq: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
    """mean [L, M] and scale [L] per array from summed shards (sum_ [S, 2, L, M], sumsq [S, 2, L]).

    scale = sqrt(mean squared norm of the centred activation / M), so (x - mean) / scale has
    mean squared entry ≈ 1.
    """
    total, total_sq = sum_.sum(0), sumsq.sum(0)  # 2,L,M and 2,L
    mean = total / n_rows
    centred_sq = np.maximum(total_sq / n_rows - (mean**2).sum(-1), 0.0)  # 2,L
    scale = np.sqrt(centred_sq / mean.shape[-1])
    # a dead layer: leave it unscaled rather than divide by 0
    scale = np.where(scale > 0, scale, 1.0)
    out = {}
    for i, name in enumerate(ACTIVATIONS):
        out[f"{name}_mean"] = mean[i].astype(np.float32)
        out[f"{name}_scale"] = scale[i].astype(np.float32)
    return out


def read_stats(group: zarr.Group) -> dict[str, torch.Tensor]:
    """The four normalisation arrays; for an incomplete store, from the shards written so far."""
    stats = group["stats"]
    if group.attrs.get("complete"):
        return {name: torch.from_numpy(stats[name][...]) for name in STATS}
    rows = group.attrs["rows_written"]
    if rows == 0:
        raise StoreError("the store has no rows written yet, so no statistics")
    n_shards = math.ceil(rows / group.attrs["shard_rows"])
    reduced = reduce_stats(stats["shard_sum"][:n_shards], stats["shard_sumsq"][:n_shards], rows)
    return {name: torch.from_numpy(v) for name, v in reduced.items()}


def write_stats(group: zarr.Group, stats: dict[str, np.ndarray]) -> None:
    sub = group["stats"]
    for name, value in stats.items():
        sub.create_array(name, shape=value.shape, dtype="float32", overwrite=True)[...] = value
