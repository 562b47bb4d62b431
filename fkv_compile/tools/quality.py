"""Quality harness: how far each KV policy's attention is from dense attention on video-like content.

Latent videos ``[T, C, H, W]`` are generated procedurally and seeded: a smooth random background;
objects (Gaussian blobs with their own features) moving in straight lines; a camera pan (the
background translating); a scene cut (a new background from a frame inside the candidate
frames on). Tokens are 2 x 2 patches; keys, values and queries are fixed random projections of
the patch features per head, with rotary embeddings at absolute (frame, row, column) positions,
as video DiTs do. For the last chunk of each video, every policy (:mod:`fkv_compile.policies`)
is scored by the relative L2 error of its attention output against dense attention, per head,
averaged over heads and videos. Everything runs in float64 on CPU.

The default video is the dynamic role's *decision window*: sink, candidate frames, recent frame
and current chunk (8 frames), so that every policy keeps the same frames except among the
candidates and the errors measure the choice of segments. In a longer window every policy also
drops the same older frames, whose error then dominates and hides the choice (``frames=21``
shows it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..plan import DYNAMIC, HeadPlan
from .policies import POLICIES, masked_attention, policy_mask

__all__ = ["CONTENTS", "QualityConfig", "QualityResult", "make_video", "video_qkv", "evaluate"]

CONTENTS: tuple[str, ...] = ("static", "moving", "pan", "cut")


@dataclass(frozen=True)
class QualityConfig:
    frames: int = 8  # sink 1 + candidates 3 + recent 1 + chunk 3: see the module docstring
    chunk_frames: int = 3
    height: int = 16  # latent size; tokens per frame = height * width / 4
    width: int = 24
    channels: int = 8
    heads: int = 4
    head_dim: int = 32
    objects: int = 4
    noise: float = 0.02
    sharpness: float = 2.0  # scales the query/key projections: higher = more peaked attention
    videos: int = 3
    seed: int = 0

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width // 4

    def plan(self) -> HeadPlan:
        """The geometry and Forcing-KV's default dynamic role (sink 1, recent 1, 3 candidates, 6 segments)."""
        return HeadPlan.uniform(DYNAMIC, num_layers=1, num_heads=self.heads, frame_tokens=self.frame_tokens,
                                chunk_frames=self.chunk_frames)


@dataclass(frozen=True)
class QualityResult:
    config: QualityConfig
    errors: dict[str, dict[str, float]]  # content -> policy -> mean relative error vs dense
    kept: dict[str, float]  # policy -> kept tokens per head / window tokens
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'content':<8} " + " ".join(f"{p:>13}" for p in POLICIES),
                 f"{'kept':<8} " + " ".join(f"{self.kept[p]:>13.3f}" for p in POLICIES)]
        for content, row in self.errors.items():
            lines.append(f"{content:<8} " + " ".join(f"{row[p]:>13.4f}" for p in POLICIES))
        return "\n".join(lines + self.notes)

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "errors": self.errors, "kept": self.kept, "notes": self.notes}


