"""What the matcher finds: attention sites over windows of a KV cache, and the calls it declines.

How keys and values are read from a cache (:class:`CachePattern`):

- ``cache-window``: a slice along one dim of a graph input (the cache buffer, e.g.
  ``L['kv_cache'][3]['k']``), or
- ``cat-growth``: ``torch.cat([history, new], dim)`` where ``history`` is such an input or a slice
  of it along ``dim`` and ``new`` is not read from it (caches grown by concatenation), or
- ``cat-window``: ``torch.cat([buf[:, :S], buf[:, a:e]], dim)``, two slices of one cache input or of
  its in-graph clone (LongLive v1: the sink, then the window);
- ``window-input``: a graph input that *is* such a slice, taken in an earlier graph (a graph break
  between the window read and the attention): its example value is a view of a larger buffer along
  one dim, which dynamo records for inputs that alias (a fresh tensor, e.g. cross-attention's K, is not);
- ``anchored-window``: ``torch.cat([anchor, buf[:, a:b], new], dim)``: a first part (Rolling Forcing's anchor,
  the cache's first block re-rotated at every call to sit just before the window), a slice of a cache input, and
  new tokens not read from it;
- ``recomputed-keys``: one operand a whole graph input (computed outside this graph, e.g. Rolling Forcing's
  keys re-rotated from a clone of the window), the other a window of a cache.

The last two are transformed from the cache at every call: the keep rule applies to each call's keys as they are
(``select`` chooses at every call, reusing nothing), and ``compact`` cannot own them (it falls back to ``select``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx as fx

from ..config import Choice

__all__ = ["SiteError", "CachePattern", "RECOMPUTED_PATTERNS", "CacheWindow", "Miss", "NotAWindow", "AttentionSite", "Declined",
           "ORDER_DEPENDENT"]


class CachePattern(Choice):
    """How an attention's keys and values are read from a KV cache (module docstring)."""

    CACHE_WINDOW = "cache-window"
    CAT_GROWTH = "cat-growth"
    CAT_WINDOW = "cat-window"
    WINDOW_INPUT = "window-input"
    ANCHORED = "anchored-window"
    RECOMPUTED = "recomputed-keys"


RECOMPUTED_PATTERNS = (CachePattern.ANCHORED, CachePattern.RECOMPUTED)


@dataclass(frozen=True)
class CacheWindow:
    """``cache[..., start:stop, ...]``: a slice of a graph input along one dim (or a concatenation, see
    :class:`CachePattern`)."""

    cache: fx.Node
    read: fx.Node
    source: str
    dim: int  # the sliced (token) dim of the cache
    pattern: CachePattern = CachePattern.CACHE_WINDOW

    @property
    def grown(self) -> bool:
        """The window's length is only known per call (a grown tensor, a window taken in an earlier graph, one
        recomputed at every call)."""
        return self.pattern in (CachePattern.CAT_GROWTH, CachePattern.WINDOW_INPUT, *RECOMPUTED_PATTERNS)

    @property
    def recomputed(self) -> bool:
        """Transformed from the cache at every call: the store cannot hold it."""
        return self.pattern in RECOMPUTED_PATTERNS


class Miss(enum.Enum):
    """Why an attention operand is not a cache window, where the caller's decision depends on it."""

    OTHER = enum.auto()
    WHOLE_INPUT = enum.auto()  # a whole graph input: cross-attention, or computed outside this graph
    ORDER_DEPENDENT = enum.auto()  # recomputed from a cache at every call: which tokens are kept depends on the call


@dataclass(frozen=True)
class NotAWindow:
    """An operand that is not a window of a KV cache, and why."""

    kind: Miss
    reason: str


@dataclass(frozen=True)
class AttentionSite:
    """An attention call over windows of two cache inputs (keys and values)."""

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    k_window: CacheWindow
    v_window: CacheWindow
    layer_key: fx.Node
    layer_key_kind: str  # "param" or "cache"
    writes_in_graph: bool
    function: str = "sdpa"  # or "matmul-softmax", "flash-attn-varlen"
    internal: tuple[fx.Node, ...] = ()  # nodes of a hand-written or varlen attention that die with the rewrite
    layout: str = "bhld"  # q/k/v as [B, H, L, D]; "blhd": [B, L, H, D] (varlen), transposed by the rewrite

    @property
    def pattern(self) -> str:
        return f"{self.k_window.pattern}, {self.function}"


@dataclass(frozen=True)
class Declined:
    """An attention call the pass leaves alone; ``candidate`` if it reads a cache window (strict raises)."""

    node: fx.Node
    reason: str
    candidate: bool


ORDER_DEPENDENT = "order-dependent"  # how the report's reasons for such calls start


class SiteError(RuntimeError):
    """``strict=True`` and an attention call over a cache window could not be rewritten."""
