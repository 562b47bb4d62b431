"""``select`` mode: attention over only the kept tokens of the model's own dense window.

The keep rule (:mod:`fkv_compile.semantics`) becomes per-head token ranges (:mod:`.ranges`), and one
``range_attention`` op (:mod:`.dispatch`: Triton on GPUs, torch on CPU) attends over them, so time
scales with kept tokens, not window length. A call that does not fit the plan's geometry runs dense, and so does
one whose heads all keep their whole window (a video's first chunk): the same result without the ranges.

A chunk's denoising steps and its clean pass attend over the same history, so a layer's ranges are chosen
once per chunk (:class:`SelectionMemo`) where the buffers' version counters prove the history unchanged.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import DENSE, HeadPlan
from ..semantics import WindowLayout, window_layout
from .dispatch import TORCH, Kernels
from .ranges import select_ranges
from .sharding import HeadShard
from .watch import CacheMark, Touch

__all__ = ["KeptTokens", "SelectionMemo", "History", "compressed_attention"]

# a memo key, what a selection was chosen from: the chunk's write start and the window start, then the window's shape
# (the buffers themselves are the layer's mark: other buffers drop the entry)
History = tuple[int, ...]


@dataclass(frozen=True)
class KeptTokens:
    """Key tokens visited per head in one call, for the report: ``kept`` ``[H]`` float64 averaged over the batch,
    on the device (read by the report only, so the call does not wait for it)."""

    kept: torch.Tensor
    window: int
    layout_fits: bool


class SelectionMemo:
    """Each layer's last kept ranges and the history they were chosen from, so the calls of one chunk choose once.

    Only the op that writes the chunk into the cache itself (``fkv::select_cache_attention``, where the pass proved
    the graph's only cache accesses are that write and the window read, with no roll) gives a ``history``: the
    write's and the window's starts. It asks :meth:`before_write` and
    :meth:`after_write`, so the layer's :class:`~.watch.CacheMark` proves through the buffers' version counters
    that nothing but this op wrote them in between; if anything did (a pipeline that zeroes and rebuilds its
    cache, another video's buffers, a KV-recache), the entry is dropped and the call chooses anew. Two calls with
    the same history key and untouched buffers then see the same history: a chunk's denoising steps.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[History, torch.Tensor, torch.Tensor]] = {}
        self._marks: dict[int, CacheMark] = {}  # per layer: the buffers the op last wrote, right after
        self.chosen = 0  # calls that chose their ranges
        self.reused = 0  # calls that reused their chunk's
        self.whole = 0  # calls that needed none: every head kept the whole window

    def ranges(self, layer: int, history: History | None,
               choose: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ranges for ``history`` (``None``: unknown, choose and keep nothing)."""
        last = self._last.get(layer)
        if history is not None and last is not None and last[0] == history:
            self.reused += 1
            return last[1], last[2]
        starts, ends = choose()
        self.chosen += 1
        if history is None:
            self.forget(layer)
        else:
            self._last[layer] = (history, starts, ends)
        return starts, ends

    def before_write(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """Before the op's write: unless the layer's last write went into these buffers and nothing wrote them
        since, drop the layer's entry (its history is not the one in the buffers)."""
        mark = self._marks.get(layer)
        if mark is None or mark.compare(cache_k, cache_v) is not Touch.SAME:
            self.forget(layer)

    def after_write(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """After the op's write: mark the buffers (their version counters now)."""
        self._marks[layer] = CacheMark.of(cache_k, cache_v)

    def forget(self, layer: int) -> None:
        """Drop the layer's entry: this call's history is unknown (and may have changed)."""
        self._last.pop(layer, None)

    def dense(self, layer: int, whole_window: bool) -> None:
        """A call ran dense (``whole_window``: because its heads keep everything, else it did not fit the plan)."""
        self.forget(layer)
        self.whole += whole_window


def _keeps_whole_window(plan: HeadPlan, layer: int, layout: WindowLayout) -> bool:
    """Whether every head of ``layer`` keeps every token of the window (dense heads, or roles that drop nothing yet)."""
    return all(layout.keeps_all(plan.params(role)) for role in set(plan.roles[layer]) - {DENSE})


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: HeadPlan,
    layer: int,
    scale: float | None = None,
    kernels: Kernels = TORCH,
    shard: HeadShard | None = None,
    memo: SelectionMemo | None = None,
    history: History | None = None,
) -> tuple[torch.Tensor, KeptTokens]:
    """Attention of every head over the tokens its role keeps in the dense window.

    q: ``[B, H, Lq, D]``, k and v: ``[B, H, Lk, D]`` (any strides); returns ``[B, H, Lq, D]`` and
    the kept-token counts. ``shard``: this rank's heads under head parallelism (``plan`` is their plan).
    ``memo`` and ``history`` (the write start and the window start, ``None`` if the caller cannot tell): reuse the
    ranges chosen for the same history (see :class:`SelectionMemo`).
    """
    num_heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    layout = window_layout(lq, lk, plan.frame_tokens, plan.chunk_frames)
    spans = shard is not None and shard.spans(layer)  # the other ranks wait for this one's similarity share
    if layout is None or (not spans and _keeps_whole_window(plan, layer, layout)):
        if memo is not None:
            memo.dense(layer, whole_window=layout is not None)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        kept = torch.full((num_heads,), float(lk), dtype=torch.float64, device=q.device)
        return out, KeptTokens(kept=kept, window=lk, layout_fits=layout is not None)

    def choose() -> tuple[torch.Tensor, torch.Tensor]:
        return select_ranges(k, plan, layer, layout, kernels, shard if spans else None)

    if memo is None:
        starts, ends = choose()
    else:  # the same history gives the same choice only if the choice reads no key of the current chunk
        reusable = history is not None and layout.chosen_from_history(plan.dynamic)
        starts, ends = memo.ranges(layer, (*history, *k.shape, lq) if reusable else None, choose)
    kept_per_head = (ends - starts).sum(-1).double().mean(0)
    out = kernels.range_attention(q, k, v, starts, ends, scale)
    return out, KeptTokens(kept=kept_per_head, window=lk, layout_fits=True)
