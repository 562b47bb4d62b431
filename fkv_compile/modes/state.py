"""Run-time state of one ``torch.compile(..., backend="forcing_kv")`` call, owned by its compiled graphs.

A :class:`Session` holds the config, what the pass found (sites, frames), per-layer statistics,
profile records and compact stores. Every callable the backend returns keeps its session alive, so a
session lives exactly as long as some compiled graph of it does: dropping the model and resetting
dynamo frees it, stores and all. Compiled graphs carry only the integer session and site ids (baked
into the custom-op calls, so the FX graph cache key covers them); the ops look the session up in a
weak registry. ``report`` finds a model's session through the tensors its graphs read (the model's
parameters and buffers), or exactly through the ``options`` mapping the model was compiled with.

A compiled graph may serve every layer, so the layer is resolved at run time from a per-layer tensor
the graph receives (a parameter of the attention's module, else the cache tensor), bound to layer
indices in order of first execution.
"""

from __future__ import annotations

import enum
import itertools
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config
from ..plan import PlanError
from .dispatch import Kernels, kernels_for
from .store import LayerStore

__all__ = ["Session", "SiteAction", "SiteRecord", "FrameRecord", "LayerStats", "session", "open_session",
           "session_for_options", "sessions_reading"]


class SiteAction(str, enum.Enum):
    """What the pass did with an attention call (a row of the report)."""

    REWRITTEN = "rewritten"  # into the mode's op (oracle, select, profile)
    FOUND = "found"  # mode off: found, left as it is
    LEFT_ALONE = "left alone"  # not a site the pass understands: unchanged, with the reason
    COMPACT = "compact"  # cache writes, rolls and the window read served by the compact store
    SELECT = "select"  # mode compact, but the store cannot own the cache: select, with the reason

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def is_site(self) -> bool:
        """An attention over a KV cache the pass recognised (whatever it then did)."""
        return self is not SiteAction.LEFT_ALONE


@dataclass
class SiteRecord:
    """One attention call found in a compiled graph, and what the pass did with it."""

    site: int
    graph: int
    node: str
    pattern: str
    action: SiteAction
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

    def __init__(self, sid: int, options: Mapping[str, Any], config: Config):
        self.id = sid
        self.options = options  # held so that id(options) stays unique while the session lives
        self.config = config
        self.graphs = 0
        self.sites: list[SiteRecord] = []
        self.frames: dict[int, FrameRecord] = {}
        self.layers: dict[int, LayerStats] = {}
        self.profile_records: list = []  # fkv_compile.modes.profile.MassRecord, in call order (mode "profile")
        self.stores: dict[int, LayerStore] = {}  # mode "compact"
        self.dense_bytes: dict[int, int] = {}  # per layer: K + V bytes of the dense buffers released
        # the real tensors the graphs read (the model's parameters and buffers among them), weakly, by id: tensors
        # compare elementwise, so they cannot be set members
        self.reads: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._bindings: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def owns(self, compiled_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``compiled_fn`` (what the backend returns to dynamo) wrapped so that it keeps this session alive.

        A closure, not an attribute: dynamo does not keep the very object a backend returns (it re-wraps
        the lowering's function), but it keeps what it is given to call."""

        def run(*args: Any, _owner: Session = self) -> Any:
            return compiled_fn(*args)

        run._boxed_call = getattr(compiled_fn, "_boxed_call", False)  # type: ignore[attr-defined]
        return run

    def read(self, tensors: Iterable[torch.Tensor]) -> None:
        """Remember (weakly) the real tensors a compiled graph reads, to find this session from its model."""
        self.reads.update((id(t), t) for t in tensors)

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
            num_layers = self.config.plan.num_layers
            if layer is not None:
                if layer == 0 and len(self._bindings) < num_layers and self.layers.get(0, LayerStats(0)).calls:
                    raise PlanError(
                        f"plan does not match the model: num_layers: plan has {num_layers}, the model "
                        f"ran {len(self._bindings)} attention layers before returning to layer 0"
                    )
                return layer
            if len(self._bindings) == num_layers:
                if kind == "cache" and all(k == "cache" for k, _ in self._bindings):
                    self._bindings.clear()  # a new video: the pipeline allocated fresh caches
                else:
                    raise PlanError(
                        f"plan does not match the model: num_layers: plan has {num_layers}, the model "
                        f"runs more attention layers (site {site} found layer {len(self._bindings) + 1})"
                    )
            layer = len(self._bindings)
            self._bindings[ident] = layer
            return layer

    def kernels(self, device: torch.device) -> Kernels:
        """The implementation of the compressed ops on ``device`` (:mod:`.dispatch`)."""
        return kernels_for(self.config.kernels, device.type)

    def store(self, layer: int, device: torch.device) -> LayerStore:
        if layer not in self.stores:
            self.stores[layer] = LayerStore(self.config.plan, layer, self.kernels(device))
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


_LIVE: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()  # id -> session
_BY_OPTIONS: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()  # id(options) -> session
_IDS = itertools.count()


def session(sid: int) -> Session:
    try:
        return _LIVE[sid]
    except KeyError:
        raise RuntimeError(
            f"fkv_compile session {sid} is unknown in this process; a compiled graph was reused from a cache "
            "without its backend, or its model was dropped (compile the model again with backend='forcing_kv')"
        ) from None


def session_for_options(options: Mapping[str, Any]) -> Session | None:
    """The live session of a ``torch.compile`` call, by the very ``options`` mapping it was given."""
    return _BY_OPTIONS.get(id(options))


def open_session(options: Mapping[str, Any], config: Config) -> Session:
    """The session of this options mapping (one per ``torch.compile`` call), created on first use."""
    existing = _BY_OPTIONS.get(id(options))
    if existing is not None:
        return existing
    s = Session(next(_IDS), options, config)
    _LIVE[s.id] = s
    _BY_OPTIONS[id(options)] = s
    return s


def sessions_reading(tensors: Iterable[torch.Tensor]) -> list[Session]:
    """The live sessions whose compiled graphs read any of ``tensors``, oldest first."""
    wanted = [id(t) for t in tensors]
    return [s for _, s in sorted(_LIVE.items()) if any(i in s.reads for i in wanted)]
