"""LongLive v1's clone-and-defer cache, as ``compact`` meets it in separate graphs.

Per layer and call the model clones the whole cache (``temp = kv_cache["k"].clone()``), rolls and
writes the new chunk into the clone, attends over it, and hands the clone back; after all layers the
pipeline copies every clone into its cache (``kv_cache["k"].copy_(temp)``). Under dynamo the three
steps land in different graphs: the clone (its graph returns it), the attention site (the clone is
an input, its accesses are what :func:`fkv_compile.passes.compact.match_compact` owns), and the
write-back.

``compact`` removes the clone, which copies the whole dense cache on every call, in two stages,
since no single graph shows the whole chain:

- a graph that returns clones of its inputs (:func:`find_deferred_clones`) is lowered twice, as
  traced and with each clone replaced by its input (:func:`elide_clones`); at run time it runs as
  traced until a compact store op received its clones as the caches of a site it owns (the session's
  :class:`fkv_compile.modes.deferred.DeferredClones`), then it returns the cache itself;
- the write-back then copies a cache onto itself: dynamo passes the one tensor once, so the graph
  holds ``copy_(x, x)``, a no-op that :func:`erase_self_copies` removes (the buffer is released by
  then, and a functionalized self-copy would read it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import source_name

__all__ = ["DeferredClone", "find_deferred_clones", "elide_clones", "erase_self_copies"]


@dataclass(frozen=True)
class DeferredClone:
    """``clone(input)`` returned as graph output ``output`` and used nowhere else in its graph."""

    node: fx.Node
    source: fx.Node  # the placeholder cloned
    name: str  # the source's name (``L['kv_cache']['k']``)
    output: int  # its index among the graph's outputs


def _is_cache_like(node: fx.Node) -> bool:
    """A graph input laid out like a KV cache ``[B, L, H, D]`` (only a store op's claim proves it is one)."""
    example = node.meta.get("example_value")
    return isinstance(example, torch.Tensor) and example.dim() == 4


def _is_clone(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target == "clone" and len(node.args) == 1 and not node.kwargs)
            or (node.op == "call_function" and node.target is torch.clone and len(node.args) == 1 and not node.kwargs))


def find_deferred_clones(gm: fx.GraphModule) -> list[DeferredClone]:
    """The clones of cache-like inputs that the graph only returns (LongLive v1's ``temp = cache.clone()``)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    found = []
    for index, value in enumerate(results):
        if not isinstance(value, fx.Node) or not _is_clone(value):
            continue
        source = value.args[0]
        if (isinstance(source, fx.Node) and source.op == "placeholder" and _is_cache_like(source)
                and set(source.users) == {value} and set(value.users) == {output} and results.count(value) == 1):
            found.append(DeferredClone(node=value, source=source, name=source_name(source), output=index))
    return found


def elide_clones(gm: fx.GraphModule, clones: list[DeferredClone]) -> fx.GraphModule:
    """A copy of ``gm`` that returns each clone's input in place of the clone (``gm`` is left as it is)."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, mapping))
    for clone in clones:
        copied = mapping[clone.node]
        copied.replace_all_uses_with(mapping[clone.source])
        graph.erase_node(copied)
    graph.lint()
    return fx.GraphModule(gm, graph)


def erase_self_copies(gm: fx.GraphModule) -> int:
    """Erase ``x.copy_(x)`` (the deferred write-back once the clone is the cache itself); how many."""
    erased = 0
    for node in list(gm.graph.nodes):
        is_copy = (node.op == "call_method" and node.target == "copy_") or (
            node.op == "call_function" and node.target in (torch.Tensor.copy_, torch.ops.aten.copy_.default))
        if is_copy and len(node.args) == 2 and node.args[0] is node.args[1] and not node.users and not node.kwargs:
            gm.graph.erase_node(node)
            erased += 1
    return erased
