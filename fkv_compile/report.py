"""``fkv_compile.report(compiled_model)``: what the pass found, what it rewrote, and what each layer keeps."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from .modes.order import OUT_OF_ORDER
from .modes.state import FrameRecord, LayerStats, Session, SiteRecord, session_for_options, session_of_compiled
from .plan import DENSE, DYNAMIC, STATIC, HeadPlan
from .semantics import rank_costs

__all__ = ["Report", "LayerRow", "ShardRow", "MemoryRow", "MemoryReport", "report", "memory_report", "is_released",
           "session_of", "plan_of"]


@dataclass(frozen=True)
class LayerRow:
    """One layer's rewritten attention: roles of its heads and the tokens they visited in the last call."""

    layer: int
    sites: tuple[int, ...]
    mode: str
    dense_heads: int
    static_heads: int
    dynamic_heads: int
    kept_tokens: float  # mean over heads, last call that fit the geometry
    dense_tokens: int  # the dense window of that call
    calls: int
    dense_calls: int  # calls left dense: their shapes did not fit the plan's geometry, or their window its order
    out_of_order: int  # of those, calls whose window was not in written order (fkv_compile.modes.order)

    @property
    def kept_ratio(self) -> float:
        return self.kept_tokens / self.dense_tokens if self.dense_tokens else 1.0


@dataclass(frozen=True)
class ShardRow:
    """Head parallelism (Ulysses): this rank's heads of the plan, the key tokens every rank attends to per chunk
    at the longest window seen (from the global plan: the imbalance the all-to-all after attention waits on), and
    the layer-level selection's all-reduces this rank took part in."""

    rank: int
    world_size: int
    heads: tuple[int, int]  # [start, stop) of the plan's heads
    plan_heads: int
    window_frames: int
    kept_per_rank: tuple[float, ...]
    imbalance: float  # slowest rank over the mean, summed over layers (1.0: balanced)
    reduce_calls: int
    reduce_bytes: int

    def line(self) -> str:
        kept = ", ".join(f"{k:,.0f}" for k in self.kept_per_rank)
        return (f"head parallel: rank {self.rank} of {self.world_size}, heads {self.heads[0]}-{self.heads[1] - 1} of "
                f"{self.plan_heads}; key tokens per chunk by rank at a {self.window_frames}-frame window: [{kept}] "
                f"(imbalance {self.imbalance:.3f}); selection all-reduces: {self.reduce_calls} "
                f"({self.reduce_bytes:,} bytes)")


@dataclass(frozen=True)
class Report:
    mode: str
    graphs: int
    sites: tuple[SiteRecord, ...]
    layers: tuple[LayerRow, ...]
    memory: MemoryReport | None = None  # compact mode: KV bytes dense vs compact
    frames: tuple[FrameRecord, ...] = ()  # code objects compiled, in order of first compile
    calibration: str = ""  # compiled without a plan: the calibration's state, else empty
    compact: str = ""  # compact: the pipeline's buffers released or kept, and the layers left dense with the reason
    shard: ShardRow | None = None  # head parallelism: this rank's share
    # select: calls that chose their kept ranges, that reused their chunk's, that needed none (all heads kept all)
    selections: tuple[int, int, int] = (0, 0, 0)

    @property
    def recompiles(self) -> int:
        """Graphs compiled again for a frame already compiled (guard failures: new shapes, new int values)."""
        return sum(f.compiles - 1 for f in self.frames)

    @property
    def graph_breaks(self) -> int:
        """Frames that continue a function after a graph break (dynamo's resume functions)."""
        return sum(f.function.startswith("torch_dynamo_resume_in_") for f in self.frames)

    def table(self) -> str:
        lines = [f"fkv_compile report: mode={self.mode}, {self.graphs} graphs compiled for {len(self.frames)} frames "
                 f"({self.graph_breaks} after graph breaks, {self.recompiles} recompiles), "
                 f"{len(self.sites)} attention sites"]
        if self.calibration:
            lines.append(f"calibration: {self.calibration}")
        if self.compact:
            lines.append(f"compact buffers: {self.compact}")
        if self.shard is not None:
            lines.append(self.shard.line())
        if any(self.selections):
            chosen, reused, whole = self.selections
            lines.append(f"kept ranges: chosen in {chosen} calls, reused in {reused} (a chunk's later calls over the "
                         f"same history), none needed in {whole} (every head kept its whole window)")
        unordered = sum(r.out_of_order for r in self.layers)
        if unordered:
            lines.append(f"out of written order: {unordered} calls ran dense ({OUT_OF_ORDER})")
        for f in self.frames:
            if f.at_limit:
                lines.append(f"WARNING: {f.function} hit torch._dynamo.config.recompile_limit ({f.compiles} compiles): "
                             "its new variants and those of what it calls run eagerly, attention dense "
                             "(see docs/patterns.md)")
        lines.append(f"{'site':>4}  {'graph':>5}  {'node':<34} {'pattern':<36} {'action':<11} detail")
        for s in self.sites:
            detail = s.reason or f"cache {s.cache}, layer by {s.layer_key}"
            lines.append(f"{s.site:>4}  {s.graph:>5}  {s.node:<34} {s.pattern:<36} {s.action:<11} {detail}")
        if self.layers:
            lines.append(
                f"{'layer':>5}  {'sites':<8} {'mode':<7} {'dense':>5} {'static':>6} {'dyn':>4}  "
                f"{'kept/dense tokens':>20} {'ratio':>6}  {'calls':>6} {'dense calls':>11}"
            )
            for r in self.layers:
                sites = ",".join(map(str, r.sites))
                tokens = f"{r.kept_tokens:.1f}/{r.dense_tokens}"
                lines.append(
                    f"{r.layer:>5}  {sites:<8} {r.mode:<7} {r.dense_heads:>5} {r.static_heads:>6} {r.dynamic_heads:>4}  "
                    f"{tokens:>20} {r.kept_ratio:>6.3f}  {r.calls:>6} {r.dense_calls:>11}"
                )
        if self.memory is not None:
            lines.append(self.memory.table())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass(frozen=True)
