"""Run-time state of one ``torch.compile(..., backend="forcing_kv")`` call: plan, sites, layer bindings, stats.

Compiled graphs carry only an integer session id and site id (baked into the custom-op calls, so
the FX graph cache key covers them); the ops look the session up here. A compiled graph may serve
every layer, so the layer is resolved at run time from a per-layer tensor the graph receives (a
parameter of the attention's module, else the cache tensor), bound to layer indices in order of
first execution.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .kernels import use_triton
from .plan import HeadPlan, PlanError
from .store import LayerStore

__all__ = ["Session", "SiteRecord", "FrameRecord", "LayerStats", "session", "session_for_options"]

MODES: tuple[str, ...] = ("off", "oracle", "select", "compact", "profile")
LOWERINGS: tuple[str, ...] = ("inductor", "aot_eager", "eager")


@dataclass
class SiteRecord:
    """One attention call found in a compiled graph, and what the pass did with it."""

    site: int
    graph: int
    node: str
    pattern: str
    action: str  # "rewritten", "found" (mode off), or "left alone"
    reason: str = ""
    cache: str = ""
    layer_key: str = ""  # "param" or "cache": which tensor identifies the layer at run time


@dataclass
class FrameRecord:
    """One code object dynamo compiled for this session (a graph break starts a new one)."""

    frame: int
    function: str
    compiles: int = 0  # variants compiled; the ones after the first are recompiles
    at_limit: bool = False  # reached torch._dynamo.config.recompile_limit: new variants (and callees') run eager


@dataclass
class LayerStats:
    """What the rewritten attention of one layer did, over all calls so far."""

    layer: int
    sites: set[int] = field(default_factory=set)
    calls: int = 0
    dense_calls: int = 0  # calls whose shapes did not fit the plan's geometry
    kept: tuple[float, ...] = ()  # key tokens per head in the last fitting call
    window: int = 0  # key tokens of the dense window in that call


class Session:
    """Everything the backend and the ops of one compile call share."""

    def __init__(self, sid: int, options: Mapping[str, Any], plan: HeadPlan, mode: str, lowering: str, strict: bool,
                 kernels: str = "auto"):
        self.id = sid
        self.options = options  # held so that id(options) stays unique while the session lives
        self.plan = plan
        self.mode = mode
        self.lowering = lowering
        self.strict = strict
        self.kernels = kernels  # "auto", "torch" or "triton" (fkv_compile.kernels)
        self.graphs = 0
        self.sites: list[SiteRecord] = []
        self.frames: dict[int, FrameRecord] = {}
        self.layers: dict[int, LayerStats] = {}
        self.profile_records: list = []  # fkv_compile.profile.MassRecord, in call order (mode "profile")
        self.stores: dict[int, LayerStore] = {}  # mode "compact"
        self.dense_bytes: dict[int, int] = {}  # per layer: K + V bytes of the dense buffers released
        self._bindings: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def new_site(self, **fields: Any) -> SiteRecord:
        record = SiteRecord(site=len(self.sites), **fields)
        self.sites.append(record)
        return record

    def layer_of(self, site: int, key: torch.Tensor) -> int:
        """The layer index of the tensor ``key`` identifies, binding new keys in order of first use."""
        kind = self.sites[site].layer_key
        ident = (kind, key.untyped_storage().data_ptr())
        with self._lock:
            layer = self._bindings.get(ident)
            if layer is not None:
                if layer == 0 and len(self._bindings) < self.plan.num_layers and self.layers.get(0, LayerStats(0)).calls:
                    raise PlanError(
                        f"plan does not match the model: num_layers: plan has {self.plan.num_layers}, the model "
                        f"ran {len(self._bindings)} attention layers before returning to layer 0"
                    )
                return layer
            if len(self._bindings) == self.plan.num_layers:
                if kind == "cache" and all(k == "cache" for k, _ in self._bindings):
                    self._bindings.clear()  # a new video: the pipeline allocated fresh caches
                else:
                    raise PlanError(
                        f"plan does not match the model: num_layers: plan has {self.plan.num_layers}, the model "
                        f"runs more attention layers (site {site} found layer {len(self._bindings) + 1})"
                    )
            layer = len(self._bindings)
            self._bindings[ident] = layer
            return layer

    def triton(self, device: torch.device) -> bool:
        """Whether the ops run the Triton kernels on ``device`` (see :func:`fkv_compile.kernels.use_triton`)."""
        return use_triton(self.kernels, device)

    def store(self, layer: int, device: torch.device) -> LayerStore:
        if layer not in self.stores:
            self.stores[layer] = LayerStore(self.plan, layer, triton=self.triton(device))
        return self.stores[layer]

    def release(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """Free the pipeline's dense buffers of ``layer`` (storage resized to 0, as FSDP does).

        Only called from ops of sites whose every cache access the pass rewrote; a later read of the
        buffer from outside fails loudly (``RuntimeError: ... out of bounds``), it never sees stale data.
        """
        nbytes = cache_k.untyped_storage().nbytes() + cache_v.untyped_storage().nbytes()
        if nbytes:  # a new video may bring new buffers: they are released too
            self.dense_bytes[layer] = nbytes
            cache_k.untyped_storage().resize_(0)
            cache_v.untyped_storage().resize_(0)

    def record(self, site: int, layer: int, kept: tuple[float, ...], window: int, fits: bool) -> None:
        stats = self.layers.setdefault(layer, LayerStats(layer))
        stats.sites.add(site)
        stats.calls += 1
        if fits:
            stats.kept, stats.window = kept, window
        else:
            stats.dense_calls += 1


_SESSIONS: dict[int, Session] = {}
_BY_OPTIONS: dict[int, Session] = {}
_IDS = itertools.count()


def session(sid: int) -> Session:
    try:
        return _SESSIONS[sid]
    except KeyError:
        raise RuntimeError(
            f"fkv_compile session {sid} is unknown in this process; a compiled graph was reused from a cache "
            "without its backend (compile the model again with backend='forcing_kv')"
        ) from None


def session_for_options(options: Mapping[str, Any]) -> Session | None:
    return _BY_OPTIONS.get(id(options))


def open_session(options: Mapping[str, Any], plan: HeadPlan, mode: str, lowering: str, strict: bool,
                 kernels: str = "auto") -> Session:
    """The session of this options mapping (one per ``torch.compile`` call), created on first use."""
    existing = _BY_OPTIONS.get(id(options))
    if existing is not None:
        return existing
    s = Session(next(_IDS), options, plan, mode, lowering, strict, kernels)
    _SESSIONS[s.id] = s
    _BY_OPTIONS[id(options)] = s
    return s
