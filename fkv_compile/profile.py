"""Head profiling: frame-level attention mass of the current chunk's queries, and plans made from it.

Forcing-KV (arXiv 2605.09681) classifies a head by where its attention mass goes: with ``C``
frames per chunk and ``S_p`` frames excluded as sink,

    score = mass(last C + 1 key frames) / (total mass - mass(first S_p key frames))

and the head is ``static`` when ``score >= alpha`` (0.8), else ``dynamic``. The ``profile`` mode of
the backend computes attention exactly as dense and records, per layer and call, the softmax mass
per key frame (streamed over query blocks: the attention matrix is never materialized whole).
Calls are labelled with :func:`tag` (sample, step, chunk), so role stability can be measured.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``n`` key frames.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import HeadPlan, PlanError
from .runtime import Session, session_for_options

__all__ = [
    "ProfileSettings",
    "MassRecord",
    "Profile",
    "StabilityReport",
    "frame_mass",
    "tag",
    "collect",
]

_LABELS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("fkv_profile_labels", default={})
MAX_BLOCK_ELEMENTS = 1 << 24  # scores of one query block: 64 MiB in float32


@contextlib.contextmanager
def tag(**labels: Any) -> Iterator[None]:
    """Label the attention calls recorded inside (e.g. ``tag(sample=0, chunk=3, step=1)``); nests."""
    token = _LABELS.set({**_LABELS.get(), **labels})
    try:
        yield
    finally:
        _LABELS.reset(token)


def current_labels() -> dict[str, Any]:
    return dict(_LABELS.get())


def frame_mass(
    q: torch.Tensor, k: torch.Tensor, frame_tokens: int, scale: float | None = None,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Softmax attention mass per key frame, summed over queries: ``[B, H, n]`` (float32 or float64).

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lk, D]`` with ``Lk = n * frame_tokens``. Query blocks are
    sized so that one block's scores hold at most ``max_block_elements`` numbers.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if lk % frame_tokens:
        raise ValueError(f"keys expected a whole number of frames of {frame_tokens} tokens, got Lk={lk}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kt = k.to(dtype).transpose(-1, -2)
    block = max(1, max_block_elements // (b * h * lk))
    total = torch.zeros(b, h, lk, dtype=dtype, device=q.device)
    for start in range(0, lq, block):
        scores = (q[:, :, start : start + block].to(dtype) @ kt) * scale
        total += scores.softmax(dim=-1).sum(dim=2)
    return total.view(b, h, lk // frame_tokens, frame_tokens).sum(-1)


@dataclass(frozen=True)
class MassRecord:
    """One attention call: mass per head and key frame, averaged over the batch's queries."""

    layer: int
    labels: Mapping[str, Any]
    mass: torch.Tensor  # [H, n] float64, every row sums to 1

    @property
    def frames(self) -> int:
        return self.mass.shape[1]


