"""The bundled miniatures by name: the one definition ``fkv profile``, ``fkv check``, ``fkv plan validate`` and
``fkv bench`` share, so a plan profiled on one fits what the others run."""

from __future__ import annotations

from dataclasses import dataclass

from .self_forcing import MiniConfig

__all__ = ["Miniature", "MINIATURES"]


@dataclass(frozen=True)
class Miniature:
    """A Self Forcing-style miniature: its sizes, and the chunks of one profiling sample or checked video."""

    config: MiniConfig
    chunks: int


MINIATURES = {
    "mini": Miniature(MiniConfig(num_layers=4, num_heads=4, dim=256, ffn_dim=512), chunks=7),  # global, 21 frames
    "mini-windowed": Miniature(MiniConfig(num_layers=4, num_heads=4, dim=256, ffn_dim=512, window_frames=12,
                                          sink_frames=3), chunks=6),  # a 12-frame window with a 3-frame sink
}
