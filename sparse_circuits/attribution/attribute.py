"""Attribution graphs: the public function `attribute` and the CLI stage `attribute`.

Phases (circuit-tracer's):
  1. the prompt run: one clean forward pass, split into CLT terms        (replacement.py)
  2. the linear replacement model: batched forward passes (on prefixes of the prompt) kept
     for every backward pass (frozen.py)
  3. logit rows: each logit target's direct effects from every source   (sources.py)
  4. feature rows, in order of estimated influence on the logits, until `max_feature_nodes`
  5. the graph: rows of the visited features and the logits, columns restricted to visited
     features, errors and embeddings (graph.py)
Rows are stored sparse (exact zeros dropped: in a sparsified model every closed attention edge
gives some) and influence is estimated on the edge list, never on a dense matrix.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Tokenizer

from ..clt.cltdir import load_clt
from ..clt.model import CrossLayerTranscoder
from ..clt.splice import warn_if_other_model
from ..config import DEVICE_HELP, ConfigError, Device, resolve_device
from ..errors import StageError
from ..io import claim_output_dir, claim_output_file, read_json
from ..progress import progress_bar
from ..sparse_attention.model import Transformer
from ..sparse_attention.modeldir import load_model
from .attention import attention_attribution
from .frozen import PrefixGraphs
from .graph import Graph, logit_weights
from .graph_json import write_graph_json
from .graph_store import (
    LOADINGS_NODE_THRESHOLD,
    for_pruning,
    is_graph_store,
    loading_envelope,
    save_graph,
)
from .inputs import TargetSpec, decode_tokens, describe_tokens, resolve_targets, tokenize_prompt
from .prune import graph_scores, propagate, prune
from .replacement import EmbeddingConvention, ReplacementModel
from .sources import SourceTable

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# A block of rows is kept dense from this share of nonzeros on: CSR costs 8 bytes a nonzero
# (int32 column, float32 value), a dense float32 matrix 4 bytes an entry.
DENSE_ROW_DENSITY = 0.5


class _RowBlock(NamedTuple):
    """The rows of one backward pass over the source columns: dense float32 over the column
    ranges that hold a nonzero, or CSR (int32 column and float32 value per nonzero) when that
    is smaller."""

    nodes: torch.Tensor  # n  each row's node
    abs_sums: torch.Tensor  # n  Σ |value| over the row
    ranges: list[tuple[int, int]] | None  # dense: the column ranges kept, ascending (None: CSR)
    dense: torch.Tensor | None  # n,W  the kept columns side by side
    crow: torch.Tensor | None  # n+1  offsets of each row's entries
    col: torch.Tensor | None  # nnz  int32, ascending within a row
    val: torch.Tensor | None  # nnz

    @classmethod
    def of(cls, nodes: torch.Tensor, values: torch.Tensor, segments: list[int]) -> _RowBlock:
        """Rows `values` (n, n_cols) of `nodes`. segments: column offsets splitting the columns
        into runs sorted by position (one per source layer and kind): within each, the columns
        past the block's last nonzero (later positions, which no row here reads) and before its
        first are not stored."""
        values = values.float().cpu()
        nodes, abs_sums = nodes.long().cpu(), values.abs().sum(1)
        nonzero = values.ne(0)
        nnz = int(nonzero.sum())
        cols = nonzero.any(0)
        ranges = []
        for a, b in itertools.pairwise(segments):
            at = cols[a:b].nonzero()
            if at.numel():
                ranges.append((a + int(at[0]), a + int(at[-1]) + 1))
        width = sum(b - a for a, b in ranges)
        if nnz >= DENSE_ROW_DENSITY * values.shape[0] * width:
            dense = (
                torch.cat([values[:, a:b] for a, b in ranges], dim=1) if ranges else values[:, :0]
            )
            return cls(nodes, abs_sums, ranges, dense.contiguous(), None, None, None)
        csr = values.to_sparse_csr()
        return cls(
            nodes, abs_sums, None, None, csr.crow_indices(), csr.col_indices().int(), csr.values()
        )

    def dense_columns(self) -> torch.Tensor:
        """The global column of each column of `dense`: W."""
        return torch.cat(
            [torch.arange(a, b) for a, b in self.ranges] or [torch.zeros(0, dtype=torch.long)]
        )

    def entries(
        self, columns: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row in the block, column, value) of the nonzero entries, ordered by row then column;
        only the columns where the bool mask `columns` is set, when given."""
        if self.dense is not None:
            cols, block = self.dense_columns(), self.dense
            if columns is not None:
                keep = columns[cols]
                cols, block = cols[keep], block[:, keep]
            r, c = block.nonzero(as_tuple=True)
            return r, cols[c], block[r, c]
        r = torch.repeat_interleave(torch.arange(self.nodes.numel()), self.crow.diff())
        c, v = self.col.long(), self.val
        if columns is not None:
            keep = columns[c]
            r, c, v = r[keep], c[keep], v[keep]
        return r, c, v

    def column_mass(self, row_weights: torch.Tensor, n_cols: int) -> torch.Tensor:
        """Σ_rows row_weights[row] · |value[row, col]| for every column: n_cols."""
        out = torch.zeros(n_cols)
        if self.dense is not None:
            out[self.dense_columns()] = row_weights @ self.dense.abs()
            return out
        r = torch.repeat_interleave(torch.arange(self.nodes.numel()), self.crow.diff())
        return out.index_add_(0, self.col, row_weights[r] * self.val.abs())


