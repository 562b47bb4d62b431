"""Trace an attention's keys and values back to the KV cache they are a window of (:mod:`.sites` names the patterns).

Operands are followed up through view-like ops and dtype casts to a slice of a graph input, a concatenation onto
one, or a graph input that is itself a slice taken in an earlier graph. Tracers return a :class:`.CacheWindow` or
a :class:`.NotAWindow` with the reason; they never raise.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import cat_operands, hint, inputs_under, is_clone, sliced_dim, source_name, through_views, writes_into
from .sites import ORDER_DEPENDENT, CachePattern, CacheWindow, Declined, Miss, NotAWindow

__all__ = ["trace_window", "operand_windows"]


def _trace_cat(cat: fx.Node) -> CacheWindow | NotAWindow:
    """``torch.cat([history, new], dim)`` with ``history`` a cache input (or a slice of it along ``dim``)."""
    parts, dim = cat_operands(cat)
    if isinstance(parts, (list, tuple)) and len(parts) == 3 and isinstance(dim, int):
        return _anchored(cat, parts, dim)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(dim, int):
        return NotAWindow(Miss.OTHER, "keys/values are a concatenation the pass does not support (expected [history, "
                          "new] along one dim)")
    history, new = (through_views(p) for p in parts)
    if not isinstance(history, fx.Node) or not isinstance(new, fx.Node):
        return NotAWindow(Miss.OTHER, "attention operand is not a tensor")
    adjacent = _cat_of_slices(cat, history, new, dim)
    if adjacent is not None:
        return adjacent
    base = history if history.op == "placeholder" else _slice_base(history, dim)
    if base is None:
        return NotAWindow(Miss.OTHER, "keys/values are a concatenation whose first part is not a cache input or a "
                          "slice of one along the concatenated dim")
    return _onto(cat, base, new, dim, CachePattern.CAT_GROWTH)


def _onto(cat: fx.Node, base: fx.Node, new: fx.Node, dim: int, pattern: CachePattern) -> CacheWindow | NotAWindow:
    """The concatenation ``cat`` of cache ``base``'s tokens with ``new`` ones, which must not be read from it."""
    if base in inputs_under(new):
        return NotAWindow(Miss.OTHER, f"the new tokens of the concatenation with cache {source_name(base)} are read "
                          "from the cache too")
    return CacheWindow(cache=base, read=cat, source=source_name(base), dim=dim, pattern=pattern)


def _anchored(cat: fx.Node, parts: list[fx.Node], dim: int) -> CacheWindow | NotAWindow:
    """``torch.cat([anchor, cache[:, a:b], new], dim)`` (Rolling Forcing): the window is the concatenation."""
    middle, new = (through_views(p) for p in parts[1:])
    base = _slice_base(middle, dim) if isinstance(middle, fx.Node) else None
    if base is None and isinstance(middle, fx.Node) and middle.op == "placeholder":  # sliced in an earlier graph
        base = middle if _window_of_base(middle.meta.get("example_value")) == dim else None
    if base is None or not isinstance(new, fx.Node):
        return NotAWindow(Miss.OTHER, "keys/values are a three-part concatenation whose middle part is not a slice "
                          "of a cache input along the concatenated dim")
    return _onto(cat, base, new, dim, CachePattern.ANCHORED)


def _window_of_base(example: object) -> int | None:
    """The dim along which ``example`` (an input's fake tensor) is a slice of its base buffer, else ``None``.

    A slice as long as its buffer (a full window) is only accepted as ``[B, L, H, D]``'s token dim 1."""
    base = getattr(example, "_base", None)
    if not isinstance(example, torch.Tensor) or base is None or base.dim() != example.dim():
        return None
    if example.stride() != base.stride() or base.storage_offset() != 0:
        return None
    shorter = [d for d in range(example.dim()) if example.shape[d] != base.shape[d]]
    if len(shorter) > 1 or (not shorter and example.dim() != 4):
        return None
    dim = shorter[0] if shorter else 1
    # symbolic under dynamic shapes: judged on the traced values, without a guard (what is decided here only tells a
    # cache window from a fresh tensor, and names the layer's cache; the ops take the window as it comes)
    offset, stride, length, whole = map(hint, (example.storage_offset(), base.stride(dim), example.shape[dim],
                                               base.shape[dim]))
    if None in (offset, stride, length, whole) or stride == 0:
        return None
    start, rest = divmod(offset, stride)
    return dim if rest == 0 and start + length <= whole else None


