"""The specification: which KV tokens each head keeps in one attention call, and the masked-dense oracle.

This module owns the rule: the window's geometry (which frames are sink, recent, candidates and the
current chunk, and when a call fits the plan at all), the segment bounds, the number ``k`` of
selected segments and the lowest-``k`` choice. The run-time paths (:mod:`fkv_compile.modes`: the
token ranges of ``select``, the compact store, the Triton kernels fed from them) take these pieces
from here and are tested against :func:`keep_mask` / :func:`oracle_attention`, which favour being
obviously right over being fast: loops over frames and segments, plain torch, float64 on CPU.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``D`` head dim,
``F`` tokens per frame, ``C`` frames per chunk, ``P`` segments per frame.

The rule (Forcing-KV, arXiv 2605.09681; docs/design.md), for a window of
``n = Lk / F`` frames whose last ``C`` frames are the current chunk, ``h = n - C`` history frames:

- sink = frames ``[0, min(S, h))``; recent = ``[max(S, h - R), h)``;
  dynamic candidates = ``[max(S, h - R - N_c), h - R)``; the current chunk is always kept;
- segment ``j`` of a frame = tokens ``[floor(j F / P), floor((j + 1) F / P))``;
- similarity of a candidate segment = mean over its tokens of the cosine between the token's key
  and the key of the same token in the next frame;
- ``k = min(floor(N_c P r + 0.5), candidate segments available)``; keep the ``k`` lowest
  similarities, ties to the lower (frame-major) index;
- the baselines of ``plan.segment_choice`` replace the similarities by fixed scores
  (:func:`baseline_scores`): same ``k``, same tie rule;
- a call whose ``Lq != C F`` or whose ``Lk`` is not a whole number of frames (or holds fewer than
  ``C`` frames) stays dense.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .plan import COMPRESSED_ROLES, DENSE, DYNAMIC, HeadPlan, RoleParams

__all__ = [
    "COSINE_EPS",
    "WindowLayout",
    "window_layout",
    "segment_bounds",
    "SegmentTable",
    "segment_table",
    "check_candidate_region",
    "candidate_similarity",
    "selected_count",
    "lowest_segments",
    "baseline_scores",
    "fixed_scores",
    "selection_keys",
    "keep_mask",
    "oracle_attention",
    "kept_token_count",
    "RankCosts",
    "rank_costs",
]

COSINE_EPS = 1e-8
"""Norms below this are clamped in the cosine, so all-zero keys have similarity 0, not NaN."""


@dataclass(frozen=True)
class WindowLayout:
    """Frame structure of one attention call's KV window."""

    frame_tokens: int
    chunk_frames: int
    frames: int

    @property
    def history(self) -> int:
        return self.frames - self.chunk_frames

    def sink(self, p: RoleParams) -> range:
        return range(0, min(p.sink_frames, self.history))

    def recent(self, p: RoleParams) -> range:
        return range(max(p.sink_frames, self.history - p.recent_frames), self.history)

    def candidates(self, p: RoleParams) -> range:
        end = self.history - p.recent_frames
        return range(max(p.sink_frames, end - p.candidate_frames), end)

    def current(self) -> range:
        return range(self.history, self.frames)

    def chosen_from_history(self, p: RoleParams) -> bool:
        """Whether the role's segment choice reads history keys only: the similarity's partner frame after the last
        candidate is a recent frame, not the current chunk's first (``recent_frames >= 1``, or no candidates)."""
        candidates = self.candidates(p)
        return not candidates or candidates.stop < self.history

    def keeps_all(self, p: RoleParams) -> bool:
        """Whether a head of the role keeps every token of this window: its sink and recent frames cover the whole
        history (then no frame is a candidate either), as in a video's first chunks."""
        return self.history <= p.sink_frames + p.recent_frames

    def tokens(self, frames: range) -> range:
        return range(frames.start * self.frame_tokens, frames.stop * self.frame_tokens) if frames else range(0)