class MemoryRow:
    """KV bytes of one layer: the dense buffers the pipeline allocated vs the compact store."""

    layer: int
    dense_bytes: int
    compact_bytes: int
    dense_bytes_per_head: float
    compact_bytes_per_head: tuple[float, ...]
    reserve_bytes: int = 0  # of compact_bytes: the model's sink frames held only for a KV-recache
    kept_dense_bytes: int = 0  # the pipeline's dense buffers still held besides the store (not yet released)


@dataclass(frozen=True)
class MemoryReport:
    rows: tuple[MemoryRow, ...]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.rows)

    @property
    def compact_bytes(self) -> int:
        return sum(r.compact_bytes for r in self.rows)

    @property
    def reserve_bytes(self) -> int:
        return sum(r.reserve_bytes for r in self.rows)

    @property
    def kept_dense_bytes(self) -> int:
        return sum(r.kept_dense_bytes for r in self.rows)

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.compact_bytes / self.dense_bytes if self.dense_bytes else 0.0

    def table(self) -> str:
        lines = [f"{'layer':>5} {'dense KV bytes':>15} {'compact KV bytes':>17} {'per head (compact)':>30}"]
        for r in self.rows:
            heads = " ".join(f"{b:,.0f}" for b in r.compact_bytes_per_head)
            lines.append(f"{r.layer:>5} {r.dense_bytes:>15,} {r.compact_bytes:>17,} {heads:>30}")
        lines.append(f"total: {self.dense_bytes:,} dense -> {self.compact_bytes:,} compact bytes "
                     f"({100 * self.saved_fraction:.1f}% less)")
        if self.reserve_bytes:
            lines.append(f"of which {self.reserve_bytes:,} bytes hold the model's sink frames the keep rule drops, for "
                         "a KV-recache after a prompt switch (options kv_recache=False frees them)")
        if self.kept_dense_bytes:
            lines.append(f"besides: {self.kept_dense_bytes:,} bytes of the pipeline's dense buffers, not released yet "
                         "(compact releases them once a second video shows that nothing else writes them)")
        return "\n".join(lines)


def _memory(session: Session) -> MemoryReport:
    rows = []
    guard = session.compact
    for layer, store in sorted(guard.stores().items()):
        per_head = store.nbytes_per_head()
        dense = guard.dense_bytes(layer)
        rows.append(MemoryRow(layer=layer, dense_bytes=dense, compact_bytes=store.nbytes(),
                              dense_bytes_per_head=dense / session.plan.num_heads,
                              compact_bytes_per_head=tuple(per_head[h] for h in sorted(per_head)),
                              reserve_bytes=store.reserve_nbytes(), kept_dense_bytes=guard.kept_dense_bytes(layer)))
    return MemoryReport(rows=tuple(rows))


def session_of(compiled: Any, what: str, options: Mapping[str, Any] | None = None) -> Session:
    """The live session of a model compiled with ``backend="forcing_kv"``: the one of the ``torch.compile`` call
    given exactly these ``options``, else the one the compiled module owns."""
    found = session_for_options(options) if options is not None else session_of_compiled(compiled)
    if found is None and options is None and getattr(compiled, "_orig_mod", None) is not None:
        raise ValueError(
            f"{what}: this compiled module never reached the forcing_kv backend: dynamo ran it without compiling "
            "(its code may have reached torch._dynamo.config.recompile_limit through other compiled models of the "
            "same class, see the RecompileLimitWarning), or it has not run yet; attention there is dense"
        )
    if found is None:
        raise ValueError(
            f"{what} expected the module torch.compile(module, backend='forcing_kv', options=...) returned, after it "
            f"ran (for a compiled function: {what}(compiled, options=<its options mapping>)); got "
            f"{type(compiled).__name__} without a live forcing_kv compile"
        )
    return found


