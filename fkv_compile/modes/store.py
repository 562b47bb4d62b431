"""The compact per-layer KV store of ``compact`` mode: only what the keep rule can still ask for.

The store mirrors the dense cache's slots (frame positions in the pipeline's buffer) without
holding them: per head group it keeps the sink frames, a ring of the recent frames, for dynamic
heads the selected segments, and the current chunk, with the cache token position of every held
token (``pos``), so that the kept set can be checked against the keep rule on the dense window.

Life cycle, driven by the rewritten ops:

- ``roll(dst, src, length)``: the pipeline evicted history (``cache[dst:dst+len] = cache[src:src+len]``);
  only the slot numbers of held tokens change;
- ``write(k, v, start, end, window)``: the chunk at ``[start, end)``. The same position again
  (denoising steps, the clean pass) overwrites the current chunk. A new position first *commits*:
  the previous chunk becomes history, and for the window the upcoming calls read, the store keeps
  the sink and recent frames and selects the dynamic segments (lowest similarity, per batch item),
  dropping everything else. A write at position 0 starts a new video (reset);
- ``attention(q, window)``: each head group attends over what it holds;
- a write *before* the current chunk rewinds: the pipeline recomputes its cache from there on
  (LongLive's KV-recache after a prompt switch), keeping the model's attention sink ``[0, S)`` as
  it was. The store then starts over from that sink as if it were the video's first chunk, which it
  can only do if it held the sink whole for every head: with ``keep_protected`` (the default) it
  keeps, per head group, the sink frames the keep rule would drop in a *reserve* that attention
  never reads (costs ``S`` minus the plan's sink frames per static and dynamic head).

Exactness: the candidates of the next window lie in the recent ring or the chunk being committed
as long as ``candidate_frames <= chunk_frames`` and ``recent_frames >= 1`` for dynamic heads
(Forcing-KV's defaults: 3, 3 and 1; see :func:`compact_unsupported`); the store raises
:class:`StoreError` (never a silently different kept set) when a needed frame is not held.

Shape legend: ``B`` batch, ``G`` heads of a group, ``T`` held tokens, ``D`` head dim, ``F`` frame tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import DENSE, DYNAMIC, ROLES, HeadPlan, RoleParams
from ..semantics import WindowLayout, fixed_scores, lowest_segments, segment_table, window_layout
from .dispatch import TORCH, Kernels
from .ranges import mask_runs
from .sharding import HeadShard

__all__ = ["StoreError", "LayerStore", "compact_unsupported"]


class StoreError(RuntimeError):
    """The compact store was asked for tokens it does not hold, or was driven out of order."""


RECOMPUTE_HINT = ("; a pipeline that recomputes earlier cache positions (LongLive's KV-recache after a prompt "
                  "switch) needs tokens compact has dropped: compact serves it only for LongLive's cat(sink, window) "
                  "attention with options kv_recache=True (the default); use mode='select' for other patterns")


@dataclass
class _Held:
    """Tokens of one head group in one region: K, V ``[B, G, T, D]`` and cache positions ``[B, T]``."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor  # int64 cache token positions of the held tokens; -1 marks padding
    valid: torch.Tensor | None = None  # [B, T] bool where some tokens are padding (ragged segments)

    def nbytes(self) -> int:
        extra = self.valid.nbytes if self.valid is not None else 0
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes + extra


def _empty(b: int, g: int, d: int, like: torch.Tensor) -> _Held:
    z = like.new_empty((b, g, 0, d))
    return _Held(z, z.clone(), torch.empty((b, 0), dtype=torch.long, device=like.device))


def _cat(parts: list[_Held]) -> _Held:
    valid = None
    if any(p.valid is not None for p in parts):
        valid = torch.cat([p.valid if p.valid is not None else torch.ones_like(p.pos, dtype=torch.bool) for p in parts], 1)
    return _Held(torch.cat([p.k for p in parts], 2), torch.cat([p.v for p in parts], 2), torch.cat([p.pos for p in parts], 1), valid)


