"""The pipeline's write-back of a staged cache, in a graph of its own (LongLive v1's ``_apply_cache_updates``).

LongLive v1's attention reads its position indices with ``.item()`` (a graph break), clones its layer's cache,
rolls and writes the clone, and attends over it; after all layers, the pipeline makes the same roll and write on the
cache itself, in a later graph that holds no attention. ``compact`` serves the attention from the store
(:func:`fkv_compile.passes.compact.match_compact`, *staged*), so that later graph must not write buffers the store
released, and must prove that it repeats what the store made.

In a graph compiled by a session with staged sites, every input laid out like a cache ``[B, L, H, D]`` that the
graph only writes along dim 1 (``buf[:, a:b] = x``) and rolls (``buf[:, d:d+n] = buf[:, a:b].clone()``) has each
of those steps replaced by ``fkv::replay_write`` / ``fkv::replay_roll``, in order. At run time they make the step
on buffers compact does not own, and check it against the store's on buffers it does
(:meth:`fkv_compile.modes.guard.CompactCaches.replayed`). The ops declare no mutation (a released buffer must not
be copied back by functionalization): their tokens become extra graph outputs, which keeps them live and ordered,
and :func:`dropping_outputs` hides them from dynamo.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..ops import REPLAY_ROLL_OP, REPLAY_WRITE_OP
from .compact import is_clone, roll_source, slice_of

__all__ = ["rewrite_replays", "dropping_outputs"]


def _is_setitem_into(node: fx.Node, buffer: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.setitem and node.args[0] is buffer


def _steps(buffer: fx.Node) -> list[tuple[fx.Node, slice, slice | None]] | None:
    """The writes and rolls of ``buffer`` in graph order as ``(setitem, destination, roll source or None)``, or
    ``None`` if the graph uses it otherwise (then its writes stay as traced, and the guard sees them)."""
    example = buffer.meta.get("example_value")
    if not (isinstance(example, torch.Tensor) and example.dim() == 4):
        return None
    steps = []
    for user in buffer.users:
        if _is_setitem_into(user, buffer):
            dst = slice_of(user.args[1])
            if dst is None or dst.stop is None or dst.step not in (None, 1):
                return None
            steps.append((user, dst, roll_source(user.args[2], buffer)))
            continue
        if not _only_rolled(user, buffer):
            return None
    order = {node: i for i, node in enumerate(buffer.graph.nodes)}
    return sorted(steps, key=lambda step: order[step[0]]) or None


def _only_rolled(read: fx.Node, buffer: fx.Node) -> bool:
    """``read`` is a getitem of ``buffer`` written back into it (directly or through a clone): a roll's source."""
    if not (read.op == "call_function" and read.target is operator.getitem and read.args[0] is buffer):
        return False
    for user in read.users:
        writes = user.users if is_clone(user) else [user]
        if not all(_is_setitem_into(w, buffer) and w.args[2] in (read, user) for w in writes):
            return False
    return True


def rewrite_replays(gm: fx.GraphModule, session: int) -> int:
    """Replace the write-back steps of every such buffer input (module doc); returns the number of tokens added
    to the graph's outputs."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], (tuple, list)):
        return 0
    tokens = []
    for buffer in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        steps = _steps(buffer)
        for setitem, dst, src in steps or ():
            after = [tokens.pop()] if tokens and tokens[-1].args[0] is buffer else []
            with gm.graph.inserting_before(setitem):
                if src is None:
                    token = gm.graph.call_function(REPLAY_WRITE_OP, args=(buffer, setitem.args[2], dst.start or 0,
                                                                          dst.stop, after, session))
                else:
                    token = gm.graph.call_function(REPLAY_ROLL_OP, args=(buffer, dst.start or 0, src.start or 0,
                                                                         src.stop, after, session))
            token.meta["example_value"] = _empty_like(buffer)
            tokens.append(token)
            value = setitem.args[2]
            gm.graph.erase_node(setitem)
            while src is not None and isinstance(value, fx.Node) and not value.users:  # the roll's source read
                inputs = value.all_input_nodes
                gm.graph.erase_node(value)
                value = inputs[0] if len(inputs) == 1 and inputs[0] is not buffer else None
    if tokens:
        output.args = ((*output.args[0], *tokens),)
    return len(tokens)


def _empty_like(buffer: fx.Node) -> object:
    example = buffer.meta["example_value"]
    fake_mode = getattr(example, "fake_mode", None)
    if fake_mode is None:
        return example.new_empty(0)
    with fake_mode:
        return example.new_empty(0)


def dropping_outputs(compiled: Callable[..., Any], extra: int) -> Callable[..., Any]:
    """``compiled`` returning all but its last ``extra`` outputs (the replay tokens dynamo does not expect)."""
    def run(*args: Any) -> Any:
        return compiled(*args)[:-extra]

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
    return run
