"""`harvest`: run a model over token data and record every layer's MLP input and output.

The rows (one per token) go into the activation store of `store.py`, pre-shuffled:
sequences are visited in a seeded order, and each block of `shuffle_shards` shards is
permuted with a generator keyed by (seed, block) before its shards are written whole. The
rows of shard k are therefore a pure function of (model, data, config, k), so a killed harvest
resumes at the first shard not yet recorded in `rows_written` and rewrites nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import zarr
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import DEVICE_HELP, Device, resolve_device
from ..errors import MissingInputError, StageError
from ..io import acquire_lock, read_json
from ..progress import progress_bar
from ..sparse_attention.data import DATA_FILE, DataSpec, load_token_data
from ..sparse_attention.hooks import capture, stop_after
from ..sparse_attention.model import Transformer
from ..sparse_attention.modeldir import load_model, model_sha256
from .store import (
    ACTIVATIONS,
    FORMAT,
    FORMAT_VERSION,
    HOOKS,
    IDENTITY_KEYS,
    ROW_ARRAYS,
    StoreError,
    create_arrays,
    default_layout,
    from_stored,
    generator,
    is_remote,
    open_group_or_none,
    reduce_stats,
    shard_range,
    shard_sums,
    store_keys,
    stored_dtype,
    write_stats,
    zarr_store,
)

log = logging.getLogger(__name__)


class DataSource(BaseModel):
    """Where token sequences come from: at most one of these; none, the model's own data."""

    model_config = ConfigDict(extra="forbid")
    data: DataSpec | None = Field(
        None, description="Data spec (through --config); default: the model's own data.json."
    )
    corpus: list[str] | None = Field(
        None,
        description="Text files, folders or globs, tokenised with the model's tokenizer.json and packed.",
    )
    tokens_file: Path | None = Field(
        None,
        description="A .npy or .pt integer array of token ids [n_seq, T], used whole (no split).",
    )

    @model_validator(mode="after")
    def _one_data_source(self) -> DataSource:
        given = [n for n in ("data", "corpus", "tokens_file") if getattr(self, n) is not None]
        if len(given) > 1:
            raise StageError(f"give at most one data source; got {', '.join(given)}")
        return self


class StoreAccess(BaseModel):
    """How to reach a remote activation store."""

    model_config = ConfigDict(extra="forbid")
    endpoint_url: str | None = Field(
        None, description="S3 endpoint for an s3:// store (MinIO, a local server...)."
    )
    storage_options: dict | None = Field(
        None,
        description="fsspec options for a remote store (credentials...); never saved with the store.",
    )

    def fsspec_options(self) -> dict:
        opts = dict(self.storage_options or {})
        if self.endpoint_url is not None:
            opts["endpoint_url"] = self.endpoint_url
        return opts


class HarvestConfig(DataSource, StoreAccess):
    """`harvest`: record MLP inputs and outputs into a zarr activation store."""

    model: Path = Field(description="Model directory (dense or sparsified; gates run as saved).")
    out: str = Field(description="Store location: a local path or s3://bucket/prefix.")
    tokens: int | None = Field(
        None, gt=0, description="Rows (tokens) to record; default: every token of the data."
    )
    batch_size: int = Field(32, gt=0, description="Sequences per forward pass.")
    context_length: int | None = Field(
        None,
        gt=0,
        description="Tokens per sequence; default: the model's data context (at most the model's).",
    )
    include_bos: bool = Field(
        False, description="Keep rows at BOS tokens (attention-sink outliers; left out by default)."
    )
    dtype: Literal["float16", "bfloat16"] = Field(
        "bfloat16", description="Stored activation dtype."
    )
    shard_rows: int | None = Field(
        None, gt=0, description="Rows per shard; default: ≈64 MiB per array shard."
    )
    shuffle_shards: int = Field(
        4, gt=0, description="Shards whose rows are permuted together (the write buffer)."
    )
    seed: int = Field(0, description="Seeds the sequence order and the row shuffle.")
    device: Device = Field("auto", description=DEVICE_HELP)


