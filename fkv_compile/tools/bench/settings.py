"""What ``fkv bench`` measures: the named geometries (real sizes, scaled by ``side``) and the settings of one run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...models import MINIATURES, MiniConfig
from ...plan import DYNAMIC, STATIC, HeadPlan, PlanError

__all__ = ["MODES", "BenchGeometry", "GEOMETRIES", "BenchSettings", "check_modes"]


MODES = ("dense", "select", "compact")


@dataclass(frozen=True)
class BenchGeometry:
    """A real-size geometry: latent frame size (before the 2 x 2 patch), attention window, chunks per video; or a
    bundled miniature, run at its own size (``miniature``: its sizes, the defaults of ``--layers`` etc.)."""

    latent: tuple[int, int]
    window_frames: int | None  # None: global attention over the whole video
    sink_frames: int
    chunks: int
    note: str
    cache_style: str = "slots"  # the miniature's cache pattern (fkv_compile.models.MiniConfig.cache_style)
    miniature: MiniConfig | None = None

    @classmethod
    def of_miniature(cls, name: str) -> BenchGeometry:
        """The bundled miniature ``name`` (:data:`fkv_compile.models.MINIATURES`), as profile and check run it."""
        cfg = MINIATURES[name].config
        return cls((cfg.latent_height, cfg.latent_width), cfg.window_frames, cfg.sink_frames, MINIATURES[name].chunks,
                   f"the bundled miniature {name} as fkv profile and fkv check run it ({cfg.frame_tokens} tokens per "
                   f"frame, {cfg.num_layers} layers x {cfg.num_heads} heads x {cfg.head_dim})", cfg.cache_style, cfg)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame at real size (the latent frame in 2 x 2 patches)."""
        return self.latent[0] * self.latent[1] // 4


GEOMETRIES = {
    "self-forcing-5s": BenchGeometry((60, 104), None, 3, 7, "Self Forcing 480p, 5 s = 21 latent frames, global"),
    "longlive-window": BenchGeometry((60, 104), 12, 3, 10, "LongLive v1 480p, 12-frame window with a 3-frame sink, "
                                     "staged cache", "longlive"),
    "1080p": BenchGeometry((136, 240), None, 3, 7, "1080p-like (8160 tokens per frame), 21 frames, global"),
    **{name: BenchGeometry.of_miniature(name) for name in MINIATURES},
}


@dataclass(frozen=True)
class BenchSettings:
    geometry: str
    side: int = 2  # latent height and width divided by this (a miniature is run at its own size)
    layers: int = 4
    heads: int = 12
    head_dim: int = 128
    dtype: str = "float32"
    repeats: int = 3  # rounds of timed videos, one per mode
    device: str = "cpu"
    plan: str | None = None
    lowering: str = "inductor"  # dense runs backend=lowering; the compressed modes lower with it too

    def config(self) -> MiniConfig:
        g = GEOMETRIES[self.geometry]
        dim = self.heads * self.head_dim
        if g.miniature is not None:  # its own size; --layers, --heads and --head-dim may still change it
            mini = g.miniature
            return dataclasses.replace(mini, num_layers=self.layers, num_heads=self.heads, dim=dim,
                                       ffn_dim=mini.ffn_dim * dim // mini.dim, num_frames=3 * g.chunks)
        h, w = (x // self.side for x in g.latent)
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(f"side {self.side} leaves a {h} x {w} latent for {self.geometry}; it must be even")
        return MiniConfig(dim=dim, num_heads=self.heads, num_layers=self.layers, ffn_dim=dim, latent_height=h,
                          latent_width=w, num_frames=3 * g.chunks, window_frames=g.window_frames,
                          sink_frames=g.sink_frames, cache_style=g.cache_style)

    def head_plan(self, cfg: MiniConfig) -> HeadPlan:
        """``--plan``'s first layers at this geometry's frame size (its role parameters kept), else the reference Self
        Forcing plan's share of static heads."""
        if self.plan:
            plan = HeadPlan.load(self.plan)
            if plan.num_heads != cfg.num_heads or plan.num_layers < cfg.num_layers:
                raise PlanError(f"--plan {self.plan} has {plan.num_layers} layers x {plan.num_heads} heads, the bench's "
                                f"model {cfg.num_layers} x {cfg.num_heads}: give --heads {plan.num_heads} and at most "
                                f"--layers {plan.num_layers}")
            return dataclasses.replace(plan, roles=plan.roles[: cfg.num_layers], frame_tokens=cfg.frame_tokens,
                                       chunk_frames=cfg.chunk_frames)
        return HeadPlan.from_roles(
            [[STATIC if (h + layer) % 8 in (0, 3, 5) else DYNAMIC for h in range(cfg.num_heads)]
             for layer in range(cfg.num_layers)], frame_tokens=cfg.frame_tokens, chunk_frames=3)


def check_modes(modes: tuple[str, ...]) -> None:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown bench mode {mode!r}; expected some of {MODES}")

