"""Batches of (MLP input, MLP output) rows from an activation store, for CLT training.

Each rank owns the shards k with k % world_size == rank (disjoint, together all of them);
every epoch it visits its shards in a seeded random order, reading each whole (one
contiguous object per array) on a background thread, `prefetch` shards ahead. Rows pass
through a shuffle buffer: once it holds `shuffle_buffer_rows` rows, a random half of it
goes out as batches and the rest waits to be mixed with the next shards. The store's rows
are already shuffled across documents, so a buffer of a few shards is plenty.

Which rows make up batch i depends on row counts alone, never on values, so the schedule
is computed from indices: `start_batch` skips batches without reading them, and a resumed
run sees exactly the batches an uninterrupted one would have (same seed, ranks, sizes).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import zarr

from ..errors import StageError
from .store import (
    StoreError,
    from_stored,
    open_store,
    read_shard,
    read_stats,
    rows_readable,
    shard_range,
    stored_as_float32,
)

__all__ = ["ActivationLoader", "open_store"]

Rows = tuple[np.ndarray, np.ndarray]  # stored 16-bit inputs, targets [R, L, M]


class Drain(NamedTuple):
    """Batches leaving the shuffle buffer: pool[order[a:b]] for each (a, b); pool[order[rest:]] stays."""

    pool: np.ndarray  # global row indices in the buffer, in buffer order
    order: np.ndarray
    batches: list[tuple[int, int]]
    rest: int


class ShuffleBuffer:
    """Rows waiting to go out, in arrays allocated once and reused drain after drain."""

    def __init__(
        self, capacity: int, keep_capacity: int, row_shape: tuple[int, ...], dtype: np.dtype
    ):
        self.rows = [np.empty((capacity, *row_shape), dtype) for _ in range(2)]  # inputs, targets
        self.spare = [np.empty((keep_capacity, *row_shape), dtype) for _ in range(2)]
        self.n = 0

    def add(self, rows: Rows) -> None:
        k = len(rows[0])
        for buf, new in zip(self.rows, rows, strict=True):
            buf[self.n : self.n + k] = new
        self.n += k

    def drain(self, drain: Drain) -> Iterator[Rows]:
        """The drain's batches, gathered from the buffer; then the kept rows move to its front."""
        assert len(drain.order) == self.n, "the buffer and the schedule disagree"
        for a, b in drain.batches:
            idx = drain.order[a:b]
            yield self.rows[0].take(idx, axis=0), self.rows[1].take(idx, axis=0)
        rest = drain.order[drain.rest :]
        for buf, spare in zip(self.rows, self.spare, strict=True):
            buf.take(rest, axis=0, out=spare[: len(rest)])
            buf[: len(rest)] = spare[: len(rest)]
        self.n = len(rest)


