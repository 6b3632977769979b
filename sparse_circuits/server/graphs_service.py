"""What the graphs and features routes keep in memory, per app: graph JSON documents by pruning
(an LRU of `settings.graph_cache_size`), the last few loaded graph stores, loaded models and
CLTs for QK attributions, tokenizers; and the time estimate that decides between answering a
graph inline and queueing a job.

Everything here is created on first use and hangs off `app.state.graphs` (`graph_services`),
so two apps in one process (tests) share nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import Request

from ..attribution.graph_store import AttentionView, StoredGraph, load_graph
from ..io import read_json
from .settings import ServerSettings

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

STORES_KEPT = 2  # loaded graph stores (a 10M-edge graph holds ~120 MB of edges)
MODELS_KEPT = 2  # loaded (model, CLT) pairs for QK attributions
VIEWS_KEPT = 16  # prunings' attention attributions (loadings of their links: small)
GZIP_LEVEL = 5
DOCS_MAX_BYTES = 1 << 30  # cached graph JSON in all (gzip copies add less), whatever the count


class LRU(Generic[K, V]):
    """A thread-safe least-recently-used map of at most `size` entries (0: keeps nothing) and,
    with `weigh`, at most `max_weight` in all (the newest entry is always kept)."""

    def __init__(self, size: int, max_weight: int = 0, weigh: Callable[[V], int] | None = None):
        self.size, self.max_weight, self.weigh = size, max_weight, weigh
        self._items: OrderedDict[K, V] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._pop(key)
            self._items[key] = value
            self._weight += self.weigh(value) if self.weigh else 0
            while len(self._items) > self.size or (
                self.weigh and self._weight > self.max_weight and len(self._items) > 1
            ):
                self._pop(next(iter(self._items)))

    def drop(self, match: Callable[[K], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if match(k)]:
                self._pop(key)

    def _pop(self, key: K) -> None:
        value = self._items.pop(key, None)
        if value is not None and self.weigh:
            self._weight -= self.weigh(value)


@dataclass
class CachedDoc:
    """One pruning's graph JSON, serialised once; gzipped on first request for it."""

    raw: bytes
    directory: Path
    n_nodes: int
    n_links: int
    pruning: dict | None = None  # a graph JSON file's own pruning_settings
    etag: str = ""
    _gz: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.etag = '"' + hashlib.blake2b(self.raw, digest_size=12).hexdigest() + '"'

    @property
    def has_gzip(self) -> bool:
        return self._gz is not None

    def gzipped(self) -> bytes:
        with self._lock:
            if self._gz is None:
                self._gz = gzip.compress(self.raw, compresslevel=GZIP_LEVEL, mtime=0)
            return self._gz


@dataclass
class LoadedPair:
    model: Any
    clt: Any
    lock: threading.Lock = field(default_factory=threading.Lock)  # hooks: one user at a time


class KeyedLocks:
    """One lock per key, so that concurrent requests for the same work wait for one doer."""

    def __init__(self):
        self._locks: dict[Any, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, key: Any) -> threading.Lock:
        with self._guard:
            if len(self._locks) > 4096:  # forget idle ones
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(key, threading.Lock())


