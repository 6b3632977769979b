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
