"""Cross-layer transcoders: harvesting, the activation store, training, evaluation, export.

`read_feature(clt_dir, layer, index)` reads one feature's statistics (feature-stats' output);
it is imported on first use, so that importing a submodule stays as cheap as that submodule.
"""

from __future__ import annotations

__all__ = ["read_feature"]


def __getattr__(name: str):
    if name == "read_feature":
        from .features import read_feature  # noqa: PLC0415

        return read_feature
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
