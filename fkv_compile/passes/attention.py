"""Find attention calls over windows of a KV cache in a dynamo FX graph, structurally (never by names).

A site is an attention call (SDPA, or hand-written ``softmax(q @ k^T * s) @ v``, see
:mod:`.manual_attention`) whose K and V trace back, through view-like ops and dtype casts, to

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

Matchers return a dataclass or a :class:`NotAWindow` / reason string; they never raise.
"""

from __future__ import annotations

import enum
import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..config import Choice
from .manual_attention import ManualAttention, match_manual_attention
from .varlen_attention import VarlenAttention, arguments, is_flatten, match_varlen_attention

__all__ = ["AttentionSite", "CachePattern", "CacheWindow", "Declined", "NotAWindow", "Miss", "find_attention_sites",
           "source_name", "cat_operands", "is_attention", "is_clone"]

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# methods and functions that neither move tokens between positions nor change values (bar casts)
_VIEW_METHODS = frozenset(
    {"transpose", "permute", "view", "reshape", "flatten", "unflatten", "contiguous", "to", "type", "type_as",
     "float", "half", "bfloat16", "double", "clone", "detach"}
)
_VIEW_FUNCTIONS = frozenset(
    {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten, torch.clone, torch.Tensor.contiguous}
)


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


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    name = getattr(getattr(grapharg, "source", None), "name", None)
    if callable(name):  # a method in older torch releases, a property in newer ones
        name = name()
    return name if isinstance(name, str) else str(node.target)


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def is_clone(node: object) -> bool:
    """``x.clone()`` or ``torch.clone(x)``, with no other argument."""
    return isinstance(node, fx.Node) and not node.kwargs and len(node.args) == 1 and (
        (node.op == "call_method" and node.target == "clone")
        or (node.op == "call_function" and node.target is torch.clone))


def sliced_dim(index: object) -> int | None:
    """The dim of an index that slices exactly one dim with step 1 and keeps every other dim whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or any(not isinstance(i, slice) for i in items):
        return None
    partial = [d for d, i in enumerate(items) if i != slice(None)]
    return partial[0] if len(partial) == 1 and items[partial[0]].step in (None, 1) else None


def _through_views(node: object) -> object:
    while isinstance(node, fx.Node) and is_view_like(node):
        node = node.args[0]
    return node


def cat_operands(cat: fx.Node) -> tuple[object, object]:
    """The tensors and the dim of a ``torch.cat`` node, given positionally or by keyword."""
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    return parts, cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)


def _trace_cat(cat: fx.Node) -> CacheWindow | NotAWindow:
    """``torch.cat([history, new], dim)`` with ``history`` a cache input (or a slice of it along ``dim``)."""
    parts, dim = cat_operands(cat)
    if isinstance(parts, (list, tuple)) and len(parts) == 3 and isinstance(dim, int):
        return _anchored(cat, parts, dim)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not isinstance(dim, int):
        return NotAWindow(Miss.OTHER, "keys/values are a concatenation the pass does not support (expected [history, "
                          "new] along one dim)")
    history, new = (_through_views(p) for p in parts)
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
    if base in _inputs_under(new):
        return NotAWindow(Miss.OTHER, f"the new tokens of the concatenation with cache {source_name(base)} are read "
                          "from the cache too")
    return CacheWindow(cache=base, read=cat, source=source_name(base), dim=dim, pattern=pattern)


def _anchored(cat: fx.Node, parts: list[fx.Node], dim: int) -> CacheWindow | NotAWindow:
    """``torch.cat([anchor, cache[:, a:b], new], dim)`` (Rolling Forcing): the window is the concatenation."""
    middle, new = (_through_views(p) for p in parts[1:])
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
    offset, stride, length, whole = map(_hint, (example.storage_offset(), base.stride(dim), example.shape[dim],
                                               base.shape[dim]))
    if None in (offset, stride, length, whole) or stride == 0:
        return None
    start, rest = divmod(offset, stride)
    return dim if rest == 0 and start + length <= whole else None


def _hint(value: object) -> int | None:
    """An int, or a symbolic int's traced value (``None`` if it has none)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


