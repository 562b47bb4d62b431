"""Miniature AR video diffusion models reproducing the cache and attention code of real pipelines."""

from .miniatures import MINIATURES, Miniature
from .rollout import RolloutInputs, build, chunks, make_inputs, new_caches, recompute_rollout, rollout
from .self_forcing import CausalVideoDiT, MiniConfig

__all__ = ["MiniConfig", "CausalVideoDiT", "RolloutInputs", "build", "make_inputs", "new_caches", "rollout",
           "chunks", "recompute_rollout", "Miniature", "MINIATURES"]
