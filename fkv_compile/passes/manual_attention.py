"""Hand-written attention in a dynamo FX graph: ``softmax(q @ k^T * scale, dim=-1) @ v``.

Accepted forms (any combination): the scale multiplied or divided in before or after the first
matmul (``q * s @ k^T``, ``(q @ k^T) * s``, ``(q @ k^T) / sqrt(d)``, no scale), ``k.transpose(-2, -1)``
or ``(2, 3)`` or ``torch.transpose``, ``@`` or ``torch.matmul``, ``torch.softmax``/``F.softmax``/
``.softmax`` over the last dim, dtype casts around the softmax (``.float()``, ``.to``, ``.type_as``).
The probabilities and scores must feed nothing else (a model that returns its attention weights
keeps its dense attention). Scales must be Python numbers (graph constants).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["ManualAttention", "match_manual_attention"]

_MATMULS = (operator.matmul, torch.matmul)
_SOFTMAX_FUNCTIONS = (torch.softmax, F.softmax, torch.Tensor.softmax)
_CASTS = frozenset({"float", "to", "type_as", "half", "bfloat16", "double"})


@dataclass(frozen=True)
class ManualAttention:
    out: fx.Node  # the final matmul: the node the rewrite replaces
    q: fx.Node
    k: fx.Node  # before its transpose
    v: fx.Node
    scale: float
    internal: tuple[fx.Node, ...]  # nodes that die with the rewrite, output first


def _is_matmul(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MATMULS


def _skip_casts(node: object, internal: list[fx.Node]) -> object:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CASTS:
        internal.append(node)
        node = node.args[0]
    return node


def _softmax_input(node: object) -> fx.Node | None:
    """The input of a last-dim softmax node, else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    is_method = node.op == "call_method" and node.target == "softmax"
    if not (is_method or (node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS)):
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return node.args[0] if dim in (-1, 3) else None


def _scaled(node: object, internal: list[fx.Node]) -> tuple[object, float]:
    """Peel ``x * c``, ``c * x`` and ``x / c`` (``c`` a number) off ``node``; the core and the product of scales."""
    scale = 1.0
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (operator.mul, operator.truediv):
        a, b = node.args
        if node.target is operator.mul and isinstance(b, (int, float)) and isinstance(a, fx.Node):
            scale, core = scale * b, a
        elif node.target is operator.mul and isinstance(a, (int, float)) and isinstance(b, fx.Node):
            scale, core = scale * a, b
        elif node.target is operator.truediv and isinstance(b, (int, float)) and isinstance(a, fx.Node) and b:
            scale, core = scale / b, a
        else:
            break
        internal.append(node)
        node = core
    return node, scale


def _untransposed(node: object) -> fx.Node | None:
    """``k`` of ``k.transpose(-2, -1)`` (or dims 2, 3, either order)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "transpose" or (
            node.op == "call_function" and node.target is torch.transpose):
        dims = {d % 4 if isinstance(d, int) else None for d in node.args[1:3]}
        if dims == {2, 3} and isinstance(node.args[0], fx.Node):
            return node.args[0]
    return None


def match_manual_attention(node: fx.Node) -> ManualAttention | None:
    """The hand-written attention whose output is ``node``, or ``None``."""
    if not _is_matmul(node) or len(node.args) != 2:
        return None
    internal = [node]
    probs, v = node.args
    softmax = _skip_casts(probs, internal)
    scores = _softmax_input(softmax)
    if scores is None:
        return None
    internal.append(softmax)
    scores, scale = _scaled(_skip_casts(scores, internal), internal)
    if not _is_matmul(scores):
        return None
    internal.append(scores)
    q, k_t = scores.args
    q, q_scale = _scaled(q, internal)
    k = _untransposed(k_t)
    if k is None or not isinstance(q, fx.Node) or not isinstance(v, fx.Node):
        return None
    internal.append(k_t)
    inner = set(internal)
    if any(user not in inner for n in internal[1:] for user in n.users):
        return None  # scores or probabilities are used elsewhere
    return ManualAttention(out=node, q=q, k=k, v=v, scale=scale * q_scale, internal=tuple(internal))