class StoreURL(str):
    """Where the store was written (what the CLI prints), carrying the run's metrics."""

    metrics: dict

    def __new__(cls, url: str, metrics: dict) -> StoreURL:
        obj = super().__new__(cls, url)
        obj.metrics = metrics
        return obj


# ----------------------------------------------------------------------------- inputs


def load_sequences(config: HarvestConfig, model: Transformer) -> torch.Tensor:
    """Token ids [n_seq, T] to harvest."""
    if config.tokens_file is None:
        spec = config.data or (
            DataSpec(corpus=config.corpus) if config.corpus is not None else None
        )
        if (
            spec is not None
            and spec.corpus is not None
            and spec.context_length is None
            and config.context_length is None
        ):
            spec = spec.model_copy(update={"context_length": own_data_context(config.model, model)})
        return load_token_data(config.model, spec, config.context_length).train_inputs
    seqs = read_tokens_file(config.tokens_file)
    T = config.context_length or min(seqs.shape[1], model.cfg.context_length)
    if T > model.cfg.context_length:
        raise StageError(
            f"context length {T} is longer than the model's {model.cfg.context_length}"
        )
    if seqs.shape[1] < T:
        raise StageError(
            f"{config.tokens_file}: sequences of {seqs.shape[1]} tokens are shorter than the context length {T}"
        )
    per_row = seqs.shape[1] // T  # cut longer rows into whole contexts
    return seqs[:, : per_row * T].reshape(-1, T)


def read_tokens_file(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise MissingInputError(f"tokens file {path} does not exist")
    if path.suffix not in (".npy", ".pt"):
        raise StageError(f"tokens file {path} must be .npy or .pt")
    try:
        if path.suffix == ".npy":
            seqs = torch.from_numpy(np.load(path, allow_pickle=False))
        else:  # tensors only: a pickled object is refused, never run
            seqs = torch.load(path, weights_only=True)
    except Exception as e:  # numpy and torch raise many types for pickles and torn files
        detail = " ".join(str(e).split())[:200]
        raise StageError(f"tokens file {path} holds no plain integer array: {detail}") from None
    if (
        not isinstance(seqs, torch.Tensor)
        or seqs.ndim != 2
        or seqs.dtype.is_floating_point
        or seqs.dtype == torch.bool
    ):
        raise StageError(f"tokens file {path} must hold one integer array [n_seq, T]")
    return seqs.long()


def own_data_context(model_dir: Path, model: Transformer) -> int:
    """The context length the model was trained on (its data.json), else its maximum."""
    spec = model_dir / DATA_FILE
    recorded = read_json(spec).get("context_length") if spec.is_file() else None
    return recorded or model.cfg.context_length


# ----------------------------------------------------------------------------- the row plan


class RowPlan:
    """Which (sequence, position) each store row holds.

    Rows run through the sequences in a seeded order (each sequence's kept positions in
    order); block b is rows [b*R, (b+1)*R) of that stream, permuted with a generator
    keyed by (seed, b). A block can be rebuilt on its own, which is what resuming needs.
    """

    def __init__(self, keep: torch.Tensor, rows_total: int, block_rows: int, seed: int):
        self.keep, self.rows_total, self.block_rows, self.seed = keep, rows_total, block_rows, seed
        self.order = torch.from_numpy(np.random.default_rng([seed, 0]).permutation(keep.shape[0]))
        counts = keep[self.order].sum(1).numpy()
        self.cum = np.concatenate([[0], np.cumsum(counts)])  # rows before the i-th visited sequence

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.rows_total / self.block_rows)

    def block(self, b: int) -> tuple[int, int, torch.Tensor, int]:
        """(first row, end row, sequence ids to run, stream rows to skip in the first of them)."""
        r0, r1 = b * self.block_rows, min((b + 1) * self.block_rows, self.rows_total)
        i0 = int(np.searchsorted(self.cum, r0, side="right")) - 1
        i1 = int(np.searchsorted(self.cum, r1, side="left"))
        return r0, r1, self.order[i0:i1], r0 - int(self.cum[i0])

    def permutation(self, b: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, b]).permutation(n)