def _slice_base(node: fx.Node, dim: int) -> fx.Node | None:
    """The graph input under ``x[..., a:b]`` (through views and clones) sliced along ``dim``, else ``None``."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    base, index = node.args
    rank = node.meta["example_value"].dim() if "example_value" in node.meta else None
    if sliced_dim(index) != (dim % rank if rank else dim):
        return None
    base = _through_views(base)
    return base if isinstance(base, fx.Node) and base.op == "placeholder" else None


def _cat_of_slices(cat: fx.Node, first: fx.Node, second: fx.Node, dim: int) -> CacheWindow | None:
    """``cat([buf[:, :S], buf[:, a:e]])`` of one cache (or its in-graph clone, LongLive v1): the sink
    frames, then the window ending with the current chunk; the window is the concatenation."""
    base = _slice_base(first, dim)
    if base is None or _slice_base(second, dim) is not base:
        return None
    return CacheWindow(cache=base, read=cat, source=source_name(base), dim=dim, pattern=CachePattern.CAT_WINDOW)


def _trace_window(node: fx.Node) -> CacheWindow | NotAWindow:
    """Follow ``node`` up through view-like ops to ``input[..., a:b]`` or a concatenation onto an input;
    why not if it is neither."""
    current = _through_views(node)
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
    written = [p for p in _inputs_under(current) if _writes_into(p)]
    if written:
        return NotAWindow(Miss.ORDER_DEPENDENT, f"{ORDER_DEPENDENT}: keys/values are recomputed from cache "
                          f"{source_name(written[0])} at every call (e.g. re-rotated to window-relative positions), "
                          "so which tokens a head keeps depends on the call")
    return NotAWindow(Miss.OTHER, "keys/values are not read from a cache input")


ORDER_DEPENDENT = "order-dependent"  # how the report's reasons for such calls start


def _inputs_under(node: fx.Node) -> list[fx.Node]:
    """The graph inputs ``node`` depends on, in discovery order."""
    found, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        stack.extend(n.all_input_nodes)
    return found


def _is_param(node: fx.Node) -> bool:
    return node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def _nearest_param(start: fx.Node) -> fx.Node | None:
    """The parameter input closest to ``start`` in the graph (undirected breadth-first search)."""
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        for nxt in (*node.all_input_nodes, *node.users):
            if nxt in seen:
                continue
            if _is_param(nxt):
                return nxt
            seen.add(nxt)
            queue.append(nxt)
    return None


def _writes_into(cache: fx.Node) -> bool:
    for user in cache.users:
        if user.op == "call_function" and user.target is operator.setitem and user.args[0] is cache:
            return True
        if user.op == "call_method" and str(user.target).endswith("_") and user.args[0] is cache:
            return True
    return False


def _windows(node: fx.Node, k: object, v: object) -> list[CacheWindow] | Declined:
    """The cache windows of the keys and values of ``node``, or why it is declined.

    Keys (or values) that arrive as a whole graph input of the other operand's length while the other is a
    cache window were computed from the cache outside this graph (after a graph break): transformed per call,
    e.g. re-rotated (Rolling Forcing's clean pass). They are ``recomputed-keys``: the keep rule applies to each
    call's keys as they are.
    """
    windows = [_trace_window(k), _trace_window(v)]
    misses = [w for w in windows if isinstance(w, NotAWindow)]
    if not misses:
        return windows
    found = [w for w in windows if isinstance(w, CacheWindow)]
    if len(found) == 1 and misses[0].kind is Miss.WHOLE_INPUT:
        other = _through_views(k if isinstance(windows[1], CacheWindow) else v)
        examples = [n.meta.get("example_value") for n in (other, found[0].read)]
        traced = [[_hint(d) for d in x.shape] for x in examples if isinstance(x, torch.Tensor)]
        if len(traced) == 2 and traced[0] == traced[1]:  # the traced shapes (no guard on symbolic ones)
            recomputed = CacheWindow(cache=other, read=other, source=source_name(other), dim=found[0].dim,
                                     pattern=CachePattern.RECOMPUTED)
            return [recomputed, found[0]] if windows[1] is found[0] else [found[0], recomputed]
    return Declined(node, misses[0].reason, candidate=misses[0].kind is Miss.ORDER_DEPENDENT)


def _match_sdpa(node: fx.Node) -> tuple[AttentionSite | None, Declined | None]:
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[:3]
    kw = dict(node.kwargs)
    windows = _windows(node, k, v)
    if isinstance(windows, Declined):
        return None, windows
    mask = kw.get("attn_mask", args[3])
    dropout = kw.get("dropout_p", args[4] if args[4] is not None else 0.0)
    causal = kw.get("is_causal", args[5] if args[5] is not None else False)
    if mask is not None:
        return None, Declined(node, "attention has an explicit attn_mask", candidate=True)
    if dropout != 0.0:
        return None, Declined(node, f"attention has dropout_p={dropout}", candidate=True)
    if causal:
        return None, Declined(node, "attention is causal (is_causal=True)", candidate=True)
    if kw.get("enable_gqa", False):
        return None, Declined(node, "NYI: grouped-query attention (enable_gqa=True)", candidate=True)
    return _site(node, q, k, v, kw.get("scale"), windows, "sdpa", ())


def _match_manual(manual: ManualAttention) -> tuple[AttentionSite | None, Declined | None]:
    windows = _windows(manual.out, manual.k, manual.v)
    if isinstance(windows, Declined):
        return None, windows
    return _site(manual.out, manual.q, manual.k, manual.v, manual.scale, windows, "matmul-softmax", manual.internal)


def _match_varlen(varlen: VarlenAttention) -> tuple[AttentionSite | None, Declined | None]:
    windows = _windows(varlen.out, varlen.k, varlen.v)
    if isinstance(windows, Declined):
        return None, windows
    return _site(varlen.out, varlen.q, varlen.k, varlen.v, varlen.scale, windows, "flash-attn-varlen",
                 varlen.internal, layout="blhd")


def _site(node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, scale: float | None, windows: list[CacheWindow],
          function: str, internal: tuple[fx.Node, ...], layout: str = "bhld",
          ) -> tuple[AttentionSite | None, Declined | None]:
    qv, kv_ = q.meta.get("example_value"), k.meta.get("example_value")
    if qv is None or kv_ is None or qv.dim() != 4 or kv_.dim() != 4:
        return None, Declined(node, "attention operands are not 4-d [B, H, L, D]", candidate=True)
    heads = 1 if layout == "bhld" else 2
    if qv.shape[heads] != kv_.shape[heads]:
        return None, Declined(node, "NYI: query and key head counts differ", candidate=True)
    k_window, v_window = windows
    if k_window.cache is v_window.cache:
        return None, Declined(node, "keys and values are read from the same input", candidate=True)
    param = _nearest_param(node)
    return (
        AttentionSite(
            node=node, q=q, k=k, v=v, scale=scale,
            k_window=k_window, v_window=v_window,
            layer_key=param if param is not None else k_window.cache,
            layer_key_kind="param" if param is not None else "cache",
            writes_in_graph=_writes_into(k_window.cache),
            function=function, internal=internal, layout=layout,
        ),
        None,
    )


def find_attention_sites(graph: fx.Graph) -> tuple[list[AttentionSite], list[Declined]]:
    """Every attention call of ``graph``: rewritable sites, and declined calls with their reasons."""
    sites, declined = [], []
    for node in graph.nodes:
        if is_attention(node):
            site, no = _match_sdpa(node)
        elif (manual := match_manual_attention(node)) is not None:
            site, no = _match_manual(manual)
        elif (varlen := match_varlen_attention(node)) is not None:
            if isinstance(varlen, str):
                k_arg = arguments(node)["k"]
                reads_cache = isinstance(_trace_window(k_arg.args[0] if is_flatten(k_arg) else k_arg), CacheWindow)
                site, no = None, Declined(node, varlen, candidate=reads_cache)
            else:
                site, no = _match_varlen(varlen)
        else:
            continue
        if site is not None:
            sites.append(site)
        else:
            declined.append(no)
    keys = [s.layer_key for s in sites]
    if len(set(keys)) != len(keys):
        # one parameter shared by several sites cannot tell their layers apart: use the caches,
        # except grown ones (a new tensor every call)
        declined += [Declined(s.node, "a cat-grown cache needs a per-layer parameter to identify its layer, and "
                              "the nearest one is shared", candidate=True)
                     for s in sites if s.k_window.pattern is CachePattern.CAT_GROWTH]
        sites = [
            AttentionSite(**{**s.__dict__, "layer_key": s.k_window.cache, "layer_key_kind": "cache"})
            for s in sites if s.k_window.pattern is not CachePattern.CAT_GROWTH
        ]
    return sites, declined
