"""The transformer, checkpoint import, gated sparse attention and its post-training."""

from .model import GateConfig, GateStats, HookPoint, ModelConfig, ModelOutput, Transformer

__all__ = ["GateConfig", "GateStats", "HookPoint", "ModelConfig", "ModelOutput", "Transformer"]