class GraphServices:
    def __init__(self, settings: ServerSettings):
        self.docs: LRU[tuple[str, float, float], CachedDoc] = LRU(
            settings.graph_cache_size, DOCS_MAX_BYTES, lambda d: len(d.raw)
        )
        self.stores: LRU[str, StoredGraph] = LRU(STORES_KEPT)
        # a pruning's attention attribution (loadings of its links, head shares), for /heads
        self.views: LRU[tuple[str, float, float], AttentionView] = LRU(VIEWS_KEPT)
        self.models: LRU[tuple[str, str, str], LoadedPair] = LRU(MODELS_KEPT)
        self.tokenizers: LRU[str, Any] = LRU(16)
        self.locks = KeyedLocks()
        self.inline = threading.Semaphore(1)  # one inline graph at a time; others become jobs
        self.builds = threading.Semaphore(2)  # graph JSON documents built at once

    def stored(self, graph_id: str, directory: Path) -> StoredGraph:
        """The graph store of `graph_id` at `directory`, loaded once while it is kept."""
        found = self.stores.get(graph_id)
        if found is not None and found.path == directory:
            return found
        with self.locks(("store", graph_id)):
            found = self.stores.get(graph_id)
            if found is None or found.path != directory:
                found = load_graph(directory)
                self.stores.put(graph_id, found)
            return found

    def forget(self, graph_id: str, *, store: bool = True) -> None:
        """Drop the cached documents of `graph_id` (and its loaded store)."""
        self.docs.drop(lambda key: key[0] == graph_id)
        self.views.drop(lambda key: key[0] == graph_id)
        if store:
            self.stores.drop(lambda key: key == graph_id)

    def pair(self, model_dir: Path, clt_dir: Path, dtype: str) -> LoadedPair:
        """The model and CLT, loaded once per process while kept (QK attributions)."""
        from ..attribution.attribute import DTYPES  # noqa: PLC0415  (torch: only when needed)
        from ..clt.cltdir import load_clt  # noqa: PLC0415
        from ..sparse_attention.modeldir import load_model  # noqa: PLC0415

        key = (str(model_dir), str(clt_dir), dtype)
        with self.locks(("pair", key)):
            found = self.models.get(key)
            if found is None:
                model, _ = load_model(model_dir)
                clt = load_clt(clt_dir)
                found = LoadedPair(model.to(DTYPES[dtype]).eval(), clt.to(DTYPES[dtype]).eval())
                self.models.put(key, found)
                log.info("loaded %s and %s for QK attributions", model_dir, clt_dir)
            return found

    def tokenizer(self, model_dir: Path):
        """The model dir's tokenizer.json (None when it has none), read once while kept."""
        from ..sparse_attention.modeldir import load_tokenizer  # noqa: PLC0415

        key = str(model_dir)
        found = self.tokenizers.get(key)
        if found is None:
            found = (load_tokenizer(model_dir),)
            self.tokenizers.put(key, found)
        return found[0]


def graph_services(request: Request) -> GraphServices:
    state = request.app.state
    services = getattr(state, "graphs", None)
    if services is None:
        with _create_lock:
            services = getattr(state, "graphs", None)
            if services is None:
                services = state.graphs = GraphServices(state.settings)
    return services


_create_lock = threading.Lock()


# ----------------------------------------------------------------------------- time estimate


# Seconds per (feature row x prompt token x effective parameter), measured on the stdlib LM
# benchmark (4 layers, d_model 128, 1024 CLT features a layer; benchmarks/results/
# attribution_stdlib_lm512.json: ~1e-5 s per row-token on 2 CPU cores), with head loadings.
SECONDS_PER_UNIT = 5e-12
SECONDS_PER_BATCH = 0.01
SECONDS_FIXED = 0.5
DEFAULT_ACTIVE_FRACTION = 0.02  # features active per token and layer, when the CLT says nothing


def clt_facts(clt_dir: Path) -> dict[str, Any]:
    """n_layers, d_features and the mean active features per layer (l0) of a CLT dir."""
    config = read_json(clt_dir / "config.json")
    cfg = config.get("clt", config)
    metrics_file = clt_dir / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.is_file() else {}
    d_features = int(cfg.get("d_features", 0))
    l0 = metrics.get("l0") if isinstance(metrics.get("l0"), int | float) else None
    return {
        "n_layers": int(cfg.get("n_layers", 0)),
        "d_features": d_features,
        "l0": float(l0) if l0 is not None else DEFAULT_ACTIVE_FRACTION * d_features,
    }


def estimate_seconds(
    *,
    n_pos: int,
    n_layers: int,
    d_model: int,
    d_mlp: int,
    d_features: int,
    l0: float,
    max_feature_nodes: int | None,
    n_logits: int,
    batch_size: int = 64,
) -> float:
    """A rough estimate of an attribution graph's time on a CPU: feature rows (the active
    features, at most max_feature_nodes, plus the logits) times the prompt length times the
    parameters a row's backward pass goes through (blocks and CLT decoders), plus overheads."""
    active = n_pos * n_layers * l0
    rows = (active if max_feature_nodes is None else min(active, max_feature_nodes)) + n_logits
    params = n_layers * (4 * d_model * d_model + 2 * d_model * d_mlp)
    params += d_features * d_model * n_layers * (n_layers + 3) // 2  # encoders + decoders
    batches = rows / batch_size
    return SECONDS_FIXED + batches * SECONDS_PER_BATCH + rows * n_pos * params * SECONDS_PER_UNIT
