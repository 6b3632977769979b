"""Held-out evaluation: loss, task accuracy, and how much of attention stays open.

Connectivity is open edges / causal pairs T(T+1)/2, averaged over heads, layers and
sequences, always reported with T, mean keys per query and the share of queries with no
open key; per layer and head too.
"""

from __future__ import annotations

import torch

from .model import Transformer, causal_pair_count
from .toy import exact_match


@torch.no_grad()
def evaluate(
    model: Transformer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 64,
    task: str | None = None,
    per_sequence: bool = False,
) -> dict:
    """Mean CE over scored targets (and exact-match accuracy for tasks); gate statistics if gates
    are on; with `per_sequence`, each sequence's summed CE and scored-token count too (tensors)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    T = inputs.shape[1]
    ce_sum, n_scored, correct = 0.0, 0, 0
    open_edges = empty = None
    sequence_ce, sequence_scored = [], []
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
        out = model(x)
        ce = torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="none"
        ).view(y.shape)
        scored = y != -100
        ce_sum += ce.sum().item()
        n_scored += int(scored.sum())
        if per_sequence:
            sequence_ce.append(ce.sum(1).double().cpu())
            sequence_scored.append(scored.sum(1).cpu())
        if task is not None:
            correct += int(exact_match(out.logits, y).sum())
        if out.gate_stats is not None:
            edges = (
                torch.stack([s.open_edges for s in out.gate_stats], 1).sum(0).double()
            )  # L,H summed over batch
            no_key = torch.stack([s.empty_queries for s in out.gate_stats], 1).sum(0).double()
            open_edges = edges if open_edges is None else open_edges + edges
            empty = no_key if empty is None else empty + no_key
    model.train(was_training)
    n = inputs.shape[0]
    result: dict = {"loss": ce_sum / max(n_scored, 1), "context_length": T, "sequences": n}
    if task is not None:
        result["accuracy"] = correct / n
    if per_sequence:
        result["ce_per_sequence"] = torch.cat(sequence_ce)
        result["scored_per_sequence"] = torch.cat(sequence_scored)
    if open_edges is not None:
        conn = open_edges / (n * causal_pair_count(T))  # L,H
        kpq = open_edges / (n * T)
        result |= {
            "connectivity": conn.mean().item(),
            "keys_per_query": kpq.mean().item(),
            "empty_query_fraction": (empty / (n * T)).mean().item(),
            "connectivity_per_layer_head": conn.tolist(),
            "keys_per_query_per_layer_head": kpq.tolist(),
        }
    return result