def _smooth_field(cfg: QualityConfig, gen: torch.Generator, width: int) -> torch.Tensor:
    coarse = torch.randn(1, cfg.channels, cfg.height // 4 + 1, width // 4 + 1, generator=gen, dtype=torch.float64)
    return F.interpolate(coarse, size=(cfg.height, width), mode="bilinear", align_corners=True)[0]


def make_video(content: str, cfg: QualityConfig, gen: torch.Generator) -> torch.Tensor:
    """A latent video ``[T, C, H, W]`` of the given content kind."""
    t_, c, h, w = cfg.frames, cfg.channels, cfg.height, cfg.width
    if content == "pan":  # one pixel per frame across a wider background
        wide = _smooth_field(cfg, gen, w + t_)
        video = torch.stack([wide[:, :, t:t + w] for t in range(t_)])
    else:
        video = _smooth_field(cfg, gen, w).expand(t_, c, h, w).clone()
    if content == "cut":  # inside the dynamic candidates of the last chunk's window
        video[t_ - cfg.chunk_frames - 2:] = _smooth_field(cfg, gen, w)
    if content == "moving":
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        for _ in range(cfg.objects):
            feature = 2 * torch.randn(c, generator=gen, dtype=torch.float64)
            start = torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([h, w])
            velocity = (torch.rand(2, generator=gen, dtype=torch.float64) - 0.5) * 3.0
            for t in range(t_):
                y, x = start + velocity * t
                blob = torch.exp(-((ys - y % h) ** 2 + (xs - x % w) ** 2) / (2 * 1.5**2))
                video[t] += feature[:, None, None] * blob
    return video + cfg.noise * torch.randn(video.shape, generator=gen, dtype=torch.float64)


def _rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over three position axes, one third of the (even) head dim each. x ``[L, H, D]``."""
    d = x.shape[-1]
    parts = [d // 3 // 2 * 2, d // 3 // 2 * 2]
    parts.append(d - sum(parts))
    out, start = [], 0
    for axis, size in enumerate(parts):
        half = size // 2
        inv = 1.0 / (100.0 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
        angle = positions[:, axis, None].double() * inv  # [L, half]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        a, b = x[..., start:start + half], x[..., start + half:start + size]
        out += [a * cos - b * sin, a * sin + b * cos]
        start += size
    return torch.cat(out, -1)


def video_qkv(video: torch.Tensor, cfg: QualityConfig, gen: torch.Generator):
    """Queries of the last chunk ``[1, H, C F, D]``, keys and values of the whole video ``[1, H, T F, D]``."""
    t_, c, h, w = video.shape
    patches = video.unfold(2, 2, 2).unfold(3, 2, 2)  # [T, C, H/2, W/2, 2, 2]
    feats = patches.permute(0, 2, 3, 1, 4, 5).reshape(t_ * (h // 2) * (w // 2), c * 4)
    grid = torch.stack(torch.meshgrid(torch.arange(t_), torch.arange(h // 2), torch.arange(w // 2), indexing="ij"), -1)
    positions = grid.reshape(-1, 3)
    dim = cfg.heads * cfg.head_dim
    wq, wk, wv = (torch.randn(c * 4, dim, generator=gen, dtype=torch.float64) / (c * 4) ** 0.5 for _ in range(3))
    q, k, v = ((feats @ m).view(-1, cfg.heads, cfg.head_dim) for m in (wq * cfg.sharpness, wk * cfg.sharpness, wv))
    q, k = _rotary(q, positions), _rotary(k, positions)
    chunk = cfg.chunk_frames * cfg.frame_tokens
    return (q[-chunk:].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])


def evaluate(cfg: QualityConfig = QualityConfig(), contents: tuple[str, ...] = CONTENTS) -> QualityResult:
    """Mean relative attention-output error of every policy vs dense attention, per content kind."""
    plan = cfg.plan()
    errors: dict[str, dict[str, float]] = {}
    kept: dict[str, float] = {}
    for content in contents:
        sums = dict.fromkeys(POLICIES, 0.0)
        for video_index in range(cfg.videos):
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + video_index)
            q, k, v = video_qkv(make_video(content, cfg, gen), cfg, gen)
            dense = F.scaled_dot_product_attention(q, k, v)
            for policy in POLICIES:
                mask = policy_mask(policy, k, plan, q.shape[2])
                out = masked_attention(q, k, v, mask)
                rel = (out - dense).flatten(2).norm(dim=-1) / dense.flatten(2).norm(dim=-1)  # [1, H]
                sums[policy] += float(rel.mean()) / cfg.videos
                kept[policy] = float(mask.sum(-1).double().mean()) / k.shape[2]
        errors[content] = sums
    notes = [f"similarity selection does not beat {other} selection on '{c}' content"
             for c in errors for other in ("random", "even") if errors[c]["forcing-kv"] >= errors[c][other]]
    return QualityResult(cfg, errors, kept, notes)