def window_layout(lq: int, lk: int, frame_tokens: int, chunk_frames: int) -> WindowLayout | None:
    """The window's frame layout, or ``None`` when the call does not fit the geometry (stays dense)."""
    if lq != chunk_frames * frame_tokens or lk % frame_tokens != 0 or lk < lq:
        return None
    return WindowLayout(frame_tokens=frame_tokens, chunk_frames=chunk_frames, frames=lk // frame_tokens)


def segment_bounds(frame_tokens: int, segments: int) -> list[tuple[int, int]]:
    """Token bounds ``[start, end)`` of each raster band of a frame."""
    return [(j * frame_tokens // segments, (j + 1) * frame_tokens // segments) for j in range(segments)]


@dataclass(frozen=True)
class SegmentTable:
    """:func:`segment_bounds` of ``nc`` consecutive candidate frames as tensors, positions relative to the
    first candidate's first token, frame-major: what the vectorized paths index with."""

    start: torch.Tensor  # [nc * P] int64
    end: torch.Tensor  # [nc * P] int64
    max_length: int


@functools.lru_cache(maxsize=256)
def segment_table(frame_tokens: int, segments: int, num_candidates: int, device: torch.device) -> SegmentTable:
    bounds = torch.tensor(segment_bounds(frame_tokens, segments), dtype=torch.long).reshape(segments, 2)
    offsets = torch.arange(num_candidates)[:, None] * frame_tokens
    start, end = (offsets + bounds[:, 0]).flatten(), (offsets + bounds[:, 1]).flatten()
    max_length = int((bounds[:, 1] - bounds[:, 0]).max())
    return SegmentTable(start=start.to(device), end=end.to(device), max_length=max_length)


def check_candidate_region(length: int, first_frame: int, num_candidates: int, frame_tokens: int,
                           segments: int) -> None:
    """The ``segment_similarity`` op's contract (torch and Triton alike): the candidates and the frame after
    them lie within ``length`` key tokens, and every segment holds a token."""
    need = (first_frame + num_candidates + 1) * frame_tokens
    if need > length:
        raise ValueError(f"segment_similarity: frames {first_frame}..{first_frame + num_candidates} and the next need "
                         f"{need} tokens, keys hold {length}")
    if segments > frame_tokens:
        raise ValueError(f"segment_similarity: {segments} segments of a {frame_tokens}-token frame would be empty")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over the last dim, computed in at least float32."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    na = a.norm(dim=-1).clamp_min(COSINE_EPS)
    nb = b.norm(dim=-1).clamp_min(COSINE_EPS)
    return (a * b).sum(-1) / (na * nb)


def candidate_similarity(keys: torch.Tensor, layout: WindowLayout, p: RoleParams) -> torch.Tensor:
    """Similarity of every candidate segment, frame-major.

    keys: ``[B, G, Lk, E]``: ``G`` independent selections (one per head, or 1 for heads
    concatenated into ``E = heads * D``). Returns ``[B, G, len(candidates) * P]``.
    """
    f = layout.frame_tokens
    sims = []
    for frame in layout.candidates(p):
        for start, end in segment_bounds(f, p.segments_per_frame):
            here = keys[:, :, frame * f + start : frame * f + end]
            nxt = keys[:, :, (frame + 1) * f + start : (frame + 1) * f + end]
            sims.append(_cosine(here, nxt).mean(-1))
    if not sims:
        return keys.new_zeros((keys.shape[0], keys.shape[1], 0), dtype=torch.promote_types(keys.dtype, torch.float32))
    return torch.stack(sims, dim=-1)


def selected_count(p: RoleParams, available: int) -> int:
    """``k``: the segments a dynamic head selects among ``available`` candidate segments."""
    return min(p.selected_segments, available)


def lowest_segments(scores: torch.Tensor, p: RoleParams) -> torch.Tensor:
    """The keep rule's choice: indices ``[..., k]`` of the ``k`` lowest ``scores`` along the last dim, ties to
    the lower index, in increasing (window) order."""
    k = selected_count(p, scores.shape[-1])
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


@functools.lru_cache(maxsize=256)
def baseline_scores(choice: str, num_segments: int, selected: int, device: torch.device) -> torch.Tensor:
    """Float32 scores ``[num_segments]`` (frame-major) whose ``selected`` lowest are a baseline's choice:
    ``random``: a seeded random permutation (the same set for every call with this many candidates);
    ``even``: ``selected`` segments evenly spaced from the first to the last; ``recent``: the latest."""
    if choice == "random":
        scores = torch.randperm(num_segments, generator=torch.Generator().manual_seed(0)).float()
    elif choice == "even":
        scores = torch.ones(num_segments)
        if selected:
            scores[torch.linspace(0, num_segments - 1, selected).round().long()] = 0.0
    elif choice == "recent":
        scores = -torch.arange(num_segments, dtype=torch.float32)
    else:
        raise ValueError(f"baseline segment_choice expected 'random', 'even' or 'recent', got {choice!r}")
    return scores.to(device)


def fixed_scores(choice: str, p: RoleParams, num_candidates: int, batch: int, groups: int,
                 device: torch.device) -> torch.Tensor | None:
    """A baseline ``segment_choice``'s scores ``[B, G, nc * P]``, or ``None`` for ``similarity`` (computed from keys)."""
    if choice == "similarity":
        return None
    n = num_candidates * p.segments_per_frame
    return baseline_scores(choice, n, selected_count(p, n), device).expand(batch, groups, n)


def selection_keys(k: torch.Tensor, heads: tuple[int, ...], selection: str) -> torch.Tensor:
    """``[B, G, Lk, E]`` keys the selection runs over: per head, or dynamic heads concatenated."""
    dyn = k[:, list(heads)]  # [B, Hd, Lk, D]
    if selection == "head":
        return dyn
    return dyn.transpose(1, 2).flatten(2).unsqueeze(1)  # [B, 1, Lk, Hd * D]


def keep_mask(k: torch.Tensor, plan: HeadPlan, layer: int, lq: int) -> torch.Tensor:
    """Boolean ``[B, H, Lk]``: which key tokens each head of ``layer`` keeps. k: ``[B, H, Lk, D]``."""
    b, num_heads, lk, _ = k.shape
    if num_heads != plan.num_heads:
        raise ValueError(f"keys expected {plan.num_heads} heads (plan), got H={num_heads}")
    mask = torch.ones((b, num_heads, lk), dtype=torch.bool, device=k.device)
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    if layout is None:
        return mask
    for role in COMPRESSED_ROLES:
        heads = plan.heads(layer, role)
        if not heads:
            continue
        p = plan.params(role)
        fixed = torch.zeros(lk, dtype=torch.bool, device=k.device)
        for frames in (layout.sink(p), layout.recent(p), layout.current()):
            t = layout.tokens(frames)
            fixed[t.start : t.stop] = True
        role_mask = fixed.expand(b, len(heads), lk).clone()
        if role == DYNAMIC:
            keys = selection_keys(k, heads, plan.selection)
            scores = fixed_scores(plan.segment_choice, p, len(layout.candidates(p)), b, keys.shape[1], k.device)
            if scores is None:
                scores = candidate_similarity(keys, layout, p)
            chosen = lowest_segments(scores, p)  # [B, G, k]
            bounds = segment_bounds(layout.frame_tokens, p.segments_per_frame)
            candidates = list(layout.candidates(p))
            for bi in range(b):
                for g in range(chosen.shape[1]):
                    rows = range(len(heads)) if keys.shape[1] == 1 else (g,)
                    for idx in chosen[bi, g].tolist():
                        frame = candidates[idx // p.segments_per_frame]
                        start, end = bounds[idx % p.segments_per_frame]
                        t0 = frame * layout.frame_tokens
                        for r in rows:
                            role_mask[bi, r, t0 + start : t0 + end] = True
        mask[:, list(heads)] = role_mask
    return mask


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HeadPlan,
    layer: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention over the kept tokens only: SDPA with the keep rule as a boolean mask.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lk, D]``; returns ``[B, H, Lq, D]`` in q's dtype.
    """
    mask = keep_mask(k, plan, layer, q.shape[-2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=scale)


def kept_token_count(plan: HeadPlan, role: str, frames: int) -> float:
    """Key tokens a head of ``role`` keeps in a window of ``frames`` frames (current chunk included).

    Selected segments count at their mean length ``F / P``; windows shorter than a chunk are dense.
    """
    f = plan.frame_tokens
    if role == DENSE or frames < plan.chunk_frames:
        return float(frames * f)
    layout = WindowLayout(frame_tokens=f, chunk_frames=plan.chunk_frames, frames=frames)
    p = plan.params(role)
    kept = sum(len(layout.tokens(r)) for r in (layout.sink(p), layout.recent(p), layout.current()))
    if role == DYNAMIC:
        available = len(layout.candidates(p)) * p.segments_per_frame
        kept += selected_count(p, available) * f / p.segments_per_frame
    return float(kept)


@dataclass(frozen=True)
class RankCosts:
    """Key tokens each rank attends to under head parallelism, per layer: ``per_layer[layer][rank]``."""

    per_layer: tuple[tuple[float, ...], ...]

    def per_rank(self) -> tuple[float, ...]:
        return tuple(map(sum, zip(*self.per_layer)))

    @property
    def imbalance(self) -> float:
        """Every layer waits for its slowest rank (the all-to-all after attention): the sum over layers of the
        largest rank's tokens over the sum of the means (1.0: balanced)."""
        slowest = sum(max(layer) for layer in self.per_layer)
        mean = sum(sum(layer) / len(layer) for layer in self.per_layer)
        return slowest / mean if mean else 1.0


def rank_costs(plan: HeadPlan, shards: Sequence[range], window_frames: int) -> RankCosts:
    """Key tokens per chunk of every rank holding the heads ``shards[rank]`` of ``plan``, at a window of
    ``window_frames`` frames (:func:`kept_token_count` per head)."""
    return RankCosts(tuple(
        tuple(sum(kept_token_count(plan, plan.roles[layer][h], window_frames) for h in heads) for heads in shards)
        for layer in range(plan.num_layers)))
