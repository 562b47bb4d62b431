"""What ``fkv bench`` measures: the named geometries (real sizes, scaled by ``side``) and the settings of one run."""

from __future__ import annotations

from dataclasses import dataclass

from ...plan import DYNAMIC, STATIC, HeadPlan

__all__ = ["MODES", "BenchGeometry", "GEOMETRIES", "BenchSettings", "check_modes"]


MODES = ("dense", "select", "compact")


@dataclass(frozen=True)
class BenchGeometry:
    """A real-size geometry: latent frame size (before the 2 x 2 patch), attention window, chunks per video."""

    latent: tuple[int, int]
    window_frames: int | None  # None: global attention over the whole video
    sink_frames: int
    chunks: int
    note: str
    cache_style: str = "slots"  # the miniature's cache pattern (fkv_compile.models.MiniConfig.cache_style)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame at real size (the latent frame in 2 x 2 patches)."""
        return self.latent[0] * self.latent[1] // 4


GEOMETRIES = {
    "self-forcing-5s": BenchGeometry((60, 104), None, 3, 7, "Self Forcing 480p, 5 s = 21 latent frames, global"),
    "longlive-window": BenchGeometry((60, 104), 12, 3, 10, "LongLive v1 480p, 12-frame window with a 3-frame sink, "
                                     "staged cache", "longlive"),
    "1080p": BenchGeometry((136, 240), None, 3, 7, "1080p-like (8160 tokens per frame), 21 frames, global"),
    "tiny": BenchGeometry((8, 12), 12, 3, 5, "a test geometry (24 tokens per frame)"),
}


@dataclass(frozen=True)
class BenchSettings:
    geometry: str
    side: int = 2  # latent height and width divided by this
    layers: int = 4
    heads: int = 12
    head_dim: int = 128
    dtype: str = "float32"
    repeats: int = 3  # rounds of timed videos, one per mode
    device: str = "cpu"
    plan: str | None = None
    lowering: str = "inductor"  # dense runs backend=lowering; the compressed modes lower with it too

    def config(self):
        from ...models import MiniConfig

        g = GEOMETRIES[self.geometry]
        h, w = (x // self.side for x in g.latent)
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(f"side {self.side} leaves a {h} x {w} latent for {self.geometry}; it must be even")
        dim = self.heads * self.head_dim
        return MiniConfig(dim=dim, num_heads=self.heads, num_layers=self.layers, ffn_dim=dim, latent_height=h,
                          latent_width=w, num_frames=3 * g.chunks, window_frames=g.window_frames,
                          sink_frames=g.sink_frames, cache_style=g.cache_style)

    def head_plan(self, cfg) -> HeadPlan:
        if self.plan:
            plan = HeadPlan.load(self.plan)
            return HeadPlan.from_roles(plan.roles[: cfg.num_layers], frame_tokens=cfg.frame_tokens, chunk_frames=3)
        return HeadPlan.from_roles(
            [[STATIC if (h + layer) % 8 in (0, 3, 5) else DYNAMIC for h in range(cfg.num_heads)]
             for layer in range(cfg.num_layers)], frame_tokens=cfg.frame_tokens, chunk_frames=3)


def check_modes(modes: tuple[str, ...]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}; expected some of {MODES}")

