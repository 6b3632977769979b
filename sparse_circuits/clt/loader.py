"""Batches of (MLP input, MLP output) rows from an activation store, for CLT training.

Each rank owns the shards k with k % world_size == rank (disjoint, together all of them);
every epoch it visits its shards in a seeded random order. Reader threads read whole shards
(one object per array, checked and parsed without a copy), `prefetch` shards ahead. Rows
pass through a shuffle buffer: once it holds `shuffle_buffer_rows` rows, all of it goes out
as random batches, but for the rows short of a whole batch, which wait for the next shards.
The store's rows are already shuffled across documents at harvest, so a buffer of a few
shards is plenty, and no row is copied twice on its way out.

A batch thread gathers each batch's rows into one 16-bit array (pinned memory on CUDA) and
hands it over; the device that trains widens it to float32 (and normalises it) in one
operation. On the CPU the batch thread does that too, so it overlaps the training step.

Which rows make up batch i depends on row counts alone, never on values, so the schedule
is computed from indices: `start_batch` skips batches without reading them, and a resumed
run sees exactly the batches an uninterrupted one would have (same seed, ranks, sizes).
"""

from __future__ import annotations

import collections
import itertools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import zarr

from ..errors import StageError
from .store import (
    BufferPool,
    ShardRows,
    StoreError,
    from_stored,
    open_store,
    read_shard_rows,
    read_stats,
    rows_readable,
    shard_range,
)

__all__ = ["ActivationLoader", "open_store"]

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets [B, L, M]


class Shard(NamedTuple):
    """One shard of inputs and targets, each as consecutive row views."""

    inputs: ShardRows
    targets: ShardRows


class Drain(NamedTuple):
    """Batches leaving the shuffle buffer: pool[order[a:b]] for each (a, b); pool[order[rest:]] stays."""

    pool: np.ndarray  # global row indices in the buffer, in buffer order
    order: np.ndarray
    batches: list[tuple[int, int]]
    rest: int  # the rows that stay keep their buffer order (a batch's rows go out in it too)


