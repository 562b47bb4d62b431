"""Find attention calls over windows of a KV cache in a dynamo FX graph, structurally (never by names).

A site is an SDPA call whose K and V trace back, through view-like ops and dtype casts, to a slice
along one dim of a graph input (the cache buffer, e.g. ``L['kv_cache'][3]['k']``). Matchers return
a dataclass or a reason string; they never raise.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["AttentionSite", "Declined", "find_attention_sites", "is_attention"]

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# methods and functions that neither move tokens between positions nor change values (bar casts)
_VIEW_METHODS = frozenset(
    {"transpose", "permute", "view", "reshape", "flatten", "unflatten", "contiguous", "to", "type", "type_as",
     "float", "half", "bfloat16", "double", "clone", "detach"}
)
_VIEW_FUNCTIONS = frozenset(
    {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten, torch.clone, torch.Tensor.contiguous}
)


@dataclass(frozen=True)
class CacheWindow:
    """``cache[..., start:stop, ...]``: a slice of a graph input along one dim."""

    cache: fx.Node
    read: fx.Node
    source: str
    dim: int  # the sliced (token) dim of the cache


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


@dataclass(frozen=True)
class Declined:
    """An attention call the pass leaves alone; ``candidate`` if it reads a cache window (strict raises)."""

    node: fx.Node
    reason: str
    candidate: bool


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    name = getattr(getattr(grapharg, "source", None), "name", None)
    if callable(name):  # a method in older torch releases, a property in newer ones
        name = name()
    return name if isinstance(name, str) else str(node.target)


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def sliced_dim(index: object) -> int | None:
    """The dim of an index that slices exactly one dim with step 1 and keeps every other dim whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or any(not isinstance(i, slice) for i in items):
        return None
    partial = [d for d, i in enumerate(items) if i != slice(None)]
    return partial[0] if len(partial) == 1 and items[partial[0]].step in (None, 1) else None


def _trace_window(node: fx.Node) -> CacheWindow | str:
    """Follow ``node`` up through view-like ops to ``input[..., a:b]``; a reason string if it is not one."""
    current = node
    while is_view_like(current):
        current = current.args[0]
        if not isinstance(current, fx.Node):
            return "attention operand is not a tensor"
    if current.op == "placeholder":
        return "keys/values are a whole graph input, not a window of a cache (e.g. cross-attention)"
    if current.op == "call_function" and current.target is operator.getitem:
        base, index = current.args
        if isinstance(base, fx.Node) and base.op == "placeholder":
            dim = sliced_dim(index)
            if dim is not None:
                return CacheWindow(cache=base, read=current, source=_source_name(base), dim=dim)
            return f"cache {_source_name(base)} is read with an index the pass does not support: {index!r}"
    return "keys/values are not read from a cache input"


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


def _match(node: fx.Node) -> tuple[AttentionSite | None, Declined | None]:
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[:3]
    windows = [_trace_window(k), _trace_window(v)]
    reasons = [w for w in windows if isinstance(w, str)]
    if reasons:
        return None, Declined(node, reasons[0], candidate=False)
    kw = dict(node.kwargs)
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
    qv, kv_ = q.meta.get("example_value"), k.meta.get("example_value")
    if qv is None or kv_ is None or qv.dim() != 4 or kv_.dim() != 4:
        return None, Declined(node, "attention operands are not 4-d [B, H, L, D]", candidate=True)
    if qv.shape[1] != kv_.shape[1]:
        return None, Declined(node, "NYI: query and key head counts differ", candidate=True)
    k_window, v_window = windows
    if k_window.cache is v_window.cache:
        return None, Declined(node, "keys and values are read from the same input", candidate=True)
    param = _nearest_param(node)
    return (
        AttentionSite(
            node=node, q=q, k=k, v=v, scale=kw.get("scale"),
            k_window=k_window, v_window=v_window,
            layer_key=param if param is not None else k_window.cache,
            layer_key_kind="param" if param is not None else "cache",
            writes_in_graph=_writes_into(k_window.cache),
        ),
        None,
    )


def find_attention_sites(graph: fx.Graph) -> tuple[list[AttentionSite], list[Declined]]:
    """Every attention call of ``graph``: rewritable sites, and declined calls with their reasons."""
    sites, declined = [], []
    for node in graph.nodes:
        if not is_attention(node):
            continue
        site, no = _match(node)
        if site is not None:
            sites.append(site)
        else:
            declined.append(no)
    keys = [s.layer_key for s in sites]
    if len(set(keys)) != len(keys):
        # one parameter shared by several sites cannot tell their layers apart: use the caches
        sites = [
            AttentionSite(**{**s.__dict__, "layer_key": s.k_window.cache, "layer_key_kind": "cache"})
            for s in sites
        ]
    return sites, declined
