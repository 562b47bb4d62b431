"""``compact`` mode: prove that a site's caches are only written, rolled and read by the site, then
rewrite those accesses into ops on the compact store (:mod:`fkv_compile.store`).

Accepted accesses of the K and V cache inputs of one graph (Self Forcing's code path):

- exactly one write pair ``cache[:, s:e] = new`` (same bounds for K and V), before the attention;
- any number of roll pairs ``cache[:, d:d+n] = cache[:, a:b].clone()``;
- the window read pair ``cache[:, w0:w1]`` feeding the site's attention, or (LongLive v1's
  cat-window) the pair ``cat([cache[:, :S], cache[:, w0:w1]], 1)``: the model's attention sink, then
  the window after it. The sink must end where the window starts (checked at run time: the store
  serves ``[0, w1)``); LongLive's cache is as long as its attention window, so it always does.

Anything else leaves the site to ``select`` with the reason in the report. The write is moved to
the attention (one fused op): legal because nothing but the rewritten ops touches the caches.

A *staged* cache (LongLive's real code) is the same accesses made on ``clone(cache)``: the graph rolls and writes a
copy of the cache and attends over it, and the pipeline repeats the roll and the write on the cache itself after all
layers, in a later graph (LongLive v1) or at the end of the same one (LongLive 2.0); the cache input is used by
nothing else. The store makes them at the attention; the repeats become replay ops checked against it
(:mod:`fkv_compile.passes.replay`).

A cache grown by concatenation (:func:`match_grown`) is accepted when the cache input is only read
as the history ``cache[:, :start]`` of ``cat([history, new], 1)`` and the concatenation only feeds
the site's attention and the graph's outputs (the grown tensor the pipeline keeps as its next cache).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from .graph import cat_operands, is_clone, is_view_like, sliced_dim
from .sites import AttentionSite, CachePattern, CacheWindow

__all__ = ["CacheAccesses", "GrownAccesses", "RollPair", "classify_accesses", "match_compact", "match_grown", "roll_source",
           "slice_of"]


@dataclass(frozen=True)
class RollPair:
    setitems: tuple[fx.Node, fx.Node]
    dst: object
    src: object
    src_end: object


@dataclass(frozen=True)
class CacheAccesses:
    writes: tuple[fx.Node, fx.Node]  # setitem nodes into K and V
    k_new: fx.Node
    v_new: fx.Node
    start: object  # int or SymInt node
    end: object
    window: tuple[object, object]
    rolls: tuple[RollPair, ...]
    protected: object = 0  # end of the sink read in front of the window (cat-window), else 0
    staged: tuple[fx.Node, fx.Node] | None = None  # the clones of K and V the graph works on, if staged


@dataclass(frozen=True)
class GrownAccesses:
    """``cat([cache[:, :start], new], 1)`` for K and V, read by the attention and handed back to the pipeline."""

    cats: tuple[fx.Node, fx.Node]
    histories: tuple[fx.Node, fx.Node]  # the history reads (slices of the cache inputs, or the inputs themselves)
    k_new: fx.Node
    v_new: fx.Node
    start: object  # int, SymInt node, or None: the whole cache input is the history


def slice_of(index: object) -> slice | None:
    """The slice of an index that slices dim 1 only (``x[:, a:b]``), else ``None``."""
    dim = sliced_dim(index)
    if dim != 1:
        return None
    return index[1] if isinstance(index, tuple) else None


def _is_setitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.setitem


def roll_source(value: object, cache: fx.Node) -> slice | None:
    """``cache[:, a:b].clone()`` (or without the clone): the source slice of a roll."""
    if is_clone(value):
        value = value.args[0]
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem:
        if value.args[0] is cache:
            return slice_of(value.args[1])
    return None


def _is_roll_of(node: fx.Node, cache: fx.Node, value: fx.Node) -> bool:
    return _is_setitem(node) and node.args[0] is cache and node.args[2] is value


def _feeds_only_rolls(read: fx.Node, cache: fx.Node) -> bool:
    """``read`` is used only as the (cloned) source of roll writes into the same cache."""
    for user in read.users:
        if _is_roll_of(user, cache, read):
            continue
        if is_clone(user) and all(_is_roll_of(w, cache, user) for w in user.users):
            continue
        return False
    return True


def classify_accesses(cache: fx.Node, reads: tuple[fx.Node, ...]) -> tuple[list[fx.Node], list[tuple[fx.Node, slice, slice]]] | str:
    writes, rolls = [], []
    for user in cache.users:
        if user in reads:
            continue
        if _is_setitem(user) and user.args[0] is cache:
            dst = slice_of(user.args[1])
            if dst is None:
                return f"cache write with an index the store does not support: {user.args[1]!r}"
            src = roll_source(user.args[2], cache)
            if src is not None:
                rolls.append((user, dst, src))
            else:
                writes.append(user)
            continue
        if user.op == "call_function" and user.target is operator.getitem and _feeds_only_rolls(user, cache):
            continue  # the source read of a roll
        return f"cache is also used by {user.op} {user.target} ({user.name})"
    return writes, rolls


def _same(a: object, b: object) -> bool:
    """Equal values: the same constant, or nodes computing the same op on equal arguments."""
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a is b:
            return True
        if a.op != "call_function" or a.op != b.op or a.target != b.target or len(a.args) != len(b.args) or a.kwargs or b.kwargs:
            return False
        return all(_same(x, y) for x, y in zip(a.args, b.args))
    if isinstance(a, slice) and isinstance(b, slice):
        return all(_same(x, y) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b


def _before(a: fx.Node, b: fx.Node) -> bool:
    for node in a.graph.nodes:
        if node is a:
            return True
        if node is b:
            return False
    return False


def _write_back_only(cache: fx.Node, clone: fx.Node, site: fx.Node) -> str | None:
    """Why the staged ``cache`` is used otherwise than by its ``clone`` and, after the ``site``, by the pipeline's
    write-back of it (writes and rolls along dim 1: LongLive 2.0 makes it in the attention's graph), or ``None``."""
    found = classify_accesses(cache, (clone,))
    if isinstance(found, str):
        return f"a staged cache is also used besides its clone and its write-back: {found}"
    writes, rolls = found
    if any(not _before(site, step) for step in (*writes, *(roll for roll, _, _ in rolls))):
        return "NYI: a staged cache written before its attention reads the clone"
    return None


def _window_reads(window: CacheWindow) -> tuple[fx.Node, tuple[fx.Node, ...]] | str:
    """The tensor the window is read from (the cache input, or its staged clone) and the getitems of it the read
    consists of: the window slice, or the sink and window slices a cat-window concatenates (each used by the
    concatenation only)."""
    parts = cat_operands(window.read)[0] if window.pattern is CachePattern.CAT_WINDOW else (window.read,)
    base = parts[0].args[0] if parts[0].op == "call_function" and parts[0].target is operator.getitem else None
    staged = is_clone(base) and base.args[0] is window.cache
    if base is not window.cache and not staged:
        return "NYI: compact for a window whose slices are not read straight from the cache or its clone"
    for part in parts:
        if not (part.op == "call_function" and part.target is operator.getitem and part.args[0] is base
                and (len(part.users) == 1 or window.pattern is not CachePattern.CAT_WINDOW)):
            return "NYI: compact for a cat-window whose slices are not read straight from the cache"
    return base, tuple(parts)


def match_compact(site: AttentionSite) -> CacheAccesses | str:
    """The accesses to rewrite, or why the site's caches cannot be owned by the store."""
    k_read, v_read = site.k_window.read, site.v_window.read
    if site.k_window.dim != 1 or site.v_window.dim != 1:
        return "NYI: compact needs caches laid out [B, L, H, D] (token dim 1)"
    reads = [_window_reads(site.k_window), _window_reads(site.v_window)]
    for r in reads:
        if isinstance(r, str):
            return r
    (k_base, k_reads), (v_base, v_reads) = reads
    staged = (k_base, v_base) if k_base is not site.k_window.cache else None
    if (staged is None) != (v_base is site.v_window.cache):
        return "K is staged in a clone and V is not (or the reverse)"
    for clone in staged or ():
        why = _write_back_only(clone.args[0], clone, site.node)
        if why:
            return why
    found = [classify_accesses(k_base, k_reads), classify_accesses(v_base, v_reads)]
    for f in found:
        if isinstance(f, str):
            return f
    (k_writes, k_rolls), (v_writes, v_rolls) = found
    if len(k_writes) != 1 or len(v_writes) != 1:
        return f"compact needs exactly one write of K and V in the graph, got {len(k_writes)} and {len(v_writes)}"
    wk, wv = k_writes[0], v_writes[0]
    if not _same(slice_of(wk.args[1]), slice_of(wv.args[1])):
        return "K and V are written at different positions"
    if not (_before(wk, site.node) and _before(wv, site.node)):
        return "NYI: the cache is written after the attention reads it"
    if len(k_rolls) != len(v_rolls) or not all(_same(a[1], b[1]) and _same(a[2], b[2]) for a, b in zip(k_rolls, v_rolls)):
        return "K and V are rolled differently"
    for read in (k_read, v_read):
        node = read
        while len(node.users) == 1 and is_view_like(next(iter(node.users))):
            node = next(iter(node.users))
        if not node.users or any(user not in (site.node, *site.internal) for user in node.users):
            return "the window read has uses besides the attention"
    windows = [tuple(slice_of(r.args[1]) for r in rs) for rs in (k_reads, v_reads)]
    if any(w is None for w in windows[0]) or not all(_same(a, b) for a, b in zip(*windows)):
        return "K and V windows differ"
    window = windows[0][-1]
    if window.stop is None:
        return "NYI: a window read without an end bound"
    protected = 0
    if len(windows[0]) == 2:  # cat-window: the sink [0, S), then the window
        sink = windows[0][0]
        if sink.start not in (None, 0) or sink.stop is None:
            return f"NYI: a cat-window whose first part is not the cache's first tokens: {sink!r}"
        protected = sink.stop
    write = slice_of(wk.args[1])
    rolls = tuple(
        RollPair(setitems=(rk[0], rv[0]), dst=rk[1].start, src=rk[2].start, src_end=rk[2].stop)
        for rk, rv in zip(k_rolls, v_rolls)
    )
    return CacheAccesses(writes=(wk, wv), k_new=wk.args[2], v_new=wv.args[2], start=write.start or 0, end=write.stop,
                         window=(window.start or 0, window.stop), rolls=rolls, protected=protected, staged=staged)


def _feeds_only(node: fx.Node, site: AttentionSite) -> bool:
    """``node`` reaches the site's attention only through view-like ops, or is a graph output."""
    for user in node.users:
        if user.op == "output" or user is site.node or user in site.internal:
            continue
        if not (is_view_like(user) and _feeds_only(user, site)):
            return False
    return True


def _grown_part(cat: fx.Node, cache: fx.Node, site: AttentionSite) -> tuple[fx.Node, fx.Node, object] | str:
    """(history read, new tokens, start) of one concatenation, or why the store cannot own it."""
    parts, dim = cat_operands(cat)
    if dim != 1 or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return "NYI: compact for a cache grown along another dim than 1"
    history, new = parts
    if history is cache:
        start = None
    elif history.op == "call_function" and history.target is operator.getitem and history.args[0] is cache:
        window = slice_of(history.args[1])
        if window is None or window.start not in (None, 0):
            return f"the grown cache's history is not its first tokens: {history.args[1]!r}"
        start = window.stop
    else:
        return "the grown cache's history is not read from the cache input"
    read = cat if history is cache else history
    if any(user is not read for user in cache.users) or len(history.users) != 1:
        return "the cache input is also used besides the concatenation"
    if not _feeds_only(cat, site):
        return "the grown cache is also read besides the attention"
    return history, new, start


def match_grown(site: AttentionSite) -> GrownAccesses | str:
    """The concatenations to rewrite, or why the store cannot own the grown cache."""
    cats = (site.k_window.read, site.v_window.read)
    found = [_grown_part(cat, w.cache, site) for cat, w in zip(cats, (site.k_window, site.v_window))]
    for f in found:
        if isinstance(f, str):
            return f
    (k_history, k_new, k_start), (v_history, v_new, v_start) = found
    if not _same(k_start, v_start):
        return "K and V are grown from histories of different lengths"
    return GrownAccesses(cats=cats, histories=(k_history, v_history), k_new=k_new, v_new=v_new, start=k_start)