def memory_report(compiled: Any, options: Mapping[str, Any] | None = None) -> MemoryReport:
    """KV bytes per layer and head, dense (the released pipeline buffers) vs compact (the store), as data.

    Meaningful for ``mode="compact"``; other modes hold no store and report no rows.
    """
    return _memory(session_of(compiled, "memory_report", options))


def is_released(t: Any) -> bool:
    """True when ``t``'s storage was released by ``compact`` mode: do not read it (docs/usage.md, "`compact`")."""
    return t.numel() > 0 and t.untyped_storage().nbytes() == 0


def _layer_row(session: Session, stats: LayerStats) -> LayerRow:
    calibrating = session.plan is None
    roles = [DENSE] * len(stats.kept) if calibrating else session.plan.roles[stats.layer]
    kept_per_head = tuple(stats.kept.tolist()) if isinstance(stats.kept, torch.Tensor) else stats.kept
    kept = sum(kept_per_head) / len(kept_per_head) if kept_per_head else 0.0
    return LayerRow(
        layer=stats.layer,
        sites=tuple(sorted(stats.sites)),
        mode="calib" if calibrating else session.config.mode,
        dense_heads=roles.count(DENSE),
        static_heads=roles.count(STATIC),
        dynamic_heads=roles.count(DYNAMIC),
        kept_tokens=kept,
        dense_tokens=stats.window,
        calls=stats.calls,
        dense_calls=stats.dense_calls,
        out_of_order=stats.out_of_order,
    )


def report(compiled: Any, *, print_table: bool = True, file: TextIO | None = None,
           options: Mapping[str, Any] | None = None) -> Report:
    """The report of a model compiled with ``backend="forcing_kv"``, printed as a table to ``file``
    (standard output by default) unless ``print_table=False``; ``options``: the mapping it was compiled
    with, to name one of several compiles of one model (or a compiled function).

    Site rows appear once a graph is compiled; layer rows once the rewritten attention ran.
    """
    session = session_of(compiled, "report", options)
    rows = tuple(_layer_row(session, session.layers[i]) for i in sorted(session.layers))
    memory = _memory(session) if session.compact.stores() else None
    result = Report(mode=session.config.mode, graphs=session.graphs, sites=tuple(session.sites), layers=rows, memory=memory,
                    frames=tuple(session.frames.values()), calibration=_calibration(session),
                    compact=session.compact.summary(), shard=_shard(session),
                    selections=(session.selections.chosen, session.selections.reused, session.selections.whole))
    if print_table:
        print(result.table(), file=file or sys.stdout)
    return result


def _shard(session: Session) -> ShardRow | None:
    shard = session.shard
    if shard is None:
        return None
    plan = shard.plan
    frames = max((stats.window for stats in session.layers.values()), default=0) // plan.frame_tokens
    costs = rank_costs(plan, shard.all_heads, frames)
    return ShardRow(rank=shard.rank, world_size=shard.world_size, heads=(shard.heads.start, shard.heads.stop),
                    plan_heads=plan.num_heads, window_frames=frames, kept_per_rank=costs.per_rank(),
                    imbalance=costs.imbalance, reduce_calls=shard.stats.calls, reduce_bytes=shard.stats.bytes)


def _calibration(session: Session) -> str:
    calibrator = session.calibrator
    if calibrator is None:
        return ""
    g = calibrator.geometry
    geometry = f"{g.frame_tokens} tokens per frame, {g.chunk_frames} frames per chunk from {g.source}" if g else "unknown yet"
    if calibrator.active and calibrator.template is not None:
        return f"plan {session.config.plan_name!r} waits for the model's geometry (its native one does not fit)"
    if calibrator.active:
        until = "a new video starts" if calibrator.calibration.chunks is None else f"{calibrator.calibration.chunks} chunks ran"
        return (f"running dense and recording attention mass until {until} ({calibrator.chunks} chunks, "
                f"{len(calibrator.records)} calls recorded so far); geometry: {geometry}")
    plan = session.plan
    if calibrator.template is not None:
        return f"plan {session.config.plan_name!r} in use since {calibrator.switched}; geometry: {geometry}"
    return (f"plan made {calibrator.switched} from {len(calibrator.records)} calls: {plan.count(STATIC)} static, "
            f"{plan.count(DYNAMIC)} dynamic of {plan.num_layers * plan.num_heads} heads; geometry: {geometry}; "
            "fkv_compile.plan_of(model) returns it")


def plan_of(compiled: Any, options: Mapping[str, Any] | None = None) -> HeadPlan | None:
    """The plan a model compiled with ``backend="forcing_kv"`` uses now: the one given, the bundled one at the
    model's geometry (under head parallelism: the global plan, all ranks' heads), or the one it calibrated; ``None``
    while it calibrates (save it with ``HeadPlan.save`` and
    pass it back as ``options={"plan": path}`` to skip calibration next time)."""
    session = session_of(compiled, "plan_of", options)
    return session.shard.plan if session.shard is not None else session.plan
