"""``fkv_compile.report(compiled_model)``: what the pass found, what it rewrote, and what each layer keeps."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from .runtime import LayerStats, Session, SiteRecord, session_for_options

__all__ = ["Report", "LayerRow", "report", "find_options"]


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
    dense_calls: int  # calls left dense because their shapes did not fit the plan's geometry

    @property
    def kept_ratio(self) -> float:
        return self.kept_tokens / self.dense_tokens if self.dense_tokens else 1.0


@dataclass(frozen=True)
class Report:
    mode: str
    graphs: int
    sites: tuple[SiteRecord, ...]
    layers: tuple[LayerRow, ...]

    def table(self) -> str:
        lines = [f"fkv_compile report: mode={self.mode}, {self.graphs} graphs compiled, {len(self.sites)} attention calls"]
        lines.append(f"{'site':>4}  {'graph':>5}  {'node':<34} {'pattern':<22} {'action':<11} detail")
        for s in self.sites:
            detail = s.reason or f"cache {s.cache}, layer by {s.layer_key}"
            lines.append(f"{s.site:>4}  {s.graph:>5}  {s.node:<34} {s.pattern:<22} {s.action:<11} {detail}")
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _layer_row(session: Session, stats: LayerStats) -> LayerRow:
    roles = session.plan.roles[stats.layer]
    kept = sum(stats.kept) / len(stats.kept) if stats.kept else 0.0
    return LayerRow(
        layer=stats.layer,
        sites=tuple(sorted(stats.sites)),
        mode=session.mode,
        dense_heads=roles.count("dense"),
        static_heads=roles.count("static"),
        dynamic_heads=roles.count("dynamic"),
        kept_tokens=kept,
        dense_tokens=stats.window,
        calls=stats.calls,
        dense_calls=stats.dense_calls,
    )


def find_options(compiled: Any) -> Any:
    """The ``options`` mapping torch.compile handed to the backend, found on the compiled callable."""
    ctx = getattr(compiled, "dynamo_ctx", None) or getattr(compiled, "_torchdynamo_orig_callable", None)
    obj = getattr(ctx, "callback", None)
    seen = 0
    while obj is not None and seen < 16:
        kwargs = getattr(obj, "kwargs", None)
        if isinstance(kwargs, dict) and "options" in kwargs:
            return kwargs["options"]
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
        seen += 1
    return None


def report(compiled: Any, *, print_table: bool = True, file: TextIO | None = None) -> Report:
    """The report of a model compiled with ``backend="forcing_kv"``, printed as a table to ``file``
    (standard output by default) unless ``print_table=False``.

    Site rows appear once a graph is compiled; layer rows once the rewritten attention ran.
    """
    options = find_options(compiled)
    session = session_for_options(options) if options is not None else None
    if session is None:
        raise ValueError(
            "report expected a model compiled with torch.compile(..., backend='forcing_kv', options={...}) "
            "that has run at least once; got one without a forcing_kv session"
        )
    rows = tuple(_layer_row(session, session.layers[i]) for i in sorted(session.layers))
    result = Report(mode=session.mode, graphs=session.graphs, sites=tuple(session.sites), layers=rows)
    if print_table:
        print(result.table(), file=file or sys.stdout)
    return result
