"""sparse-circuits: sparse attention post-training, cross-layer transcoders and attribution graphs."""

__version__ = "0.1.0"
