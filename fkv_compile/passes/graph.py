"""Small questions about dynamo FX graph nodes the matchers ask: views, clones, slices, inputs, parameters, writes."""

from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

__all__ = ["source_name", "is_view_like", "is_clone", "sliced_dim", "through_views", "cat_operands", "hint",
           "inputs_under", "is_param", "nearest_param", "writes_into"]

# methods and functions that neither move tokens between positions nor change values (bar casts)
_VIEW_METHODS = frozenset(
    {"transpose", "permute", "view", "reshape", "flatten", "unflatten", "contiguous", "to", "type", "type_as",
     "float", "half", "bfloat16", "double", "clone", "detach"}
)


_VIEW_FUNCTIONS = frozenset(
    {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten, torch.clone, torch.Tensor.contiguous}
)


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


def through_views(node: object) -> object:
    while isinstance(node, fx.Node) and is_view_like(node):
        node = node.args[0]
    return node


def cat_operands(cat: fx.Node) -> tuple[object, object]:
    """The tensors and the dim of a ``torch.cat`` node, given positionally or by keyword."""
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    return parts, cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)


def hint(value: object) -> int | None:
    """An int, or a symbolic int's traced value (``None`` if it has none)."""
    return value.node.hint if isinstance(value, torch.SymInt) else value


def inputs_under(node: fx.Node) -> list[fx.Node]:
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


def is_param(node: fx.Node) -> bool:
    return node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def nearest_param(start: fx.Node) -> fx.Node | None:
    """The parameter input closest to ``start`` in the graph (undirected breadth-first search)."""
    seen, queue = {start}, deque([start])
    while queue:
        node = queue.popleft()
        for nxt in (*node.all_input_nodes, *node.users):
            if nxt in seen:
                continue
            if is_param(nxt):
                return nxt
            seen.add(nxt)
            queue.append(nxt)
    return None


def writes_into(cache: fx.Node) -> bool:
    for user in cache.users:
        if user.op == "call_function" and user.target is operator.setitem and user.args[0] is cache:
            return True
        if user.op == "call_method" and str(user.target).endswith("_") and user.args[0] is cache:
            return True
    return False