class _Rows:
    """Attribution rows computed so far over the columns of a SourceTable, one block per
    backward pass. Each block is kept dense or sparse, whichever is smaller (a dense model's
    rows are mostly nonzero, a sparsified model's mostly zero: every closed attention edge gives
    exact zeros), and everything computed from the rows goes block by block: memory is the
    blocks' own plus one block's temporaries, never an edge list over all rows.

    Row nodes live in the exploration's node space: columns [0, n_cols) (features, errors,
    embeddings) followed by the logit targets."""

    def __init__(self, n_cols: int, segments: list[int]):
        self.n_cols, self.segments = n_cols, segments
        self.blocks: list[_RowBlock] = []
        self.n_rows = 0

    def add(self, nodes: torch.Tensor, values: torch.Tensor) -> None:
        self.blocks.append(_RowBlock.of(nodes, values, self.segments))
        self.n_rows += nodes.numel()

    def entries(self, columns: torch.Tensor | None = None):
        """(row, column, value) of every nonzero entry (in the columns of the bool mask
        `columns`, when given), rows numbered in the order they were added; then each row's node."""
        rows, cols, vals, first = [], [], [], 0
        for block in self.blocks:
            r, c, v = block.entries(columns)
            rows.append(r + first)
            cols.append(c)
            vals.append(v)
            first += block.nodes.numel()
        nodes = torch.cat([b.nodes for b in self.blocks])
        return torch.cat(rows), torch.cat(cols), torch.cat(vals), nodes

    def estimated_influence(self, logit_weights: torch.Tensor) -> torch.Tensor:
        """Influence on the logits of every node, through the rows computed so far.

        Only nodes with rows pass influence on, so the paths are walked on the edges between
        them (few), and one last pass over the blocks spreads it to every column."""
        n_nodes = self.n_cols + logit_weights.numel()
        nodes = torch.cat([b.nodes for b in self.blocks])
        abs_sums = torch.cat([b.abs_sums for b in self.blocks]).clamp(min=1e-10)
        start = torch.zeros(n_nodes)
        start[self.n_cols :] = logit_weights
        has_row = torch.zeros(n_nodes, dtype=torch.bool)
        has_row[nodes] = True
        r, c, v, _ = self.entries(has_row[: self.n_cols])
        total = start + propagate(nodes[r], c, v.abs() / abs_sums[r], start)
        row_weights = total[nodes] / abs_sums
        influence = torch.zeros(n_nodes)
        first = 0
        for block in self.blocks:
            n = block.nodes.numel()
            influence[: self.n_cols] += block.column_mass(
                row_weights[first : first + n], self.n_cols
            )
            first += n
        return influence


