"""Run-time state of one ``torch.compile(..., backend="forcing_kv")`` call, owned by the compiled model.

A :class:`Session` holds the config, what the pass found (sites, frames), per-layer statistics,
profile records and compact stores. It belongs to the module ``torch.compile`` returned (dynamo's
``OptimizedModule``): the backend finds that module on the call stack of the compile and the session
lives exactly as long as it does, stores and all. Dynamo itself keeps every compiled function in the
globals of the model's code, even after ``torch._dynamo.reset()``, so the compiled graphs must not
hold the session: they carry only the integer session and site ids (baked into the custom-op calls,
so the FX graph cache key covers them) and the ops look the session up here. A compiled *function*
(no module) keeps its session through its compiled functions instead. ``report`` finds a compiled
module's session by the module, anything else's by the ``options`` mapping it was compiled with.

A compiled graph may serve every layer, so the layer is resolved at run time from a per-layer tensor
the graph receives (a parameter of the attention's module, else the cache tensor), bound to layer
indices in order of first execution.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Choice, Config, OptionsError
from ..plan import HeadPlan, PlanError
from .calibration import Calibrator, Geometry
from .dispatch import Kernels, kernels_for
from .guard import CompactCaches
from .order import WindowOrder
from .select import SelectionMemo
from .sharding import HeadShard
from .store import LayerStore

__all__ = ["Session", "SiteAction", "SiteRecord", "FrameRecord", "LayerStats", "session", "open_session",
           "session_for_options", "session_of_compiled", "compiling_module", "resolve", "running_session"]


class SiteAction(Choice):
    """What the pass did with an attention call (a row of the report)."""

    REWRITTEN = "rewritten"  # into the mode's op (oracle, select, profile)
    FOUND = "found"  # mode off: found, left as it is
    LEFT_ALONE = "left alone"  # not a site the pass understands: unchanged, with the reason
    COMPACT = "compact"  # cache writes, rolls and the window read served by the compact store
    SELECT = "select"  # mode compact, but the store cannot own the cache: select, with the reason

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
    checks_order: bool = False  # written by code outside the graph: its order is proven at run time (.order)


@dataclass
class FrameRecord:
    """One code object dynamo compiled for this session (a graph break starts a new one)."""

    frame: int
    function: str
    compiles: int = 0  # variants compiled; the ones after the first are recompiles
    at_limit: bool = False  # reached torch._dynamo.config.recompile_limit: new variants (and callees') run eager
    ints: dict[str, set[int]] = field(default_factory=dict)  # the Python ints its variants specialized on: values
    exprs: dict[str, set[int]] = field(default_factory=dict)  # the int expressions its code pinned: values

    def changing(self) -> tuple[list[str], list[str]]:
        """The specialized ints, and the pinned expressions, whose value differs between variants (positions: a
        recompile per new value)."""
        return ([name for name, values in self.ints.items() if len(values) > 1],
                [expr for expr, values in self.exprs.items() if len(values) > 1])


@dataclass
class LayerStats:
    """What the rewritten attention of one layer did, over all calls so far."""

    layer: int
    sites: set[int] = field(default_factory=set)
    calls: int = 0
    dense_calls: int = 0  # calls whose shapes did not fit the plan's geometry
    out_of_order: int = 0  # calls whose window was not in written order (.order), dense too
    kept: tuple[float, ...] | torch.Tensor = ()  # key tokens per head in the last fitting call (compact: on device)
    window: int = 0  # key tokens of the dense window in that call


class Session:
    """Everything the backend and the ops of one compile call share."""

    def __init__(self, sid: int, options: Mapping[str, Any] | None, config: Config):
        self.id = sid
        self.options = options  # held so that id(options) stays unique while the session lives
        self.given = dict(options or {})  # what options held at the first compile: the plan is read once
        self.config = config
        self.plan: HeadPlan | None = config.plan  # the plan in use: None while calibrating; this rank's heads of it
        self.shard: HeadShard | None = None  # head parallelism: this rank's heads of config.plan (set by the pass)
        self.num_layers: int | None = None if config.plan is None else config.plan.num_layers
        self.calibrator: Calibrator | None = None  # set by the pass when the model calibrates itself
        self.patch_geometry: list[Geometry] = []  # of the patch embeddings traced in this session's graphs
        self.graphs = 0
        self.sites: list[SiteRecord] = []
        self.frames: dict[int, FrameRecord] = {}
        self.layers: dict[int, LayerStats] = {}
        self.profile_records: list = []  # fkv_compile.modes.profile.MassRecord, in call order (mode "profile")
        self.compact = CompactCaches(self._new_store, trust=config.release == "trust")  # mode "compact"
        self.selections = SelectionMemo()  # mode "select" (and compact's dense layers): ranges chosen once per chunk
        self.order = WindowOrder()  # whether each call's window is in written order
        self.staged = False  # a compact site on a staged cache was compiled: write-back graphs get replay ops
        self.owned = False  # by a compiled module (else by the compiled functions)
        self._bindings: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def belong_to(self, compiled: torch.nn.Module | None) -> None:
        """Make ``compiled`` (the module torch.compile returned) own this session: it lives as long as the module."""
        if compiled is not None:
            _BY_COMPILED[compiled] = self
            self.owned = True

    def owns(self, compiled_fn: Callable[..., Any]) -> Callable[..., Any]:
        """What the backend returns to dynamo: ``compiled_fn`` itself when a compiled module owns this session,
        else ``compiled_fn`` wrapped so that the compiled function keeps the session alive."""
        if self.owned:
            return compiled_fn

        def run(*args: Any, _owner: Session = self) -> Any:
            return compiled_fn(*args)

        run._boxed_call = getattr(compiled_fn, "_boxed_call", False)  # type: ignore[attr-defined]
        return run

    def sibling(self) -> Session:
        """The session of another compiled module that runs this session's graphs: dynamo keeps one set of graphs per
        code object, so a second model of the same class compiled with equal options reuses the first one's. It
        shares this session's compile-time records (sites, frames, the plan fitted to the traced shapes) and has
        run-time state of its own (layers, stores, selections, its own calibration)."""
        other = Session(next(_IDS), self.options, self.config)
        other.sites, other.frames, other.graphs, other.shard = self.sites, self.frames, self.graphs, self.shard
        other.staged = self.staged
        if self.calibrator is None:
            other.plan, other.num_layers = self.plan, self.num_layers
        else:
            other.plan, other.num_layers = None, None
            other.calibrator = Calibrator(self.config.calibration, self.calibrator.geometry, self.calibrator.template)
        _LIVE[other.id] = other
        return other

    def new_site(self, **fields: Any) -> SiteRecord:
        record = SiteRecord(site=len(self.sites), **fields)
        self.sites.append(record)
        return record

    def layer_of(self, site: int, key: torch.Tensor) -> int:
        """The layer index of the tensor ``key`` identifies, binding new keys in order of first use."""
        kind = self.sites[site].layer_key
        storage = key.untyped_storage()
        # a parameter by its data (AOT autograd may hand the op an alias of it); a cache by its storage, the same
        # after compact released it (its data pointer is then 0 for every released cache)
        ident = (kind, storage._cdata if kind == "cache" else storage.data_ptr())
        with self._lock:
            layer = self._bindings.get(ident)
            if layer is not None and self.num_layers is None:  # calibrating: back at layer 0, every layer is bound
                self.num_layers = len(self._bindings)
            num_layers = self.num_layers
            if layer is not None:
                if layer == 0 and len(self._bindings) < num_layers and self.layers.get(0, LayerStats(0)).calls:
                    raise PlanError(
                        f"plan does not match the model: num_layers: plan has {num_layers}, the model "
                        f"ran {len(self._bindings)} attention layers before returning to layer 0"
                    )
                return layer
            if num_layers is not None and len(self._bindings) == num_layers:
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

    def calibrating(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> bool:
        """Whether this attention call runs dense for calibration (its frame mass recorded); the call that ends
        calibration installs the plan made and returns False."""
        if self.plan is not None:
            return False
        plan = self.calibrator.step(layer, q, k, scale, self.num_layers)  # made for, or checked against, num_layers
        if plan is None:
            return True
        self.plan = plan
        return False

    def _new_store(self, layer: int, device: torch.device) -> LayerStore:
        return LayerStore(self.plan, layer, self.kernels(device), keep_protected=self.config.kv_recache,
                          shard=self.shard)

    def record(self, site: int, layer: int, kept: tuple[float, ...] | torch.Tensor, window: int, fits: bool,
               ordered: bool = True) -> None:
        """Count a call of the rewritten attention; ``kept`` may be a device tensor (read only by the report)."""
        stats = self.layers.setdefault(layer, LayerStats(layer))
        stats.sites.add(site)
        stats.calls += 1
        if fits and ordered:
            stats.kept, stats.window = kept, window
        else:
            stats.dense_calls += 1
            stats.out_of_order += not ordered


_LIVE: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()  # id -> session, for the ops
_BY_OPTIONS: weakref.WeakValueDictionary[int, Session] = weakref.WeakValueDictionary()  # id(options) -> session
_BY_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, Session] = weakref.WeakKeyDictionary()  # the owners
_IDS = itertools.count()


def session(sid: int) -> Session:
    try:
        return _LIVE[sid]
    except KeyError:
        raise RuntimeError(
            f"fkv_compile session {sid} is unknown in this process; a compiled graph was reused from a cache "
            "without its backend, or its compiled model was dropped (compile the model again with "
            "backend='forcing_kv')"
        ) from None


def resolve(sid: int, site: int, layer_key: torch.Tensor) -> tuple[Session, int]:
    """The session an op call runs in, and its layer. A graph carries the id of the session it was compiled in, but
    dynamo keeps one set of graphs per code object: a second model of the same class, compiled with equal options,
    runs the first one's graphs. So a graph compiled for a module runs in the session of the compiled module being
    called (found on the call stack), a :meth:`Session.sibling` of the compiling one if that module compiled
    nothing itself."""
    found = running_session(sid)
    return found, found.layer_of(site, layer_key)


def running_session(sid: int) -> Session:
    """The session of the compiled module being called, for a graph compiled in session ``sid`` (see :func:`resolve`)."""
    found = compiled_in = session(sid)
    if compiled_in.owned:
        caller = compiling_module()
        if caller is not None:
            found = session_of_compiled(caller)
            if found is None:
                found = compiled_in.sibling()
                found.belong_to(caller)
    return found


def session_for_options(options: Mapping[str, Any]) -> Session | None:
    """The live session of a ``torch.compile`` call, by the very ``options`` mapping it was given."""
    return _BY_OPTIONS.get(id(options))


def session_of_compiled(compiled: torch.nn.Module) -> Session | None:
    """The session a compiled module (what ``torch.compile(module, ...)`` returned) owns, if any."""
    try:
        return _BY_COMPILED.get(compiled)
    except TypeError:  # not weakly referenceable: never an owner
        return None


def open_session(options: Mapping[str, Any] | None, compiled: torch.nn.Module | None,
                 config_of: Callable[[Mapping[str, Any] | None], Config]) -> Session:
    """The session of this ``torch.compile`` call, created on first use: the one the compiled module being compiled
    owns, else (a compiled function) the one of this very options mapping. ``config_of`` validates the options; it
    runs once per session (a plan given as a file is read once), and again only to say that the options changed."""
    existing = session_of_compiled(compiled) if compiled is not None else _BY_OPTIONS.get(id(options))
    if existing is not None:
        if dict(options or {}) != existing.given and config_of(options) != existing.config:
            raise OptionsError("the options of a compiled model were changed after its first compile; compile it anew")
        return existing
    s = Session(next(_IDS), options, config_of(options))
    _LIVE[s.id] = s
    _BY_OPTIONS[id(options)] = s
    s.belong_to(compiled)
    return s


def _is_compiled_module(obj: object) -> bool:
    """What ``torch.compile(module)`` returns: a module wrapping the original as ``_orig_mod``."""
    return isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "_orig_mod", None), torch.nn.Module)


def compiling_module() -> torch.nn.Module | None:
    """The compiled module being called: the nearest caller frame running ``OptimizedModule.__call__`` (dynamo
    compiles in the calling thread, before the frame runs, so at compile time it is on the stack too), or ``None``
    for a compiled function. Only frames of that one code object are looked into, so this is cheap enough for every
    op call."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _COMPILED_CALL:
            candidate = frame.f_locals.get("self")
            if _is_compiled_module(candidate):
                return candidate
        frame = frame.f_back
    return None


_COMPILED_CALL = torch._dynamo.eval_frame.OptimizedModule.__call__.__code__