def _frame_index(src: _Held, frames: list[int], f: int) -> torch.Tensor:
    """Where the full frames ``frames`` (by cache frame slot) lie in ``src``: ``[len(frames) * F]`` indices.

    Full-frame tokens sit at the same place for every batch item: looked up in item 0.
    """
    if not frames:
        return torch.empty(0, dtype=torch.long, device=src.pos.device)
    want = [p for fr in frames for p in range(fr * f, (fr + 1) * f)]
    where = {int(p): i for i, p in enumerate(src.pos[0].tolist()) if p >= 0}
    missing = [p for p in want if p not in where]
    if missing:
        raise StoreError(f"compact store does not hold cache tokens {missing[:4]}... (frames {frames}) the keep rule "
                         f"needs{RECOMPUTE_HINT}")
    return torch.tensor([where[p] for p in want], device=src.pos.device)


def _gather(src: _Held, index: torch.Tensor, kernels: Kernels) -> _Held:
    """The tokens ``index`` ``[B, T]`` of ``src`` (``-1``: a padding slot, marked invalid)."""
    pad = index < 0
    pos = torch.where(pad, -1, torch.gather(src.pos, 1, index.clamp_min(0)))
    k, v = kernels.gather_tokens(src.k, src.v, index)
    return _Held(k, v, pos, ~pad if bool(pad.any()) else None)