def _slice_base(node: fx.Node, dim: int) -> fx.Node | None:
    """The graph input under ``x[..., a:b]`` (through views and clones) sliced along ``dim``, else ``None``."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    base, index = node.args
    rank = node.meta["example_value"].dim() if "example_value" in node.meta else None
    if sliced_dim(index) != (dim % rank if rank else dim):
        return None
    base = through_views(base)
    return base if isinstance(base, fx.Node) and base.op == "placeholder" else None


def _cat_of_slices(cat: fx.Node, first: fx.Node, second: fx.Node, dim: int) -> CacheWindow | None:
    """``cat([buf[:, :S], buf[:, a:e]])`` of one cache (or its in-graph clone, LongLive v1): the sink
    frames, then the window ending with the current chunk; the window is the concatenation."""
    base = _slice_base(first, dim)
    if base is None or _slice_base(second, dim) is not base:
        return None
    return CacheWindow(cache=base, read=cat, source=source_name(base), dim=dim, pattern=CachePattern.CAT_WINDOW)


def trace_window(node: fx.Node) -> CacheWindow | NotAWindow:
    """Follow ``node`` up through view-like ops to ``input[..., a:b]`` or a concatenation onto an input;
    why not if it is neither."""
    current = through_views(node)
    if not isinstance(current, fx.Node):
        return NotAWindow(Miss.OTHER, "attention operand is not a tensor")
    if current.op == "call_function" and current.target is torch.cat:
        return _trace_cat(current)
    if current.op == "placeholder":
        dim = _window_of_base(current.meta.get("example_value"))
        if dim is not None:
            return CacheWindow(cache=current, read=current, source=source_name(current), dim=dim,
                               pattern=CachePattern.WINDOW_INPUT)
        return NotAWindow(Miss.WHOLE_INPUT, "keys/values are a whole graph input, not a window of a cache (e.g. "
                          "cross-attention)")
    if current.op == "call_function" and current.target is operator.getitem:
        base, index = current.args
        if is_clone(base):  # a copy of the cache the graph rolls and writes before reading (LongLive 2.0: staged)
            base = base.args[0]
        if isinstance(base, fx.Node) and base.op == "placeholder":
            dim = sliced_dim(index)
            if dim is not None:
                return CacheWindow(cache=base, read=current, source=source_name(base), dim=dim)
            return NotAWindow(Miss.OTHER, f"cache {source_name(base)} is read with an index the pass does not "
                              f"support: {index!r}")
    written = [p for p in inputs_under(current) if writes_into(p)]
    if written:
        return NotAWindow(Miss.ORDER_DEPENDENT, f"{ORDER_DEPENDENT}: keys/values are recomputed from cache "
                          f"{source_name(written[0])} at every call (e.g. re-rotated to window-relative positions), "
                          "so which tokens a head keeps depends on the call")
    return NotAWindow(Miss.OTHER, "keys/values are not read from a cache input")


def operand_windows(node: fx.Node, k: object, v: object) -> list[CacheWindow] | Declined:
    """The cache windows of the keys and values of ``node``, or why it is declined.

    Keys (or values) that arrive as a whole graph input of the other operand's length while the other is a
    cache window were computed from the cache outside this graph (after a graph break): transformed per call,
    e.g. re-rotated (Rolling Forcing's clean pass). They are ``recomputed-keys``: the keep rule applies to each
    call's keys as they are.
    """
    windows = [trace_window(k), trace_window(v)]
    misses = [w for w in windows if isinstance(w, NotAWindow)]
    if not misses:
        return windows
    found = [w for w in windows if isinstance(w, CacheWindow)]
    if len(found) == 1 and misses[0].kind is Miss.WHOLE_INPUT:
        other = through_views(k if isinstance(windows[1], CacheWindow) else v)
        examples = [n.meta.get("example_value") for n in (other, found[0].read)]
        traced = [[hint(d) for d in x.shape] for x in examples if isinstance(x, torch.Tensor)]
        if len(traced) == 2 and traced[0] == traced[1]:  # the traced shapes (no guard on symbolic ones)
            recomputed = CacheWindow(cache=other, read=other, source=source_name(other), dim=found[0].dim,
                                     pattern=CachePattern.RECOMPUTED)
            return [recomputed, found[0]] if windows[1] is found[0] else [found[0], recomputed]
    return Declined(node, misses[0].reason, candidate=misses[0].kind is Miss.ORDER_DEPENDENT)