# ----------------------------------------------------------------------------- the store


def open_or_create(url: str, options: dict, attrs: dict) -> zarr.Group:
    """This run's store: created fresh, or an unfinished one of the same harvest to resume.

    A store of another model, data, hooks or layout is refused and left untouched.
    """
    store = zarr_store(url, options, read_only=False)
    group = open_group_or_none(store)
    if group is None:
        if store_keys(store):
            raise StoreError(
                f"{url} is not empty and holds no activation store; choose a new --out"
            )
        group = zarr.create_group(
            store, attributes={**attrs, "rows_written": 0, "complete": False}, zarr_format=3
        )
        create_arrays(group, attrs)
        return group
    old = group.attrs.asdict()
    if old.get("format") != FORMAT:
        raise StoreError(
            f"{url} holds a zarr group that is not an activation store; choose a new --out"
        )
    differ = [k for k in IDENTITY_KEYS if old.get(k) != attrs[k]]
    if differ:
        what = "; ".join(
            f"{k}: store has {_short(old.get(k))}, this run {_short(attrs[k])}" for k in differ
        )
        raise StoreError(
            f"{url} holds activations of another harvest ({what}); it is left as it is: choose a new --out or delete it"
        )
    if old["rows_written"] == 0 and not old.get("complete"):
        create_arrays(group, attrs)  # a run killed while creating them: start over
    if not is_remote(url):  # temporaries of writes a kill cut short
        for partial in Path(url.removeprefix("file://")).rglob("*.partial"):
            partial.unlink(missing_ok=True)
    return group


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


class ShardWriter:
    """Writes one block's shards whole, on a background thread, then moves the resume point.

    The thread also shuffles the block into its shards, so the forward pass only computes.
    The order (arrays, statistics, then rows_written) is what makes a kill safe: a shard
    counts only once all of it is stored.
    """

    def __init__(self, group: zarr.Group, shard_rows: int, rows_total: int, dtype: str):
        self.group, self.shard_rows, self.rows_total = group, shard_rows, rows_total
        self.dtype = dtype
        # opened once: every group[name] is a metadata read, a request on S3
        self.arrays = {
            name: group[name]
            for name in (*ACTIVATIONS, *ROW_ARRAYS, "stats/shard_sum", "stats/shard_sumsq")
        }
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harvest-writer")
        self.pending: Future | None = None

    def submit(
        self, rows: dict[str, np.ndarray], order: np.ndarray, r0: int, first_shard: int
    ) -> None:
        """Store rows [r0, r0 + len(order)) from shard first_shard on: row r0 + i is rows[order[i]]."""
        self.wait()  # one block in flight: memory stays at two blocks
        self.pending = self.pool.submit(self._write_block, rows, order, r0, first_shard)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()  # re-raises a write error here
            self.pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

    def _write_block(
        self, rows: dict[str, np.ndarray], order: np.ndarray, r0: int, first_shard: int
    ) -> None:
        k = first_shard
        while k * self.shard_rows < r0 + len(order):
            a, b = shard_range(k, self.shard_rows, self.rows_total)
            take = order[a - r0 : b - r0]
            self.write_shard(k, {name: v.take(take, axis=0) for name, v in rows.items()})
            k += 1

    def write_shard(self, k: int, rows: dict[str, np.ndarray]) -> None:
        a, b = shard_range(k, self.shard_rows, self.rows_total)
        for name, value in rows.items():
            self.arrays[name][a:b] = value
        sums, sumsq = shard_sums(rows["inputs"], rows["targets"], self.dtype)
        self.arrays["stats/shard_sum"][k] = sums
        self.arrays["stats/shard_sumsq"][k] = sumsq
        self.group.attrs["rows_written"] = b


