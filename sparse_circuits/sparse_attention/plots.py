"""Pictures: attention patterns dense beside sparse, per head (the paper's Figure 1)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..io import atomic_path  # noqa: E402


def plot_attention_patterns(
    dense: torch.Tensor, sparse: torch.Tensor, out: Path, tokens: list[str] | None = None
) -> Path:
    """One row per layer; per head a dense and a sparse panel. dense, sparse: [L, H, T, T]."""
    L, H, T, _ = dense.shape
    fig, axes = plt.subplots(L, 2 * H, figsize=(1.6 * 2 * H + 1, 1.6 * L + 1), squeeze=False)
    show_ticks = tokens is not None and T <= 24
    for layer in range(L):
        for head in range(H):
            for k, (name, pattern) in enumerate((("dense", dense), ("sparse", sparse))):
                ax = axes[layer][2 * head + k]
                ax.imshow(
                    pattern[layer, head].float().numpy(),
                    cmap="Blues",
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if layer == 0:
                    ax.set_title(f"H{head} {name}", fontsize=7)
                if k == 0 and head == 0:
                    ax.set_ylabel(f"L{layer}", fontsize=8)
                if show_ticks and layer == L - 1:
                    ax.set_xticks(range(T), tokens, fontsize=5, rotation=90)
                if show_ticks and head == 0 and k == 0:
                    ax.set_yticks(range(T), tokens, fontsize=5)
    open_frac = (sparse > 0).float().sum() / (dense > 0).float().sum().clamp(min=1)
    fig.suptitle(
        f"Attention patterns, dense vs sparse (open edges kept: {open_frac:.1%})", fontsize=10
    )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def plot_training_curves(
    runs: dict[str, list[dict]], out: Path, *, anneal_end: int | None = None
) -> Path:
    """sparsify's controller over steps, one line per run (e.g. before and after a change):
    λ, the constraint in units of its slack (CE_hard − τ) / (τ − CE_dense), and the
    hard-gate connectivity of the training batch. `runs` maps a label to metrics.jsonl records."""
    panels = (
        ("λ", lambda r: r["lambda"], "log"),
        ("(CE_hard − τ) / (τ − CE_dense)", lambda r: (r["hard_ce"] - r["tau"]) / max(r["tau"] - r["dense_ce"], 1e-12), "linear"),
        ("connectivity (hard gates)", lambda r: r["hard_connectivity"], "log"),
    )  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 7), sharex=True)
    for ax, (title, value, scale) in zip(axes, panels, strict=True):
        for label, records in runs.items():
            ax.plot([r["step"] for r in records], [value(r) for r in records], lw=0.8, label=label)
        ax.set_yscale(scale)
        ax.set_ylabel(title, fontsize=8)
        if anneal_end is not None:
            ax.axvline(anneal_end, color="grey", lw=0.6, ls="--")
    axes[1].axhline(0, color="black", lw=0.6)
    axes[1].set_ylim(-1.5, 3)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("step" + (" (dashed: the gate offset reaches 0)" if anneal_end else ""))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
