"""Run-time side of LongLive's clone-and-defer caches in ``compact`` (see :mod:`fkv_compile.passes.deferred`).

A graph that returns clones of its cache inputs runs as traced until the clones it returned reach a
compact store op as the caches of a site the store owns: that proves the clones are the layers'
working caches, so from then on every such graph of the session runs the variant that returns the
cache itself (no copy; a graph compiled later, for a new shape, too: its caches may be released
already), and the store releases the cache as it does for Self Forcing's. Until then the store op
must not release what it gets (the pipeline's write-back still copies the clone into the cache).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CloneGraph", "DeferredClones"]


@dataclass
class CloneGraph:
    """One compiled graph returning deferred clones, and what its last traced run returned."""

    graph: int
    sources: tuple[str, ...]  # the cloned inputs, for the report
    outputs: tuple[int, ...]  # indices of the clones among the graph's outputs
    calls: int = 0
    traced_calls: int = 0  # calls that cloned (before the proof)
    pending: list[weakref.ref] = field(default_factory=list)  # clones returned by the last traced run


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class DeferredClones:
    """The deferred-clone graphs of a session and the run-time proof that compact owns their clones."""

    def __init__(self) -> None:
        self.graphs: list[CloneGraph] = []
        self.proven = False  # a store op claimed clones: every deferred-clone graph returns the caches themselves
        self.write_backs_erased = 0  # self-copies x.copy_(x) the pass removed from write-back graphs
        self._lock = threading.Lock()

    def dispatch(self, graph: int, sources: Sequence[str], outputs: Sequence[int], traced: Callable[..., Any],
                 elided: Callable[..., Any]) -> Callable[..., Any]:
        """The callable dynamo runs for the graph: ``traced`` until proven, then ``elided``."""
        record = CloneGraph(graph, tuple(sources), tuple(outputs))
        self.graphs.append(record)
        boxed = getattr(traced, "_boxed_call", False)
        if boxed != getattr(elided, "_boxed_call", False):
            raise RuntimeError("fkv_compile: the two lowerings of a deferred-clone graph use different conventions")

        def run(*args: Any) -> Any:
            record.calls += 1
            if self.proven:
                return elided(*args)
            record.traced_calls += 1
            result = traced(*args)
            with self._lock:
                record.pending = [weakref.ref(result[i]) for i in record.outputs]
            return result

        run._boxed_call = boxed  # type: ignore[attr-defined]
        return run

    def claim(self, cache_k: torch.Tensor, cache_v: torch.Tensor) -> bool:
        """Whether ``cache_k`` and ``cache_v`` are clones a traced run just returned; claiming them proves the
        graph (its next runs return the caches themselves)."""
        wanted = {_storage(cache_k), _storage(cache_v)}
        with self._lock:
            for record in self.graphs:
                live = [t for t in (ref() for ref in record.pending) if t is not None]
                if wanted <= {_storage(t) for t in live}:
                    self.proven, record.pending = True, []
                    return True
        return False

    def summary(self) -> str:
        """One line for the report, or ``""`` when no graph returned deferred clones."""
        if not self.graphs:
            return ""
        state = "owned by the store" if self.proven else "kept: no compact site claimed the clones"
        calls = ", ".join(f"graph {r.graph} ({', '.join(r.sources)}) cloned in {r.traced_calls} of {r.calls} calls"
                          for r in self.graphs)
        return f"{state}; {calls}; {self.write_backs_erased} write-back self-copies erased"