# ----------------------------------------------------------------------------- capture


@torch.inference_mode()
def run_block(
    model: Transformer,
    seqs: torch.Tensor,
    keep: torch.Tensor,
    seq_ids: torch.Tensor,
    batch_size: int,
    dtype: str,
    on_rows: Callable[[int], None],
) -> dict[str, np.ndarray]:
    """Kept rows of the given sequences, in order: inputs/targets [R, L, M] (stored dtype), tokens, doc, pos."""
    device = next(model.parameters()).device
    L, M = model.cfg.n_layers, model.cfg.d_model
    names = {kind: [hook.format(l=layer) for layer in range(L)] for kind, hook in HOOKS.items()}
    last = names["targets"][-1]
    n_rows = int(keep[seq_ids].sum())
    rows = {kind: np.empty((n_rows, L, M), stored_dtype(dtype)) for kind in HOOKS}
    rows |= {name: np.empty(n_rows, dt) for name, dt in ROW_ARRAYS.items()}
    # 16-bit views of the block's arrays: each layer's activation is cast as it is copied in
    out = {kind: from_stored(rows[kind], dtype) for kind in HOOKS}  # R,L,M
    r = 0
    for j in range(0, len(seq_ids), batch_size):
        ids = seq_ids[j : j + batch_size]
        tok = seqs[ids].to(device)  # B,T
        mask = keep[ids]  # B,T
        n = int(mask.sum())
        # the last target is the last value needed: the rest of the forward (logits) is skipped
        with (
            capture(model, [n for ns in names.values() for n in ns]) as acts,
            stop_after(model, last),
        ):
            model(tok)
        every = n == mask.numel()
        flat = mask.reshape(-1).to(device)  # B*T
        for kind, ns in names.items():
            for layer, name in enumerate(ns):
                x = acts[name].reshape(-1, M)  # B*T,M
                x = x if every else x[flat]
                if x.device.type != "cpu":  # 16 bits over the bus
                    x = x.to(out[kind].dtype)
                out[kind][r : r + n, layer].copy_(x)
        B, T = mask.shape
        rows["tokens"][r : r + n] = tok.cpu()[mask].numpy()
        rows["doc"][r : r + n] = ids[:, None].expand(B, T)[mask].numpy()
        rows["pos"][r : r + n] = torch.arange(T).expand(B, T)[mask].numpy()
        r += n
        on_rows(n)
    return rows


class BlockProgress:
    """Advances the bar by the rows of a block that go into the store, not the overlap computed around them."""

    def __init__(self, bar, skip: int, n: int):
        self.bar, self.skip, self.n, self.seen = bar, skip, n, 0

    def __call__(self, rows: int) -> None:
        before = min(max(self.seen - self.skip, 0), self.n)
        self.seen += rows
        self.bar.update(min(max(self.seen - self.skip, 0), self.n) - before)


def bos_mask(seqs: torch.Tensor, bos_token_id: int | None, include_bos: bool) -> torch.Tensor:
    """[n_seq, T] bool: the positions that become rows."""
    if include_bos or bos_token_id is None:
        return torch.ones_like(seqs, dtype=torch.bool)
    return seqs != bos_token_id


# ----------------------------------------------------------------------------- the stage


