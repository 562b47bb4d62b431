"""Roles from attention mass: classify heads by where the chunk's attention mass goes, and measure stability.

Forcing-KV (arXiv 2605.09681) classifies a head by where its attention mass goes: with ``C``
frames per chunk and ``S_p`` frames excluded as sink,

    score = mass(last C + 1 key frames) / (total mass - mass(first S_p key frames))

and the head is ``static`` when ``score >= alpha`` (0.8), else ``dynamic``. The records come from
attention calls run densely with their frame mass recorded (``mode="profile"``, or the first video
of a model compiled without a plan, which calibrates itself); :class:`Profile` turns them into a
:class:`~fkv_compile.plan.HeadPlan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import DYNAMIC, ROLES, STATIC, HeadPlan, PlanError

__all__ = ["MassRecord", "ProfileSettings", "Profile", "StabilityReport"]


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
            if role not in ROLES:
                raise PlanError(f"forced[{layer}] expected one of {ROLES}, got {role!r}")

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
        roles = [[STATIC if s else DYNAMIC for s in row] for row in static.tolist()]
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
        sa = {h for h, r in enumerate(ra) if r == STATIC}
        sb = {h for h, r in enumerate(rb) if r == STATIC}
        jaccard.append(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
    return same / total, tuple(jaccard)