class _GroupStore:
    """Held tokens of the heads of one role in one layer, in one buffer: the history (sink, recent and
    selected tokens), then the current chunk. A commit builds it once per chunk; the chunk's later
    writes (denoising steps) overwrite its tail in place, so attention reads it without a copy."""

    def __init__(self, role: str, heads: list[int], params: RoleParams | None):
        self.role, self.heads, self.params = role, heads, params
        self.held: _Held | None = None
        self.chunk_tokens = 0  # the current chunk is the last chunk_tokens of held
        self.reserve: _Held | None = None  # protected sink tokens the keep rule dropped, kept for a rewind
        # the ranges attention reads, for one window and one held.pos tensor (a new one whenever positions change)
        self._runs: tuple[tuple[int, int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._head_index: torch.Tensor | None = None

    def history(self) -> _Held | None:
        if self.held is None:
            return None
        n = self.held.k.shape[2] - self.chunk_tokens
        h = self.held
        return _Held(h.k[:, :, :n], h.v[:, :, :n], h.pos[:, :n], None if h.valid is None else h.valid[:, :n])

    def head_index(self, device: torch.device) -> torch.Tensor:
        """The group's heads as an index tensor on ``device`` (made once)."""
        if self._head_index is None or self._head_index.device != device:
            self._head_index = torch.tensor(self.heads, device=device)
        return self._head_index

    def put_chunk(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, again: bool) -> None:
        """The chunk's K, V ``[B, L, H, D]`` (any strides; the group's heads are taken) at cache positions ``pos``
        ``[B, L]``; ``again``: the chunk put last, once more (a later denoising step or the clean pass), written
        over the tail of the held buffer with one copy."""
        heads = self.head_index(k.device)
        k_heads, v_heads = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views
        if again:
            n = self.chunk_tokens
            torch.index_select(k_heads, 1, heads, out=self.held.k[:, :, -n:])
            torch.index_select(v_heads, 1, heads, out=self.held.v[:, :, -n:])
            return
        history = self.history()
        if history is None:
            history = _empty(k.shape[0], len(self.heads), k.shape[-1], k)
        self.held = _cat([history, _Held(k_heads.index_select(1, heads), v_heads.index_select(1, heads), pos)])
        self.chunk_tokens = k.shape[1]

    def set_history(self, history: _Held) -> None:
        """After a commit: only the history remains until the next chunk is put."""
        self.held, self.chunk_tokens = history, 0

    def nbytes(self) -> int:
        return sum(h.nbytes() for h in (self.held, self.reserve) if h is not None)

    def runs(self, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``starts, ends`` ``[B, G, R]`` of the held tokens in ``window`` and the heads ``[G]``: made once per chunk
        (the later calls of a chunk, its denoising steps, change the held values, not their positions)."""
        held = self.held
        if self._runs is None or self._runs[0] != window or self._runs[1] is not held.pos:
            attendable = (held.pos >= window[0]) & (held.pos < window[1])  # padding: pos -1, evicted: -2
            if not bool(attendable.any(1).all()):
                raise StoreError(f"compact store: attention over window {window}, but the {self.role} heads hold none "
                                 f"of its tokens{RECOMPUTE_HINT}")
            starts, ends = mask_runs(attendable)
            group = (-1, len(self.heads), -1)
            self._runs = (window, held.pos, starts[:, None].expand(group), ends[:, None].expand(group),
                          self.head_index(held.pos.device))
        return self._runs[2:]


def compact_unsupported(plan: HeadPlan) -> str | None:
    """Why the store cannot reproduce ``plan``'s kept sets exactly, or ``None`` when it can.

    At a commit the store holds the recent ring and the chunk being committed: the next window's
    candidates and the frames after them lie there when ``1 <= recent_frames`` (the frame after
    the last candidate is history, not the chunk still being denoised) and
    ``candidate_frames <= chunk_frames``.
    """
    if not plan.count(DYNAMIC):
        return None
    p = plan.dynamic
    if p.candidate_frames and p.selected_segments:
        if p.recent_frames < 1:
            return "compact needs dynamic recent_frames >= 1 (the last candidate's next frame must be history)"
        if p.candidate_frames > plan.chunk_frames:
            return (f"compact needs candidate_frames <= chunk_frames, got {p.candidate_frames} > {plan.chunk_frames}")
        if plan.selection != "layer":
            return "NYI: compact mode with selection='head'; use selection='layer'"
    return None


class LayerStore:
    """The compact KV of one layer (all head groups), driven by ``write``/``roll``/``attention``."""

    def __init__(self, plan: HeadPlan, layer: int, kernels: Kernels = TORCH, keep_protected: bool = True,
                 shard: HeadShard | None = None):
        reason = compact_unsupported(plan if shard is None else shard.plan)
        if reason:
            raise StoreError(reason)
        self.plan, self.layer = plan, layer
        self.shard = shard if shard is not None and shard.spans(layer) else None  # this rank's heads' share
        self.kernels = kernels  # the implementation of the commit's gathers, the similarity and the attention
        self.groups = [
            _GroupStore(role, list(plan.heads(layer, role)), plan.params(role) if role != DENSE else None)
            for role in ROLES
            if plan.heads(layer, role)
        ]
        self.chunk: tuple[int, int] | None = None  # cache token range of the current chunk
        self.window: tuple[int, int] | None = None
        self.rolled = False
        self.keep_protected = keep_protected
        self.protected = 0  # the model's attention sink [0, protected), read in front of every window

    # -- driving ---------------------------------------------------------------------------------
    def reset(self) -> None:
        for g in self.groups:
            g.held, g.chunk_tokens, g.reserve = None, 0, None
        self.chunk = self.window = None
        self.rolled = False

    def roll(self, dst: int, src: int, length: int) -> None:
        """The dense cache moved tokens ``[src, src + length)`` to ``[dst, dst + length)``."""
        if self.chunk is None:
            raise StoreError("compact store: a roll before any write")
        shift = src - dst
        for g in self.groups:
            held = g.held
            if held is None:
                continue
            moved = (held.pos >= src) & (held.pos < src + length)
            evicted = (held.pos >= dst) & (held.pos < src)
            held.pos = torch.where(moved, held.pos - shift, torch.where(evicted, -2, held.pos))
        self.rolled = True  # the pipeline rolls only for a new chunk, possibly at the same slots as the last

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int, end: int, window: tuple[int, int],
              protected: int = 0) -> None:
        """Store the chunk ``k``, ``v`` ``[B, L, H, D]`` written at cache tokens ``[start, end)``; ``protected``:
        the model's attention sink ``[0, protected)`` read in front of the window (LongLive), else 0."""
        self.protected = protected
        if start == 0 and self.chunk is not None and self.chunk[0] != 0:
            self.reset()  # the pipeline went back to the start of the cache: a new video
        if self.chunk is not None and 0 < start and (start < self.chunk[0] or start == end) and not self.rolled:
            self._rewind(start)  # an empty write: a recomputed chunk inside the protected sink
        if start == end:  # a recomputation's first chunk lies in the protected sink: nothing is written
            self.window = window
            return
        again = self.chunk is not None and not self.rolled and (start, end) == self.chunk
        if self.chunk is not None and not again:
            self._commit(window)
            self.rolled = False
        elif self.chunk is None and start != 0:
            raise StoreError(f"compact store: the first write must start a video at position 0, got {start}")
        self._put(k, v, start, again)
        self.window = window

    def adopt(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Take the dense cache's tokens ``k``, ``v`` ``[B, L, H, D]`` at cache tokens ``[start, start + L)`` as if
        they were the last chunk, so that the next write commits them under the keep rule: a store that starts
        within a video (calibration ended there) begins with the window's dense history."""
        if self.chunk is not None:
            raise StoreError("compact store: only an unused store can adopt the dense history")
        self._put(k, v, start, again=False)

    def _rewind(self, start: int) -> None:
        """The pipeline recomputes its cache from ``start`` on and keeps ``[0, start)``: start over from there."""
        f = self.plan.frame_tokens
        if not self.keep_protected or start > self.protected or start % f:
            if not self.protected:
                reason = "the attention reads no protected sink in front of its window to start over from"
            elif start > self.protected or start % f:
                reason = f"the kept prefix [0, {start}) is not the model's attention sink [0, {self.protected})"
            else:
                reason = "options kv_recache=False dropped the sink frames the keep rule does not keep"
            raise StoreError(f"compact store: a write at cache token {start}, before the current chunk at "
                             f"{self.chunk[0]}: {reason}{RECOMPUTE_HINT}")
        frames = list(range(start // f))
        prefixes = []
        for g in self.groups:
            parts = [h for h in (g.history(), g.reserve) if h is not None]
            held = _cat(parts)
            prefixes.append(_gather(held, _frame_index(held, frames, f).expand(held.pos.shape[0], -1), self.kernels))
        for g, prefix in zip(self.groups, prefixes):
            g.held, g.chunk_tokens = prefix, start
        self.chunk, self.window, self.rolled = (0, start), None, False

    def _put(self, k: torch.Tensor, v: torch.Tensor, start: int, again: bool) -> None:
        end = start + k.shape[1]
        pos = torch.arange(start, end, device=k.device).expand(k.shape[0], -1)
        for g in self.groups:
            g.put_chunk(k, v, pos, again)
        self.chunk = (start, end)

    def _commit(self, window: tuple[int, int]) -> None:
        """The current chunk becomes history; keep only what the window ``[a, e)`` can use."""
        f = self.plan.frame_tokens
        a, e = window
        layout = window_layout(self.plan.chunk_tokens, e - a, f, self.plan.chunk_frames)
        if layout is None or a % f:
            raise StoreError(f"compact store: window [{a}, {e}) does not fit the plan's geometry")
        first = a // f
        for g in self.groups:
            old = g.held
            if g.role == DENSE:
                keep = old.pos[0] >= a
                g.set_history(_Held(old.k[:, :, keep], old.v[:, :, keep], old.pos[:, keep]))
                continue
            p = g.params
            sink = [first + j for j in layout.sink(p)]
            fixed = _frame_index(old, sink + [first + j for j in layout.recent(p)], f)
            index = fixed.expand(old.pos.shape[0], -1)
            if g.role == DYNAMIC:
                index = torch.cat([index, self._select(old, layout, first, p)], 1)
            self._reserve(g, old, sink)
            g.set_history(_gather(old, index, self.kernels))
        if self.shard is not None and not self.plan.heads(self.layer, DYNAMIC):
            self._similarity(self.groups[0].held, len(layout.candidates(self.plan.dynamic)))  # this rank's zeros

    def _reserve(self, g: _GroupStore, old: _Held, sink: list[int]) -> None:
        """Keep the protected sink frames in ``old`` the keep rule may drop (all but the window's ``sink``)."""
        if not self.keep_protected or self.chunk[0] >= self.protected:  # the chunk committed is past the sink
            return
        f = self.plan.frame_tokens
        reserved = set() if g.reserve is None else {int(p) // f for p in g.reserve.pos[0].tolist()}
        present = {int(p) // f for p in old.pos[0].tolist() if 0 <= p < self.protected}
        frames = sorted(present - reserved - set(sink))
        if frames:
            new = _gather(old, _frame_index(old, frames, f).expand(old.pos.shape[0], -1), self.kernels)
            g.reserve = new if g.reserve is None else _cat([g.reserve, new])

    def _select(self, old: _Held, layout: WindowLayout, first: int, p: RoleParams) -> torch.Tensor:
        """Indices ``[B, T]`` into ``old`` of the selected segments' tokens (``-1``: padding of short
        segments), one selection per batch item over all the group's heads."""
        cands = list(layout.candidates(p))
        b = old.pos.shape[0]
        if not cands or p.selected_segments == 0:
            return old.pos.new_empty((b, 0))
        f = layout.frame_tokens
        region_index = _frame_index(old, [first + j for j in cands] + [first + cands[-1] + 1], f)
        sim = fixed_scores(self.plan.segment_choice, p, len(cands), b, 1, old.k.device)
        if sim is None:
            sim = self._similarity(_gather(old, region_index.expand(b, -1), self.kernels), len(cands))
        chosen = lowest_segments(sim, p)[:, 0]  # [B, k]
        table = segment_table(f, p.segments_per_frame, len(cands), old.k.device)
        tokens = table.start[chosen][..., None] + torch.arange(table.max_length, device=old.k.device)  # [B, k, Lseg]
        valid = tokens < table.end[chosen][..., None]
        return torch.where(valid, region_index[torch.where(valid, tokens, 0)], -1).flatten(1)

    def _similarity(self, region: _Held, num_candidates: int) -> torch.Tensor:
        """Similarity ``[B, 1, nc * P]`` of the candidate frames and the frame after them, ``region``'s tokens in
        order, over all the group's heads (under head parallelism: every rank's dynamic heads)."""
        p = self.plan.dynamic
        if not num_candidates or p.selected_segments == 0:
            return region.k.new_empty((region.k.shape[0], 1, 0), dtype=torch.float32)
        f, heads = self.plan.frame_tokens, self.plan.heads(self.layer, DYNAMIC)
        if self.shard is not None:
            return self.shard.layer_similarity(region.k, tuple(range(len(heads))), 0, num_candidates, f,
                                               p.segments_per_frame)
        everyone = torch.arange(len(heads), device=region.k.device)[None]
        return self.kernels.segment_similarity(region.k, everyone, 0, num_candidates, f, p.segments_per_frame)

    # -- reading ---------------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, window: tuple[int, int], scale: float | None) -> torch.Tensor:
        """q ``[B, H, Lq, D]`` over the held tokens of each head group; ``[B, H, Lq, D]``."""
        if self.window != window or self.chunk is None:
            raise StoreError(f"compact store: attention over window {window} but the last write set up {self.window}")
        out = q.new_empty(q.shape[:3] + (self.groups[0].held.v.shape[-1],))
        for g in self.groups:
            starts, ends, heads = g.runs(window)
            self.kernels.range_attention(q, g.held.k, g.held.v, starts, ends, scale, q_heads=heads, out=out)
        return out

    def kept_counts(self, num_heads: int) -> torch.Tensor:
        """Float ``[H]``: tokens of the last window each head attends to, averaged over the batch (no host sync)."""
        counts = torch.zeros(num_heads, device=self.groups[0].held.pos.device)
        for g in self.groups:
            starts, ends, _ = g.runs(self.window)
            counts[g.heads] = (ends[:, 0] - starts[:, 0]).sum(-1).float().mean()
        return counts

    def kept_mask(self, num_heads: int) -> torch.Tensor:
        """Bool ``[B, H, e - a]`` over the last window ``[a, e)``: the tokens each head attends to."""
        a, e = self.window
        b = self.groups[0].held.pos.shape[0]
        mask = torch.zeros(b, num_heads, e - a, dtype=torch.bool, device=self.groups[0].held.pos.device)
        for g in self.groups:
            held = g.held
            ok = (held.pos >= a) & (held.pos < e)
            if held.valid is not None:
                ok &= held.valid
            for bi in range(b):
                mask[bi, g.heads[0], held.pos[bi][ok[bi]] - a] = True
            mask[:, g.heads] = mask[:, g.heads[:1]]
        return mask

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def reserve_nbytes(self) -> int:
        """Of :meth:`nbytes`: the protected sink frames held only for a rewind (KV-recache)."""
        return sum(g.reserve.nbytes() for g in self.groups if g.reserve is not None)

    def nbytes_per_head(self) -> dict[int, float]:
        return {h: g.nbytes() / len(g.heads) for g in self.groups for h in g.heads}