class ShuffleBuffer:
    """Rows waiting to go out, as views of the shards read (no copy until a batch is gathered).

    Segments are consecutive row views [n, L, M] (inputs and targets alike); buffer position
    p is row p of the segments laid end to end.
    """

    def __init__(self, buffers: BufferPool):
        self.buffers = buffers
        self._empty()

    def _empty(self) -> None:
        self.segments: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
        self.starts = [0]  # position of each segment's first row, then the end
        self.held: list[np.ndarray] = []  # pooled buffers the segments view

    @property
    def n(self) -> int:
        return self.starts[-1]

    def add(self, shard: Shard) -> None:
        for segs, rows in zip(self.segments, shard, strict=True):
            segs.extend(rows.chunks)
        self.starts.extend((self.n + np.cumsum([len(c) for c in shard.inputs.chunks])).tolist())
        self.held.extend(rows.buffer for rows in shard if rows.buffer is not None)

    def add_rows(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        self.add(Shard(ShardRows([inputs], None), ShardRows([targets], None)))

    def release(self) -> None:
        """Empty the buffer; the shards' buffers go back to the pool."""
        for buf in self.held:
            self.buffers.give(buf)
        self._empty()

    def gather(self, positions: np.ndarray, out: tuple[np.ndarray, np.ndarray]) -> None:
        """Rows at `positions` into out [len, L, M] each, in position order (one copy)."""
        positions = np.sort(positions)
        starts = np.asarray(self.starts)
        cuts = np.searchsorted(positions, starts)  # where each segment's rows begin
        for s in np.flatnonzero(cuts[1:] > cuts[:-1]):
            a, b = cuts[s], cuts[s + 1]
            local = positions[a:b] - starts[s]
            for segs, dst in zip(self.segments, out, strict=True):
                np.take(segs[s], local, axis=0, out=dst[a:b], mode="clip")  # clip: unbuffered

    def drain(
        self, drain: Drain, out: Callable[[int], tuple[np.ndarray, np.ndarray]]
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Gather each of the drain's batches into out(size); then keep only the rows that stay."""
        assert len(drain.order) == self.n, "the buffer and the schedule disagree"
        for a, b in drain.batches:
            dst = out(b - a)
            self.gather(drain.order[a:b], dst)
            yield dst
        rest = drain.order[drain.rest :]
        kept = None
        if len(rest):  # fewer than a batch of rows: copied, so the shards' buffers can go
            dtype = self.segments[0][0].dtype
            shape = (len(rest), *self.segments[0][0].shape[1:])
            kept = (np.empty(shape, dtype), np.empty(shape, dtype))
            self.gather(rest, kept)
        self.release()
        if kept is not None:
            self.add_rows(*kept)


class ShardReads:
    """This rank's shards read in order by a pool of threads, `ahead` of the one asked for."""

    def __init__(
        self, read: Callable[[int], Shard], shards: Iterator[int], threads: int, ahead: int
    ):
        self.read, self.shards, self.ahead = read, shards, ahead
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="activation-reader")
        self.pending: collections.deque[Future] = collections.deque()
        self._fill()

    def _fill(self) -> None:
        while len(self.pending) < self.ahead:
            k = next(self.shards, None)
            if k is None:
                return
            self.pending.append(self.pool.submit(self.read, k))

    def next(self) -> Shard:
        shard = self.pending.popleft().result()  # re-raises the reader's error here
        self._fill()
        return shard

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


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
        prefetch: int = 4,
        readers: int = 4,
        storage_options: dict | None = None,
        normalize: bool = False,
        epochs: int | None = 1,
        allow_incomplete: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        start_batch: int = 0,
    ):
        """rank/world_size: default from torch.distributed when it is initialised, else 0/1.
        prefetch: shards read ahead; readers: threads reading them (on S3, requests in flight).
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
        if readers <= 0 or prefetch <= 0:
            raise StageError(f"readers and prefetch must be positive, got {readers} and {prefetch}")
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
        self.prefetch, self.readers = prefetch, readers
        self.normalize, self.drop_last = normalize, drop_last
        self.device = torch.device(device)
        # (x - mean) / scale as one multiply-add: x * inv + bias, on the device
        self._scale = {}
        for name in ("inputs", "targets"):
            inv = 1 / self.stats[f"{name}_scale"][:, None]  # L,1
            bias = -self.stats[f"{name}_mean"] * inv  # L,M
            self._scale[name] = (inv.to(self.device), bias.to(self.device))
        # every shard in flight, plus the buffer's, can reuse a buffer read before
        buffer_shards = math.ceil(self.shuffle_buffer_rows / self.shard_rows) + 1
        self.buffers = BufferPool(keep=2 * (prefetch + buffer_shards))

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
                drain = self._drain(pool, rng, end_of_epoch)
                yield drain
                pool = pool[np.sort(drain.order[drain.rest :])]  # kept in buffer order

    def _drain(self, pool: np.ndarray, rng: np.random.Generator, end_of_epoch: bool) -> Drain:
        """Random whole batches of the buffer; at an epoch's end also the last, smaller one
        (unless drop_last), else the rows short of a batch stay for the next drain."""
        B = self.batch_size
        order = rng.permutation(len(pool))
        n_out = len(pool) if end_of_epoch and not self.drop_last else len(pool) - len(pool) % B
        batches = [(i, min(i + B, n_out)) for i in range(0, n_out, B)]
        return Drain(pool, order, batches, len(pool) if end_of_epoch else n_out)

    # --- reading (reader threads)

    def read_shard(self, k: int) -> Shard:
        """Shard k of inputs and targets as stored 16-bit rows."""
        a, b = shard_range(k, self.shard_rows, self.n_rows)
        out = []
        for name, arr in self.arrays.items():
            try:
                out.append(read_shard_rows(arr, k, b - a, self.buffers))
            # zarr, the store and the codecs raise many types for a torn or corrupt object
            except Exception as e:
                for rows in out:  # the other array's buffer goes back
                    if rows.buffer is not None:
                        self.buffers.give(rows.buffer)
                key = f"{name}/" + arr.metadata.encode_chunk_key((k, 0, 0))
                raise StoreError(
                    f"{self.url}: array {name!r} shard {k} (object {key!r}, rows {a}-{b}) is unreadable: {e}"
                ) from e
        return Shard(out[0], out[1])

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Arbitrary rows (global indices), each shard they touch read whole once."""
        shard_of = rows // self.shard_rows
        inputs = np.empty(
            (len(rows), self.n_layers, self.d_model), dtype=self.arrays["inputs"].dtype
        )
        targets = np.empty_like(inputs)
        for k in np.unique(shard_of):
            where = np.flatnonzero(shard_of == k)
            offsets = rows[where] - k * self.shard_rows
            shard = ShuffleBuffer(self.buffers)
            shard.add(self.read_shard(int(k)))
            got = (np.empty_like(inputs[: len(where)]), np.empty_like(targets[: len(where)]))
            order = np.argsort(offsets, kind="stable")
            shard.gather(offsets[order], got)  # in offset order: put back in row order
            inputs[where[order]], targets[where[order]] = got
            shard.release()
        return inputs, targets

    # --- batching (the batch thread)

    def _batches(self, out: queue.Queue, stop: threading.Event, pinned: bool, widen: bool) -> None:
        """Every batch of the schedule into `out`, 16-bit (or widened on the CPU); then None."""

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        shape = (self.n_layers, self.d_model)
        dtype = self.arrays["inputs"].dtype
        bits = torch.bfloat16 if self.activation_dtype == "bfloat16" else torch.float16
        scratch: list[np.ndarray] = []
        pinned_batch: list[torch.Tensor] = []

        def arrays(n: int) -> tuple[np.ndarray, np.ndarray]:
            if widen:  # widened right away: one pair of 16-bit arrays serves every batch
                if not scratch or len(scratch[0]) < n:
                    scratch[:] = [np.empty((n, *shape), dtype) for _ in range(2)]
                return scratch[0][:n], scratch[1][:n]
            if pinned:
                pinned_batch[:] = [
                    torch.empty((n, *shape), dtype=torch.int16, pin_memory=True) for _ in range(2)
                ]
                return pinned_batch[0].numpy().view(dtype), pinned_batch[1].numpy().view(dtype)
            return np.empty((n, *shape), dtype), np.empty((n, *shape), dtype)

        def emit(pool: ShuffleBuffer, drain: Drain) -> bool:
            for x, y in pool.drain(drain, arrays):
                if pinned:  # the pinned tensors themselves: torch's pinned allocator then holds
                    # their memory until the copy to the GPU is done (a view through numpy would not)
                    batch = (pinned_batch[0].view(bits), pinned_batch[1].view(bits))
                else:
                    batch = (
                        from_stored(x, self.activation_dtype),
                        from_stored(y, self.activation_dtype),
                    )
                if not put(self.widen(*batch) if widen else batch):
                    return False
            return True

        if widen:  # a setting of this thread only: no second OpenMP team beside the training's
            torch.set_num_threads(1)
        reads = None
        try:
            events = self.schedule()
            pool = ShuffleBuffer(self.buffers)
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
                        pool.add_rows(*self.read_rows(event.pool))
                        rest = event._replace(batches=event.batches[self.start_batch - skipped :])
                        if not emit(pool, rest):
                            return
                        break
                else:
                    put(None)  # start_batch lies past the end
                    return
            shards = itertools.islice(self.shard_sequence(), shards_seen, None)
            reads = ShardReads(self.read_shard, shards, self.readers, self.prefetch)
            for event in events:
                if isinstance(event, Drain):
                    if not emit(pool, event):
                        return
                else:
                    pool.add(reads.next())
            put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)
        finally:
            if reads is not None:
                reads.close()

    def _stream(self, pinned: bool = False, widen: bool = False) -> Iterator[Batch]:
        batches: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._batches, args=(batches, stop, pinned, widen), daemon=True,
            name="activation-batches",
        )  # fmt: skip
        worker.start()
        try:
            while (item := batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=10)

    def stored_batches(self) -> Iterator[Batch]:
        """The same batches as iterating, as the store holds them: 16-bit tensors on the CPU
        (bfloat16 or float16), neither widened nor normalised."""
        return self._stream()

    def widen(self, inputs: torch.Tensor, targets: torch.Tensor) -> Batch:
        """16-bit batches as float32 on their device, normalised if asked: one pass each."""
        out = []
        for name, x in (("inputs", inputs), ("targets", targets)):
            if x.device.type == "cpu":
                # numpy's allocation: the allocator reuses freed memory, where a fresh torch
                # CPU tensor this size page-faults on every page (about twice the widening)
                y = torch.from_numpy(np.empty(x.shape, np.float32))
            else:
                y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            if self.normalize:
                inv, bias = self._scale[name]
                out.append(torch.addcmul(bias, x, inv, out=y))  # B,L,M
            else:
                out.append(y.copy_(x))
        return out[0], out[1]

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == "cpu":  # the batch thread widens: overlaps the training step
            yield from self._stream(widen=True)
            return
        # 16 bits over the bus, from pinned memory; widened on the device
        for inputs, targets in self._stream(pinned=self.device.type == "cuda"):
            yield self.widen(
                inputs.to(self.device, non_blocking=True),
                targets.to(self.device, non_blocking=True),
            )