def attribute(
    *,
    model: Transformer,
    clt: CrossLayerTranscoder,
    prompt: str | Sequence[int] | torch.Tensor,
    tokenizer: Tokenizer | None = None,
    targets: Sequence[TargetSpec] | None = None,
    clt_info: dict | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = 7500,
    batch_size: int = 64,
    update_interval: int = 4,
    progress: bool = False,
    add_bos: bool = True,
    embedding: EmbeddingConvention = "token+position",
    include_bos: bool | None = None,
) -> Graph:
    """The attribution graph of `prompt` through `model` with its MLPs replaced by `clt`.

    targets: token texts / ids or logit differences (see inputs.py); default: the salient
    logits. max_feature_nodes: how many active features get rows (None: all), chosen in order
    of estimated influence. The estimate is renewed after `update_interval` batches, or after
    the rows grow by a quarter if that is more (which bounds the estimates' total cost).
    embedding: what an embedding node holds, "token+position" (ours) or "token"
    (circuit-tracer's). include_bos: BOS positions get features (default: as the CLT was
    trained, from `clt_info`; without features the error node there holds the MLP output)."""
    if batch_size < 1 or update_interval < 1:
        raise StageError("batch_size and update_interval must be positive")
    started = time.perf_counter()
    rm = ReplacementModel(model, clt, clt_info, include_bos=include_bos, embedding=embedding)
    bos = model.cfg.bos_token_id if add_bos else None  # text prompts: BOS first, as in training
    tokens = tokenize_prompt(prompt, tokenizer, bos_token_id=bos)
    log.info("prompt: %s", describe_tokens(tokens, tokenizer))
    run = rm.run_prompt(tokens)
    logit_targets = resolve_targets(
        targets,
        run.logits[-1],
        tokenizer,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
    )
    sources = SourceTable(rm, run)
    N = sources.n_features
    budget = N if max_feature_nodes is None else min(max_feature_nodes, N)
    log.info(
        "%d tokens, %d active features (%d get rows), %d logit targets",
        run.n_pos,
        N,
        budget,
        len(logit_targets),
    )

    prefixes = PrefixGraphs(rm, run, batch_size, taps=("mlp_in", "final"))  # all rows inject there
    rows = _Rows(sources.n_cols, sources.position_runs())
    W_U = model.lm_head.weight
    directions = torch.stack([t.direction(W_U) for t in logit_targets])  # n_logits,M
    full = prefixes.covering(run.n_pos - 1)
    for s in range(0, len(logit_targets), batch_size):
        part = directions[s : s + batch_size]
        values = sources.row_values(full.backward(full.injections(full.logit_rows(part))))
        rows.add(torch.arange(s, s + part.shape[0]) + sources.n_cols, values[: part.shape[0]])

    weights = logit_weights(logit_targets)
    visited = torch.zeros(N, dtype=torch.bool)
    positions = sources.features[:, 1].cpu()
    layers = sources.features[:, 0].cpu()
    with progress_bar(total=budget, desc="feature rows", disable=not progress, unit="row") as bar:
        while int(visited.sum()) < budget:
            n_visited = int(visited.sum())
            if budget == N:
                pending = (~visited).nonzero().squeeze(1)
            else:
                influence = rows.estimated_influence(weights)[:N]
                ranked = influence.argsort(descending=True)
                queue = min(max(update_interval * batch_size, n_visited // 4), budget - n_visited)
                pending = ranked[~visited[ranked]][:queue]
            # By position, so that each batch runs on the shortest prefix graph it can, and
            # within a prefix by layer, so that a batch's rows read few layers' columns.
            prefix = torch.searchsorted(
                torch.tensor(prefixes.lengths), positions[pending], right=True
            )
            key = (prefix * rm.cfg.n_layers + layers[pending]) * run.n_pos + positions[pending]
            pending = pending[key.argsort(stable=True)]
            for s in range(0, pending.numel(), batch_size):
                idx = pending[s : s + batch_size]
                frozen = prefixes.covering(int(positions[idx].max()))
                inject = frozen.injections(frozen.feature_rows(sources.features[idx]))
                values = sources.row_values(frozen.backward(inject))[: idx.numel()]
                rows.add(idx, values)
                visited[idx] = True
                bar.update(idx.numel())
    del prefixes, full
    # What the budget leaves out: the share of the rows' influence-weighted mass that falls on
    # active features without rows (their edges are dropped, so the graph never sees it).
    unvisited_share = 0.0
    if budget < N:
        mass = rows.estimated_influence(weights)[: sources.n_cols]
        unvisited_share = float(mass[:N][~visited].sum() / mass.sum().clamp(min=1e-30))
    log.info("%.1f %% of the rows' influence falls on features without rows", 100 * unvisited_share)

    graph = _pack(rows, sources, visited, run, rm, logit_targets, tokenizer, prompt)
    graph.settings = {
        "max_n_logits": max_n_logits,
        "desired_logit_prob": desired_logit_prob,
        "batch_size": batch_size,
        "max_feature_nodes": max_feature_nodes,
        "update_interval": update_interval,
        "embedding": rm.embedding,
        "include_bos": rm.include_bos,
        "dtype": str(rm.dtype).removeprefix("torch."),
        "unvisited_feature_share": round(unvisited_share, 6),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return graph


def _pack(
    rows: _Rows, sources: SourceTable, visited, run, rm, logit_targets, tokenizer, prompt
) -> Graph:
    """The graph over the visited features: rows remapped, edges from unvisited features dropped.

    Each row's entries are contiguous and sorted by column, and columns map to graph nodes in
    order, so sorting the rows by target node sorts the edges by (target, source)."""
    N = sources.n_features
    selected = visited.nonzero().squeeze(1)
    Nf = selected.numel()
    # A sentinel entry at N (never visited, never a node) keeps the lookups valid when no
    # feature is active anywhere: the graph is then errors, embeddings and logits alone.
    to_node = torch.full((N + 1,), -1, dtype=torch.long)
    to_node[selected] = torch.arange(Nf)
    logit_offset = Nf + sources.n_cols - N
    # Only the visited features' columns, the errors' and the embeddings' become edges.
    keep = torch.cat([visited, torch.ones(sources.n_cols - N, dtype=torch.bool)])
    r, c, v, nodes = rows.entries(keep)
    source = torch.where(c < N, to_node[c.clamp(max=N)], c - N + Nf)
    row_target = torch.where(
        nodes < N, to_node[nodes.clamp(max=N)], nodes - sources.n_cols + logit_offset
    )
    counts = torch.bincount(r, minlength=nodes.numel())
    starts = counts.cumsum(0) - counts
    row_order = row_target.argsort()
    seg_counts = counts[row_order]
    seg_shift = starts[row_order] - (seg_counts.cumsum(0) - seg_counts)
    order = torch.arange(int(counts.sum())) + seg_shift.repeat_interleave(seg_counts)
    target = row_target.repeat_interleave(counts)
    feats = sources.features[selected].cpu()
    return Graph(
        prompt=prompt if isinstance(prompt, str) else "",
        tokens=run.tokens.cpu(),
        token_strings=decode_tokens(run.tokens, tokenizer),
        n_layers=rm.cfg.n_layers,
        vocab_size=rm.cfg.vocab_size,
        features=feats,
        activations=sources.activations[selected].float().cpu(),
        logit_targets=logit_targets,
        edge_targets=target[order],
        edge_sources=source[order],
        edge_weights=v[order],
        n_active_features=N,
        featureless_positions=run.featureless_positions(),
        embedding=rm.embedding,
    )


# ----------------------------------------------------------------------------- the CLI stage


class AttributeConfig(BaseModel):
    """`attribute`: the attribution graph of one prompt, with attention attribution, as graph JSON v1."""

    model_config = ConfigDict(extra="forbid")
    model: Path = Field(description="Model directory (ours or a Hugging Face checkpoint dir).")
    clt: Path = Field(description="CLT directory trained on this model's MLPs.")
    prompt: str | None = Field(
        None, description="Prompt text (tokenised with the model's tokenizer)."
    )
    prompt_ids: list[int] | None = Field(
        None, description="The prompt as token ids, instead of text."
    )
    out: Path | None = Field(
        None, description="Graph JSON file to write (the pruning at node/edge_threshold)."
    )
    store_dir: Path | None = Field(
        None,
        description="Also write the compact graph store to this directory (graph_store.py: every edge, head "
        "loadings, QK attributions), from which the graph JSON of any pruning is built.",
    )
    loadings_node_threshold: float = Field(
        LOADINGS_NODE_THRESHOLD, ge=0, le=1,
        description="With store_dir: head loadings are stored for the cross-position links of every pruning at a "
        "node_threshold up to this (or up to node_threshold, if higher).",
    )  # fmt: skip
    targets: list[str] | None = Field(
        None,
        description='Logit targets: token texts (JSON-quote to keep spaces: \'" 5"\') or differences (\'" 5" - " 6"\'). '
        "Default: the salient logits.",
    )
    max_n_logits: int = Field(10, gt=0, description="Salient logits: at most this many.")
    desired_logit_prob: float = Field(
        0.95, gt=0, le=1, description="Salient logits: until this cumulative probability."
    )
    max_feature_nodes: int | None = Field(
        7500, gt=0, description="Active features that get rows, by estimated influence."
    )
    node_threshold: float = Field(
        0.8, ge=0, le=1, description="Pruning: keep nodes holding this share of influence."
    )
    edge_threshold: float = Field(
        0.98, ge=0, le=1, description="Pruning: keep edges holding this share of influence."
    )
    batch_size: int = Field(64, gt=0, description="Rows per backward pass.")
    update_interval: int = Field(
        4, gt=0, description="Batches between influence estimates while exploring features."
    )
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = Field(
        "float32", description="Model and CLT dtype."
    )
    device: Device = Field("auto", description=DEVICE_HELP)
    bos: bool = Field(
        True,
        description="Put the model's BOS token before a text prompt (unless it starts with it), as in training.",
    )
    overwrite: bool = Field(
        False, description="Replace a graph JSON already at --out (a graph store at --store-dir)."
    )
    attention: bool = Field(
        True, description="Head loadings of cross-position edges, head summary and QK attribution."
    )
    qk_edges: int | None = Field(
        None, ge=0, description="QK attributions of the attention edges carrying most attribution (default: 32 for a "
        "sparsified model, 0 for a dense one).",
    )  # fmt: skip
    qk_at: list[str] = Field(
        default_factory=list,
        description='More QK attributions, each for one attention edge "layer,head,query,key" (positions from 0, '
        'key <= query), e.g. "2,1,40,12".',
    )
    embedding: EmbeddingConvention = Field(
        "token+position",
        description="What an embedding node holds: token+position (the token embedding plus a learned position "
        "embedding) or token (the token embedding alone, as circuit-tracer; the position embedding joins the biases).",
    )
    slug: str | None = Field(
        None, description="Graph slug (default: the stem of out, else the store dir's name)."
    )
    scan: str | None = Field(
        None, description="Model id in the graph's metadata (default: the model dir's name)."
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> AttributeConfig:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise StageError("give exactly one of prompt and prompt_ids")
        if self.out is None and self.store_dir is None:
            raise StageError("give out (a graph JSON file), store_dir (a graph store), or both")
        self.qk_edges_at()  # malformed edges fail here, before any work
        return self

    def qk_edges_at(self) -> list[tuple[int, int, int, int]]:
        """`qk_at` as (layer, head, query, key) tuples."""
        edges = []
        for text in self.qk_at:
            parts = text.replace(" ", "").split(",")
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                raise StageError(
                    f'qk_at {text!r}: expected "layer,head,query,key", four integers >= 0'
                )
            layer, head, query, key = map(int, parts)
            if key > query:
                raise StageError(
                    f"qk_at {text!r}: the key position {key} is after the query position {query}"
                )
            edges.append((layer, head, query, key))
        return edges


def is_graph_json(path: Path) -> bool:
    """Whether `path` holds a graph JSON (ours or another tool's): the only file --out replaces."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and {"metadata", "nodes", "links"} <= doc.keys()


def _same_run(store: Path, config: dict) -> bool:
    """Whether the graph store at `store` was written by this very config."""
    try:
        return is_graph_store(store) and read_json(store / "run.json").get("config") == config
    except ValueError:
        return False


def run_attribute(config: AttributeConfig) -> Path:
    """Load the model and CLT, compute, prune, attribute attention, write the graph JSON."""
    if config.out is not None:
        claim_output_file(config.out, config.overwrite, is_graph_json)  # before any work
    if config.store_dir is not None:  # the same job run again (a retry) may write it again
        again = _same_run(Path(config.store_dir), config.model_dump(mode="json"))
        claim_output_dir(config.store_dir, config.overwrite or again, is_graph_store)
    device, dtype = resolve_device(config.device), DTYPES[config.dtype]
    model, tokenizer = load_model(config.model, device=device)
    clt = load_clt(config.clt, device=device)
    clt_info = read_json(Path(config.clt) / "config.json")
    warn_if_other_model(model, clt_info)  # on the weights as loaded; attribute() checks the fit
    model, clt = model.to(dtype), clt.to(dtype)
    qk_at = config.qk_edges_at()
    for layer, head, _, _ in qk_at:
        if not (layer < model.cfg.n_layers and head < model.cfg.n_heads):
            raise ConfigError(
                f"qk_at: no head {head} in layer {layer} (the model has {model.cfg.n_layers} layers of "
                f"{model.cfg.n_heads} heads)"
            )
    prompt = config.prompt if config.prompt is not None else config.prompt_ids
    bos = model.cfg.bos_token_id if config.bos else None
    n_pos = tokenize_prompt(prompt, tokenizer, bos_token_id=bos).numel()
    if any(query >= n_pos for _, _, query, _ in qk_at):
        raise ConfigError(f"qk_at: the prompt has {n_pos} tokens, positions 0 to {n_pos - 1}")
    graph = attribute(
        model=model, clt=clt, prompt=prompt, tokenizer=tokenizer, targets=config.targets, clt_info=clt_info,
        max_n_logits=config.max_n_logits, desired_logit_prob=config.desired_logit_prob,
        max_feature_nodes=config.max_feature_nodes, batch_size=config.batch_size, add_bos=config.bos,
        update_interval=config.update_interval, progress=True, embedding=config.embedding,
    )  # fmt: skip
    pruned = prune(graph, config.node_threshold, config.edge_threshold)
    scores = {"full": graph_scores(graph), "pruned": graph_scores(graph, pruned.edge_mask)}
    attention = None
    if config.attention:
        qk = (
            config.qk_edges
            if config.qk_edges is not None
            else (32 if model.cfg.gate is not None else 0)
        )
        attention = attention_attribution(
            model=model,
            clt=clt,
            graph=graph,
            pruned=pruned,
            batch_size=config.batch_size,
            qk_edges=qk,
            qk_at=qk_at,
            loading_edges=None if config.store_dir is None else loading_envelope(
                graph, pruned.node_influence, max(config.node_threshold, config.loadings_node_threshold)
            ),
        )  # fmt: skip
    log.info(
        "%d feature nodes, %d edges; pruned to %d nodes, %d edges; replacement %.3f, completeness %.3f",
        graph.n_features, graph.n_edges, int(pruned.node_mask.sum()), int(pruned.edge_mask.sum()),
        scores["pruned"].replacement, scores["pruned"].completeness,
    )  # fmt: skip
    if attention is not None:
        s = attention.summary
        log.info("%d of %d heads carry %.0f %% of the attention-mediated attribution; %d QK attributions",
                 s.n_heads, s.total_heads, 100 * s.coverage, len(attention.qk))  # fmt: skip
    slug = config.slug or Path(config.out or config.store_dir).stem
    scan = config.scan or Path(config.model).name
    if config.store_dir is not None:
        save_graph(
            config.store_dir, graph, attention, pruned=pruned, slug=slug, scan=scan,
            node_threshold=config.node_threshold, edge_threshold=config.edge_threshold,
            loadings_node_threshold=max(config.node_threshold, config.loadings_node_threshold),
            n_heads=model.cfg.n_heads, run={"stage": "attribute", "config": config.model_dump(mode="json")},
        )  # fmt: skip
        attention = attention and for_pruning(attention, graph, pruned)
    if config.out is not None:
        write_graph_json(
            config.out, graph, pruned, scores=scores, attention=attention, slug=slug, scan=scan,
            node_threshold=config.node_threshold, edge_threshold=config.edge_threshold,
        )  # fmt: skip
    return Path(config.store_dir if config.store_dir is not None else config.out)