class ActivationLoader:
    """Iterate (inputs, targets), each [B, L, M] float32, over this rank's rows of a store."""

    def __init__(
        self,
        url: str,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer_rows: int = 8192,
        prefetch: int = 2,
        storage_options: dict | None = None,
        normalize: bool = False,
        epochs: int | None = 1,
        allow_incomplete: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        start_batch: int = 0,
    ):
        """rank/world_size: default from torch.distributed when it is initialised, else 0/1.
        epochs: None repeats forever. drop_last: leave out each epoch's last, smaller batch.
        device: where batches are made float32 (16-bit rows travel there first).
        start_batch: begin at this batch of the whole (multi-epoch) stream, unread before it.
        """
        if batch_size <= 0:
            raise StageError(f"batch_size must be positive, got {batch_size}")
        if epochs is not None and epochs <= 0:
            raise StageError(f"epochs must be positive or None, got {epochs}")
        if start_batch < 0:
            raise StageError(f"start_batch must be >= 0, got {start_batch}")
        self.url = url
        self.group: zarr.Group = open_store(url, storage_options, allow_incomplete=allow_incomplete)
        attrs = self.group.attrs
        self.n_rows: int = rows_readable(self.group)
        self.n_layers: int = attrs["n_layers"]
        self.d_model: int = attrs["d_model"]
        self.activation_dtype: str = attrs["activation_dtype"]
        self.shard_rows: int = attrs["shard_rows"]
        self.stats: dict[str, torch.Tensor] = read_stats(self.group)
        # opened once: each group[name] is a metadata read, a request on S3
        self.arrays = {name: self.group[name] for name in ("inputs", "targets")}
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if dist else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise StageError(f"rank {rank} is outside world_size {world_size}")
        n_shards = math.ceil(self.n_rows / self.shard_rows)
        if world_size > n_shards:
            raise StageError(
                f"{url} has {n_shards} shards, fewer than world_size {world_size}: some ranks would get "
                "no rows; harvest with smaller --shard-rows"
            )
        self.rank, self.world_size = rank, world_size
        self.shards = list(range(rank, n_shards, world_size))
        self.rank_rows = sum(
            b - a for a, b in (shard_range(k, self.shard_rows, self.n_rows) for k in self.shards)
        )
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.start_batch = start_batch
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, 2 * batch_size)
        self.prefetch = max(1, prefetch)
        self.normalize, self.drop_last = normalize, drop_last
        self.device = torch.device(device)
        self._norm = {k: v.to(self.device) for k, v in self.stats.items()}

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        full, rest = divmod(self.rank_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # --- the schedule: indices only

    def shard_sequence(self) -> Iterator[int]:
        """This rank's shards in reading order, epoch after epoch."""
        epochs = itertools.count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            yield from (
                self.shards[i]
                for i in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            )

    def schedule(self) -> Iterator[int | Drain]:
        """A shard id when shard k joins the buffer; a Drain when batches leave it."""
        rng = np.random.default_rng([self.seed, self.rank, 1])
        pool = np.empty(0, dtype=np.int64)
        per_epoch = len(self.shards)
        for i, k in enumerate(self.shard_sequence()):
            yield k
            a, b = shard_range(k, self.shard_rows, self.n_rows)
            pool = np.concatenate([pool, np.arange(a, b)])
            end_of_epoch = (i + 1) % per_epoch == 0
            if end_of_epoch or len(pool) >= self.shuffle_buffer_rows:
                drain = self._drain(
                    pool, rng, keep=0 if end_of_epoch else self.shuffle_buffer_rows // 2
                )
                yield drain
                pool = pool[drain.order[drain.rest :]]

    def _drain(self, pool: np.ndarray, rng: np.random.Generator, keep: int) -> Drain:
        """Random batches until at most `keep` rows are left (keep=0: all, the last one smaller)."""
        B = self.batch_size
        order = rng.permutation(len(pool))
        n_out = len(pool) - keep
        if keep or self.drop_last:
            n_out -= n_out % B
        batches = [(i, min(i + B, n_out)) for i in range(0, n_out, B)]
        return Drain(pool, order, batches, len(pool) if not keep else n_out)

    # --- reading (background thread)

    def read_shard(self, k: int) -> Rows:
        """Shard k of inputs and targets as stored 16-bit arrays [R, L, M]."""
        a, b = shard_range(k, self.shard_rows, self.n_rows)
        out = []
        for name, arr in self.arrays.items():
            try:
                out.append(read_shard(arr, k, b - a))
            # zarr, the store and the codecs raise many types for a torn or corrupt object
            except Exception as e:
                key = f"{name}/" + arr.metadata.encode_chunk_key((k, 0, 0))
                raise StoreError(
                    f"{self.url}: array {name!r} shard {k} (object {key!r}, rows {a}-{b}) is unreadable: {e}"
                ) from e
        return out[0], out[1]

    def read_rows(self, rows: np.ndarray) -> Rows:
        """Arbitrary rows (global indices), each shard they touch read whole once."""
        shard_of = rows // self.shard_rows
        inputs = np.empty(
            (len(rows), self.n_layers, self.d_model), dtype=self.arrays["inputs"].dtype
        )
        targets = np.empty_like(inputs)
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            offsets = rows[where] - k * self.shard_rows
            x, y = self.read_shard(int(k))
            inputs[where], targets[where] = x[offsets], y[offsets]
        return inputs, targets

    def _read(self, shards: Iterator[int], out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for k in shards:
                if not put(self.read_shard(k)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    # --- batching (caller's thread)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        events = self.schedule()
        pool = ShuffleBuffer(
            self.shuffle_buffer_rows + self.shard_rows,  # below the threshold, plus one shard
            self.shuffle_buffer_rows // 2 + self.batch_size,  # what a drain keeps, at most
            (self.n_layers, self.d_model),
            self.arrays["inputs"].dtype,
        )
        shards_seen = 0
        if self.start_batch:
            # Walk the schedule to the drain that holds batch start_batch, reading nothing; the
            # buffer at that drain holds rows of shards already passed, read now.
            skipped = 0
            for event in events:
                if not isinstance(event, Drain):
                    shards_seen += 1
                elif skipped + len(event.batches) <= self.start_batch:
                    skipped += len(event.batches)
                else:
                    pool.add(self.read_rows(event.pool))
                    yield from self._emit(
                        pool, event._replace(batches=event.batches[self.start_batch - skipped :])
                    )
                    break
            else:
                return  # start_batch lies past the end
        reads: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        shards = itertools.islice(self.shard_sequence(), shards_seen, None)
        reader = threading.Thread(
            target=self._read, args=(shards, reads, stop), daemon=True, name="activation-reader"
        )
        reader.start()
        try:
            for event in events:
                if isinstance(event, Drain):
                    yield from self._emit(pool, event)
                    continue
                item = reads.get()
                if isinstance(item, BaseException):
                    raise item
                pool.add(item)
        finally:
            stop.set()
            reader.join(timeout=10)

    def _emit(
        self, pool: ShuffleBuffer, drain: Drain
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for inputs, targets in pool.drain(drain):
            yield self._to_torch(inputs, targets)

    def _to_torch(
        self, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for name, rows in (("inputs", inputs), ("targets", targets)):
            if self.device.type == "cpu":
                x = torch.from_numpy(stored_as_float32(rows, self.activation_dtype))  # B,L,M
            else:  # 16 bits over the bus, widened on the device
                x = from_stored(rows, self.activation_dtype).to(self.device, non_blocking=True)
                x = x.float()
            if self.normalize:  # in place: x is this batch's own fresh tensor
                x = x.sub_(self._norm[f"{name}_mean"]).div_(self._norm[f"{name}_scale"][:, None])
            out.append(x)
        return out[0], out[1]