def harvest(config: HarvestConfig) -> StoreURL:
    """Record the store at config.out (resuming an unfinished one); returns its URL with metrics."""
    model, _tokenizer = load_model(config.model)
    model_hash = model_sha256(model)
    model = model.to(resolve_device(config.device)).eval()
    cfg = model.cfg
    seqs = load_sequences(config, model)
    if int(seqs.max()) >= cfg.vocab_size or int(seqs.min()) < 0:
        raise StageError(
            f"token ids must lie in [0, {cfg.vocab_size}); the data has {int(seqs.min())}..{int(seqs.max())}"
        )
    keep = bos_mask(seqs, cfg.bos_token_id, config.include_bos)
    available = int(keep.sum())
    rows_total = config.tokens or available
    if rows_total > available:
        raise StageError(
            f"asked for {rows_total} rows but the data gives {available} ({seqs.shape[0]} sequences of {seqs.shape[1]})"
        )
    shard_rows, chunk_rows = default_layout(cfg.n_layers, cfg.d_model, config.shard_rows)
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": generator(),
        "model": str(Path(config.model).resolve()),  # means the same from any directory
        "model_sha256": model_hash,
        "hooks": HOOKS,
        "context_length": int(seqs.shape[1]),
        "activation_dtype": config.dtype,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "shard_rows": shard_rows,
        "chunk_rows": chunk_rows,
        "shuffle_shards": config.shuffle_shards,
        "seed": config.seed,
        "include_bos": config.include_bos,
        "data_sha256": hashlib.sha256(seqs.numpy().astype("<i8").tobytes()).hexdigest(),
        "rows_total": rows_total,
    }
    url = config.out
    if not is_remote(url):  # one writer at a time (a lock beside the store: zarr lists its dir)
        local = Path(url.removeprefix("file://"))
        if local.exists() and not local.is_dir():
            raise StageError(f"output {local} is a file; --out names the store's directory")
        acquire_lock(local.with_name(f".{local.name}.lock"))
    group = open_or_create(url, config.fsspec_options(), attrs)
    if group.attrs.get("complete"):
        log.info("%s is already complete (%d rows)", url, rows_total)
        return StoreURL(url, group.attrs["metrics"])

    start = group.attrs["rows_written"]
    first_shard = start // shard_rows
    plan = RowPlan(keep, rows_total, shard_rows * config.shuffle_shards, config.seed)
    if start:
        log.info(
            "resuming %s at shard %d (%d of %d rows written)", url, first_shard, start, rows_total
        )
    writer = ShardWriter(group, shard_rows, rows_total, config.dtype)
    t0 = time.perf_counter()
    # all rows written (killed while finishing): nothing to recompute
    first_block = first_shard // config.shuffle_shards if start < rows_total else plan.n_blocks
    done = min(first_block * plan.block_rows, rows_total)  # rows of blocks not recomputed
    with progress_bar(
        total=rows_total, initial=done, unit="tok", unit_scale=True, desc="harvest", smoothing=0.1
    ) as progress:
        try:
            for b in range(first_block, plan.n_blocks):
                r0, r1, seq_ids, skip = plan.block(b)
                counted = BlockProgress(progress, skip, r1 - r0)
                rows = run_block(
                    model, seqs, keep, seq_ids, config.batch_size, config.dtype, counted
                )
                # block row i is computed row skip + perm[i]; shards of this block already on
                # disk (a resumed run) are not written again
                order = plan.permutation(b, r1 - r0) + skip
                first = max(b * config.shuffle_shards, first_shard)
                cut = first * shard_rows - r0
                writer.submit(rows, order[cut:], first * shard_rows, first)
        finally:
            writer.close()
    elapsed = time.perf_counter() - t0
    n_shards = math.ceil(rows_total / shard_rows)
    write_stats(
        group,
        reduce_stats(
            group["stats/shard_sum"][:n_shards], group["stats/shard_sumsq"][:n_shards], rows_total
        ),
    )
    metrics = {"rows": rows_total, "tokens_per_s": (rows_total - start) / max(elapsed, 1e-9)}
    group.attrs.update({"metrics": metrics, "complete": True})
    log.info("wrote %d rows to %s (%.0f tokens/s)", rows_total, url, metrics["tokens_per_s"])
    return StoreURL(url, metrics)
