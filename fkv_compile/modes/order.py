"""Whether the window an attention reads is in the order the keep rule assumes: written front to back, the query's
own chunk last.

The keep rule is positional (:mod:`fkv_compile.semantics`): a head keeps the window's first frames (the sink), the
frames just before its last chunk (recent) and that last chunk (the query's own). Caches written by appending, or
rolled so that they stay in order, are. A ring buffer is not: StreamDiffusionV2, once its cache is full, writes each
new frame over the slot its eviction queue names and attends over the whole buffer in slot order, so the query's own
frame sits inside the window and the positional rule would keep the wrong frames and drop it.

The order is proven per layer, over its calls on one pair of buffers, from the writes: each frame-sized block of
the window carries the number of the call that last saw it change. A call is in order if the blocks changed since
the layer's previous call end the window (appended, written again by a later denoising step, or shifted left by a
roll that evicts the oldest history) and every block changed no earlier than the blocks before it: the window reads
as written front to back. Buffers not seen before are in order only at a stream's start (a window of the query's
tokens alone). A call out of order runs dense.

How the changes are found:

- where the op makes the write itself (:func:`fkv_compile.ops.select_cache_attention`), the written range is known
  and nothing else wrote the buffers while their version counters did not move: no device sync. When they moved
  (eager code between calls: a Krea-style rebuild, a ring slot), or cannot tell (inference tensors), by content, as
  below, over the buffer up to the window's end;
- where the window was written by code the pass never saw (a graph break inside the pipeline's cache update: the
  ``window-input`` pattern, or a ``cache-window`` read by a graph that does not write the cache), by content: the
  first key token of each block, compared with the previous call's. A frame-aligned write of at least one frame
  changes at least one of those tokens (a write of identical values changes nothing the attention reads). Comparing
  waits for the device once per call: the price of a window whose writes the graph does not show.

(StreamDiffusionV2's ring is in order again whenever the slot it writes is the last one and the slots before it
were written in turn.) Blocks changed in the same call count as written in turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .watch import CacheMark, Touch, storage_id

__all__ = ["WindowOrder", "OUT_OF_ORDER"]

OUT_OF_ORDER = "a write landed inside the window, not at its end (a ring buffer): the keep rule's positions do not apply"


@dataclass
class _Seen:
    """A layer's previous call: its buffers and, per frame block of its window, the first token and the number of the
    call that last saw it change."""

    mark: CacheMark
    offset: int = 0  # the window's storage offset, in tokens
    firsts: torch.Tensor | None = None  # [B, H, blocks, D]
    stamps: tuple[int, ...] = ()


class WindowOrder:
    """Per layer and pair of buffers (two streams served in turns each keep their own): whether each call's window is
    in written order (module docstring)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], _Seen] = {}  # (layer, K's storage) -> the previous call over those buffers
        self._calls = 0

    @staticmethod
    def _key(layer: int, k: torch.Tensor) -> tuple[int, int]:
        return layer, storage_id(k)

    def _previous(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> _Seen | None:
        seen = self._seen.get(self._key(layer, k))
        return seen if seen is not None and seen.mark.describes(k, v) else None

    def _remember(self, layer: int, k: torch.Tensor, seen: _Seen) -> None:
        key = self._key(layer, k)
        if key not in self._seen:  # a new pair of buffers: forget the ones freed since
            self._seen = {kept: old for kept, old in self._seen.items() if old.mark.owner() is not None}
        self._seen[key] = seen

    def touched(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> bool:
        """Before a call's own write: whether something else may have written these buffers since the layer's previous
        call over them (their version counters moved, or they have none). No device sync."""
        seen = self._previous(layer, cache_k, cache_v)
        return seen is not None and seen.mark.compare(cache_k, cache_v) is not Touch.SAME

    def written(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor, write: tuple[int, int],
                window_end: int, window_tokens: int, query_tokens: int, frame_tokens: int, touched: bool) -> bool:
        """A call whose op wrote ``cache[:, write[0]:write[1]]`` (buffers ``[B, L, H, D]``) just before reading a
        window of ``window_tokens`` ending at buffer token ``window_end``; ``touched``: :meth:`touched` before that
        write. The frame blocks of the buffer up to ``window_end`` carry the number of the call that last changed
        them, as in :meth:`sampled`: untouched, only the op's write changed them (no device sync); touched, they are
        compared by content with the previous call's (one sync)."""
        self._calls += 1
        seen = self._previous(layer, cache_k, cache_v)
        firsts = cache_k[:, :window_end].transpose(1, 2)[:, :, ::frame_tokens].clone()  # [B, H, blocks, D]
        if seen is None or touched or seen.firsts is None:
            changed, stamps = self._changes(seen, 0, firsts, frame_tokens)
        else:
            blocks, known = firsts.shape[2], len(seen.stamps)
            first, last = write[0] // frame_tokens, -(-write[1] // frame_tokens)
            changed = [first <= b < last or b >= known for b in range(blocks)]
            stamps = [seen.stamps[b] if b < known else 0 for b in range(blocks)]
        stamps = [self._calls if c else s for c, s in zip(changed, stamps)]
        at_end = write[1] == window_end and write[0] >= window_end - query_tokens
        ordered = at_end and (window_tokens == query_tokens or (seen is not None and _in_turn(changed, stamps)))
        self._remember(layer, cache_k, _Seen(CacheMark.of(cache_k, cache_v), 0, firsts, tuple(stamps)))
        return ordered

    def sampled(self, layer: int, k: torch.Tensor, v: torch.Tensor, query_tokens: int, frame_tokens: int) -> bool:
        """A call over the window ``k``/``v`` ``[B, H, L, D]`` (views of the buffers) written by code outside the
        graph. The blocks that changed since the layer's previous call (blocks not seen before count as changed)
        must end the window, and every block's last change must come no earlier than the blocks before it: the
        window reads as written front to back. Buffers not seen before: only a window of the query's tokens alone."""
        self._calls += 1
        stride = k.stride(2)
        offset, rest = divmod(k.storage_offset(), stride) if stride else (0, 1)
        firsts = k[:, :, ::frame_tokens].clone()
        seen = self._previous(layer, k, v)
        if seen is not None and (rest or seen.firsts is None):
            seen = None
        changed, stamps = self._changes(seen, offset, firsts, frame_tokens)
        stamps = [self._calls if c else s for c, s in zip(changed, stamps)]
        ordered = (seen is not None or k.shape[2] == query_tokens) and _in_turn(changed, stamps)
        self._remember(layer, k, _Seen(CacheMark.of(k, v), offset, firsts, tuple(stamps)))
        return ordered

    @staticmethod
    def _changes(seen: _Seen | None, offset: int, firsts: torch.Tensor,
                 frame_tokens: int) -> tuple[list[bool], list[int]]:
        """Per frame block of the window: whether it changed since ``seen`` (blocks it did not see: yes), and the
        stamp it had then (0 if unseen). The one wait for the device."""
        blocks = firsts.shape[2]
        changed = torch.ones(blocks, dtype=torch.bool, device=firsts.device)
        stamps = [0] * blocks
        shift, rest = divmod(offset - seen.offset, frame_tokens) if seen is not None else (0, 1)
        if not rest and seen.firsts.shape[:2] == firsts.shape[:2]:
            lo, hi = max(0, -shift), min(blocks, seen.firsts.shape[2] - shift)  # the blocks seen before
            if lo < hi:
                before = seen.firsts[:, :, lo + shift:hi + shift]
                changed[lo:hi] = (firsts[:, :, lo:hi] != before).any(-1).any(1).any(0)
                stamps[lo:hi] = seen.stamps[lo + shift:hi + shift]
        return changed.tolist(), stamps


def _in_turn(changed: list[bool], stamps: list[int]) -> bool:
    """Blocks read as written front to back: those changed since the previous call end the window, and every block's
    last change comes no earlier than the blocks before it."""
    suffix = True not in changed or all(changed[changed.index(True):])
    return suffix and all(a <= b for a, b in zip(stamps, stamps[1:]))
