"""flash-attn's varlen op in a dynamo FX graph, recognised by its schema: ``flash_attn::_flash_attn_varlen_forward``.

Wan-based pipelines pack the batch with ``q.flatten(0, 1)`` (``[B * L, H, D]``) and pass int32
``cu_seqlens`` built from Python ints. The pass can treat such a call as attention of the
``[B, L, H, D]`` tensors before the flatten when the packing is uniform, which it proves from the
shapes: ``max_seqlen_q == L_q`` and ``B * L_q`` packed queries leave no room for a shorter
sequence (same for keys). Only the output is used (not the log-sum-exp), no dropout, not causal,
no sliding window, softcap, ALiBi, paging or padding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["VarlenAttention", "match_varlen_attention", "VARLEN_OP", "arguments", "is_flatten"]

VARLEN_OP = "flash_attn::_flash_attn_varlen_forward"
_PLAIN = {"dropout_p": 0.0, "causal": False, "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
          "alibi_slopes": None, "return_softmax": False, "block_table": None, "leftpad_k": None, "seqused_k": None}


@dataclass(frozen=True)
class VarlenAttention:
    out: fx.Node  # ``op(...)[0]``: the node the rewrite replaces
    q: fx.Node  # [B, L, H, D], before the flatten
    k: fx.Node
    v: fx.Node
    scale: float | None
    internal: tuple[fx.Node, ...]


def _overload(target: object) -> torch._ops.OpOverload | None:
    """The op overload a call targets (dynamo records ``torch.ops.ns.op(...)`` as the packet)."""
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    return target if isinstance(target, torch._ops.OpOverload) else None


def arguments(node: fx.Node) -> dict[str, object]:
    schema = _overload(node.target)._schema
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update({a.name: value for a, value in zip(schema.arguments, node.args)})
    bound.update(node.kwargs)
    return bound


def is_flatten(node: object) -> bool:
    """``x.flatten(0, 1)`` (method or function)."""
    return isinstance(node, fx.Node) and (
        (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten)
    ) and tuple(node.args[1:3]) == (0, 1) and isinstance(node.args[0], fx.Node)


def _unpacked(node: object) -> fx.Node | None:
    """``x`` of ``x.flatten(0, 1)`` with ``x`` 4-d."""
    if not is_flatten(node):
        return None
    x = node.args[0]
    example = x.meta.get("example_value")
    return x if example is not None and example.dim() == 4 else None


def _equal(value: object, size: object) -> bool:
    if isinstance(value, fx.Node):
        value = value.meta.get("example_value")
    return value is not None and statically_known_true(value == size)


def match_varlen_attention(node: fx.Node) -> VarlenAttention | str | None:
    """The varlen call whose output is ``node``'s first result, a reason it cannot be treated as
    attention of the unpacked tensors, or ``None`` when ``node`` is not such a call."""
    target = _overload(node.target) if node.op == "call_function" else None
    if target is None or target._schema.name != VARLEN_OP:
        return None
    args = arguments(node)
    unusual = [name for name, plain in _PLAIN.items() if name in args and args[name] != plain]
    if unusual:
        return f"flash-attn varlen call with {', '.join(unusual)} set"
    users = list(node.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return "flash-attn varlen call whose log-sum-exp or other results are used"
    q, k, v = (_unpacked(args[name]) for name in ("q", "k", "v"))
    if q is None or k is None or v is None:
        return "flash-attn varlen call whose q/k/v are not flatten(0, 1) of [B, L, H, D] tensors"
    lq, lk = q.meta["example_value"].shape[1], k.meta["example_value"].shape[1]
    if not (_equal(args["max_seqlen_q"], lq) and _equal(args["max_seqlen_k"], lk)):
        return "flash-attn varlen call whose sequences are not provably uniform (max_seqlen != tokens per item)"
    scale = args.get("softmax_scale")
    if isinstance(scale, fx.Node):
        return "flash-attn varlen call with a computed softmax_scale"
    packed = tuple(args[name] for name in ("q", "k", "v"))
    return VarlenAttention(out=users[0], q=q, k=k, v=v, scale=scale, internal=(users[0], node, *packed))
