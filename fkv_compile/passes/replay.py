"""The pipeline's write-back of a staged cache (LongLive's ``_apply_cache_updates``).

LongLive's attention clones its layer's cache, rolls and writes the clone, and attends over it; after all layers,
the pipeline makes the same roll and write on the cache itself: in a later graph that holds no attention (v1, whose
attention reads its indices with ``.item()``, a graph break), or at the end of the attention's own graph (2.0).
``compact`` serves the attention from the store (:func:`fkv_compile.passes.compact.match_compact`, *staged*), so
that write-back must not write buffers the store released, and must prove that it repeats what the store made.

In a graph compiled by a session with staged sites, every input laid out like a cache ``[B, L, H, D]`` that the
graph only writes along dim 1 (``buf[:, a:b] = x``) and rolls (``buf[:, d:d+n] = buf[:, a:b].clone()``), besides
serving a staged attention op of the same graph, has each of those steps replaced by ``fkv::replay_write`` /
``fkv::replay_roll``, in order (after that attention op). At run time they make the step
on buffers compact does not own, and check it against the store's on buffers it does
(:meth:`fkv_compile.modes.guard.CompactCaches.replayed`). The ops declare no mutation (a released buffer must not
be copied back by functionalization): their tokens become extra graph outputs, which keeps them live and ordered,
and :func:`dropping_outputs` hides them from dynamo.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..ops import REPLAY_ROLL_OP, REPLAY_WRITE_OP, STAGED_OP
from .compact import classify_accesses, slice_of
from .rewrite import erase_dead_chain, with_example

__all__ = ["rewrite_replays", "dropping_outputs"]


def _steps(buffer: fx.Node, staged: fx.Node | None) -> list[tuple[fx.Node, slice, slice | None]] | None:
    """The writes and rolls of ``buffer`` in graph order as ``(setitem, destination, roll source or None)``, or
    ``None`` if the graph uses it otherwise than by them and the ``staged`` op it serves, if any (then its writes
    stay as traced, and the guard sees them)."""
    example = buffer.meta.get("example_value")
    uses = (staged,) if staged is not None else ()
    found = classify_accesses(buffer, uses) if isinstance(example, torch.Tensor) and example.dim() == 4 else ""
    if isinstance(found, str):
        return None
    writes, rolls = found
    steps = [(w, slice_of(w.args[1]), None) for w in writes] + [(r, dst, src) for r, dst, src in rolls]
    if any(b.stop is None or b.step not in (None, 1) for _, dst, src in steps for b in (dst, src) if b is not None):
        return None
    order = {node: i for i, node in enumerate(buffer.graph.nodes)}
    return sorted(steps, key=lambda step: order[step[0]]) or None


def rewrite_replays(gm: fx.GraphModule, session: int) -> int:
    """Replace the write-back steps of every such buffer input (module doc); returns the number of tokens added
    to the graph's outputs."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], (tuple, list)):
        return 0
    staged = {buffer: node for node in gm.graph.nodes if node.target is STAGED_OP for buffer in node.args[3:5]}
    tokens = []
    for buffer in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        steps = _steps(buffer, staged.get(buffer))
        for setitem, dst, src in steps or ():
            if tokens and tokens[-1].args[0] is buffer:
                after = [tokens.pop()]
            else:  # a write-back in the staged attention's own graph comes after it (its output orders them)
                after = [staged[buffer]] if buffer in staged else []
            with gm.graph.inserting_before(setitem):
                if src is None:
                    token = gm.graph.call_function(REPLAY_WRITE_OP, args=(buffer, setitem.args[2], dst.start or 0,
                                                                          dst.stop, after, session))
                else:
                    token = gm.graph.call_function(REPLAY_ROLL_OP, args=(buffer, dst.start or 0, src.start or 0,
                                                                         src.stop, after, session))
            tokens.append(with_example(token, buffer, lambda b: b.new_empty(0)))
            value = setitem.args[2]
            gm.graph.erase_node(setitem)
            if src is not None:  # the roll's source read
                erase_dead_chain(gm, value)
    if tokens:
        output.args = ((*output.args[0], *tokens),)
    return len(tokens)


def dropping_outputs(compiled: Callable[..., Any], extra: int) -> Callable[..., Any]:
    """``compiled`` returning all but its last ``extra`` outputs (the replay tokens dynamo does not expect)."""
    def run(*args: Any) -> Any:
        return compiled(*args)[:-extra]

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
    return run