@dataclass(frozen=True)
class ProfileSettings:
    """How scores become roles; recorded in the plan's provenance."""

    alpha: float = 0.8
    sink_frames: int = 3  # key frames left out of the denominator (the reference released plans used 3)
    layer_static_budget: int | None = None  # at most this many static heads per layer (highest scores)
    static_budget: int | None = None  # at most this many static heads overall
    forced: Mapping[int, str] = field(default_factory=dict)  # layer -> role for every head of it

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise PlanError(f"alpha expected a float in [0, 1], got {self.alpha!r}")
        if self.sink_frames < 0:
            raise PlanError(f"sink_frames expected an int >= 0, got {self.sink_frames!r}")
        for name in ("layer_static_budget", "static_budget"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise PlanError(f"{name} expected an int >= 0 or None, got {value!r}")
        for layer, role in self.forced.items():
            if role not in ("dense", "static", "dynamic"):
                raise PlanError(f"forced[{layer}] expected 'dense', 'static' or 'dynamic', got {role!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "sink_frames": self.sink_frames,
            "layer_static_budget": self.layer_static_budget,
            "static_budget": self.static_budget,
            "forced": {str(k): v for k, v in self.forced.items()},
        }


@dataclass(frozen=True)
class StabilityReport:
    """Agreement of roles made from subsets of the profile with the roles made from all of it.

    ``by[dimension][value]`` is ``(agreement, jaccard_per_layer)``: the fraction of heads with the
    same role, and per layer the Jaccard index of the static-head sets (1 when both are empty).
    """

    by: Mapping[str, Mapping[Any, tuple[float, tuple[float, ...]]]]

    def summary(self) -> dict[str, dict[str, float]]:
        """Per dimension: mean and minimum agreement and mean Jaccard over its values."""
        out = {}
        for dim, values in self.by.items():
            agreements = [a for a, _ in values.values()]
            jaccards = [j for _, per_layer in values.values() for j in per_layer]
            out[dim] = {
                "values": len(values),
                "mean_agreement": sum(agreements) / len(agreements),
                "min_agreement": min(agreements),
                "mean_jaccard": sum(jaccards) / len(jaccards),
            }
        return out

    def table(self) -> str:
        lines = [f"{'varied':<8} {'values':>6} {'mean agreement':>15} {'min agreement':>14} {'mean Jaccard':>13}"]
        for dim, s in self.summary().items():
            lines.append(
                f"{dim:<8} {s['values']:>6} {s['mean_agreement']:>15.3f} {s['min_agreement']:>14.3f} {s['mean_jaccard']:>13.3f}"
            )
        return "\n".join(lines)


class Profile:
    """The mass records of a profiled run, with the geometry they were taken at."""

    def __init__(self, records: Sequence[MassRecord], *, frame_tokens: int, chunk_frames: int, num_layers: int, num_heads: int):
        self.records = list(records)
        self.frame_tokens, self.chunk_frames = frame_tokens, chunk_frames
        self.num_layers, self.num_heads = num_layers, num_heads

    def _informative(self, records: Sequence[MassRecord], settings: ProfileSettings) -> list[MassRecord]:
        """Windows with at least one frame outside both the numerator and the sink."""
        return [r for r in records if r.frames > settings.sink_frames + self.chunk_frames + 1]

    def scores(self, settings: ProfileSettings = ProfileSettings(), records: Sequence[MassRecord] | None = None) -> torch.Tensor:
        """``[layers, heads]`` scores from ``records`` (all by default); NaN where a layer has no data."""
        usable = self._informative(self.records if records is None else records, settings)
        near = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        far = torch.zeros_like(near)
        for r in usable:
            near[r.layer] += r.mass[:, -(self.chunk_frames + 1) :].sum(-1)
            far[r.layer] += r.mass[:, settings.sink_frames :].sum(-1)
        return near / far

    def roles(self, settings: ProfileSettings = ProfileSettings(), records: Sequence[MassRecord] | None = None) -> list[list[str]]:
        scores = self.scores(settings, records)
        if torch.isnan(scores).any():
            missing = sorted({int(i) for i in torch.nonzero(torch.isnan(scores))[:, 0]})
            need = settings.sink_frames + self.chunk_frames + 2
            raise PlanError(
                f"no profiled call of layers {missing} had a window of at least {need} frames "
                f"(sink {settings.sink_frames} + chunk {self.chunk_frames} + transition + 1); run more chunks"
            )
        static = scores >= settings.alpha
        if settings.layer_static_budget is not None:
            static &= _top_mask(scores.masked_fill(~static, -math.inf), settings.layer_static_budget, per_row=True)
        if settings.static_budget is not None:
            static &= _top_mask(scores.masked_fill(~static, -math.inf), settings.static_budget, per_row=False)
        roles = [["static" if s else "dynamic" for s in row] for row in static.tolist()]
        for layer, role in settings.forced.items():
            if not 0 <= layer < self.num_layers:
                raise PlanError(f"forced layer {layer} expected in [0, {self.num_layers})")
            roles[layer] = [role] * self.num_heads
        return roles

    def mass_by_age(self) -> torch.Tensor:
        """``[layers, heads, n]`` mean mass per key frame over the calls with the longest window."""
        longest = max(r.frames for r in self.records)
        out = torch.zeros(self.num_layers, self.num_heads, longest, dtype=torch.float64)
        counts = torch.zeros(self.num_layers, dtype=torch.float64)
        for r in self.records:
            if r.frames == longest:
                out[r.layer] += r.mass
                counts[r.layer] += 1
        return out / counts.clamp_min(1)[:, None, None]

    def plan(self, settings: ProfileSettings = ProfileSettings(), **role_params: Any) -> HeadPlan:
        """A :class:`HeadPlan` with the roles, the scores and the profiling settings as provenance."""
        scores = self.scores(settings)
        provenance = {
            "source": "fkv_compile.profile",
            "settings": settings.as_dict(),
            "calls": len(self.records),
            "scores": [[round(float(s), 6) for s in row] for row in scores],
            "mass_by_age": [[[round(float(m), 6) for m in head] for head in layer] for layer in self.mass_by_age()],
        }
        return HeadPlan.from_roles(
            self.roles(settings), frame_tokens=self.frame_tokens, chunk_frames=self.chunk_frames,
            provenance=provenance, **role_params,
        )

    def stability(
        self, settings: ProfileSettings = ProfileSettings(), alphas: Sequence[float] = (0.5, 0.75, 0.8, 0.9)
    ) -> StabilityReport:
        """Roles from each labelled subset (sample, step, chunk) and each alpha against the roles of all."""
        reference = self.roles(settings)
        by: dict[str, dict[Any, tuple[float, tuple[float, ...]]]] = {}
        dims = sorted({key for r in self.records for key in r.labels})
        for dim in dims:
            groups: dict[Any, list[MassRecord]] = {}
            for r in self.records:
                if dim in r.labels:
                    groups.setdefault(r.labels[dim], []).append(r)
            by[dim] = {}
            for value, records in sorted(groups.items(), key=lambda kv: str(kv[0])):
                if len({r.layer for r in self._informative(records, settings)}) == self.num_layers:
                    by[dim][value] = _compare(reference, self.roles(settings, records))
            if not by[dim]:
                del by[dim]
        by["alpha"] = {
            a: _compare(reference, self.roles(dataclasses.replace(settings, alpha=a))) for a in alphas
        }
        return StabilityReport(by=by)


def _top_mask(scores: torch.Tensor, budget: int, *, per_row: bool) -> torch.Tensor:
    """True for the ``budget`` highest finite scores (per row or overall)."""
    flat = scores if per_row else scores.flatten().unsqueeze(0)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    count = min(budget, flat.shape[-1])
    if count:
        top = flat.topk(count, dim=-1).indices
        mask.scatter_(-1, top, True)
    mask &= torch.isfinite(flat)
    return mask if per_row else mask.view_as(scores)


def _compare(a: list[list[str]], b: list[list[str]]) -> tuple[float, tuple[float, ...]]:
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(len(r) for r in a)
    jaccard = []
    for ra, rb in zip(a, b):
        sa = {h for h, r in enumerate(ra) if r == "static"}
        sb = {h for h, r in enumerate(rb) if r == "static"}
        jaccard.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
    return same / total, tuple(jaccard)


def record_call(session: Session, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
    """Record one profiled call's frame mass (calls that do not fit the geometry are skipped)."""
    plan = session.plan
    if q.shape[2] != plan.chunk_tokens or k.shape[2] % plan.frame_tokens:
        return
    mass = frame_mass(q, k, plan.frame_tokens, scale).sum(0).double() / (q.shape[0] * q.shape[2])
    session.profile_records.append(MassRecord(layer=layer, labels=current_labels(), mass=mass.cpu()))


def collect(compiled: Any) -> Profile:
    """The :class:`Profile` recorded by a model compiled with ``options={"mode": "profile", ...}``."""
    from .report import find_options

    options = find_options(compiled)
    session = session_for_options(options) if options is not None else None
    if session is None or session.mode != "profile":
        raise ValueError("collect expected a model compiled with backend='forcing_kv' and mode='profile'")
    if not session.profile_records:
        raise ValueError("the profiled model recorded no attention call that fits the plan's geometry; run it first")
    plan = session.plan
    return Profile(session.profile_records, frame_tokens=plan.frame_tokens, chunk_frames=plan.chunk_frames,
                   num_layers=plan.num_layers, num_heads=plan.num_heads)
