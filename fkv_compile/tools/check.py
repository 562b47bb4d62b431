"""Equivalence checking of a user's model for their CI: one rollout per mode, every chunk compared.

- ``off`` must be bit-identical to the same model compiled by the plain lowering (``inductor``,
  ``aot_eager`` or ``eager``): the pass changed nothing it should not have.
- ``select`` and ``compact`` must match ``oracle`` (dense attention masked by the keep rule) within
  a budget derived from the data: ``factor`` times the difference between the eager model and the
  plainly compiled one (the numeric noise of two correct implementations in the model's dtype), at
  least a few ulps of the outputs' scale. Rollouts are autoregressive, so both differences grow
  alike over chunks.
- ``oracle`` itself is compared with the eager dense model for information only: that difference is
  what the plan's compression changes, not an error.
- the budget's base must itself be small: a plainly compiled run further than
  ``REPRODUCIBLE`` (relative to the outputs' scale) from the eager run means the rollout is not
  reproducible (unseeded weights or inputs), and the check fails rather than derive a huge budget.

Each mode runs on a fresh model from ``model_factory`` after ``torch._dynamo.reset()``, under
``torch.no_grad()`` (the ops are inference-only); a mode that raises (a plan that does not fit the
model, say) fails with the exception's message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import MODES
from ..plan import HeadPlan

__all__ = ["ModeCheck", "EquivalenceReport", "check_equivalence", "DEFAULT_MODES", "CHECKED_MODES"]

CHECKED_MODES: tuple[str, ...] = tuple(m for m in MODES if m != "profile")  # profile makes plans: nothing to compare
DEFAULT_MODES: tuple[str, ...] = ("off", "oracle", "select", "compact")
NOISE_FACTOR = 4.0  # the budget in multiples of the eager vs plainly compiled difference
ULPS = 16
REPRODUCIBLE = 0.05

ModelFactory = Callable[[], torch.nn.Module]
Rollout = Callable[[torch.nn.Module], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class ModeCheck:
    """One mode's rollout against its reference."""

    mode: str
    reference: str  # what it was compared with
    max_abs_error: float
    max_rel_error: float  # max abs error / largest reference magnitude
    worst_chunk: int
    budget: float  # 0: bit-identical required; inf: informational
    graphs: int
    graph_breaks: int
    cache_sites: int  # attention sites over a KV cache the pass found
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.max_abs_error <= self.budget


@dataclass(frozen=True)
class EquivalenceReport:
    checks: tuple[ModeCheck, ...]
    chunks: int
    noise: float  # eager vs plainly compiled: the budget's base

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.mode}: {c.error}" if c.error else
                f"{c.mode}: max abs error {c.max_abs_error:.3e} vs {c.reference} (chunk {c.worst_chunk}) exceeds the "
                f"budget {c.budget:.3e}" for c in self.checks if not c.passed]

    def table(self) -> str:
        lines = [f"fkv check: {self.chunks} chunks compared; budget base (eager vs compiled) {self.noise:.3e}",
                 f"{'mode':<8} {'vs':<14} {'max abs err':>11} {'rel err':>9} {'chunk':>5} {'budget':>10} "
                 f"{'graphs':>6} {'breaks':>6} {'sites':>5}  result"]
        for c in self.checks:
            budget = "info" if math.isinf(c.budget) else "bit-exact" if c.budget == 0 else f"{c.budget:.3e}"
            result = "ok" if c.passed else f"FAIL {c.error}" if c.error else "FAIL"
            lines.append(f"{c.mode:<8} {c.reference:<14} {c.max_abs_error:>11.3e} {c.max_rel_error:>9.2e} "
                         f"{c.worst_chunk:>5} {budget:>10} {c.graphs:>6} {c.graph_breaks:>6} {c.cache_sites:>5}  "
                         f"{result}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "chunks": self.chunks, "noise": self.noise,
                "checks": [{**asdict(c), "budget": None if math.isinf(c.budget) else c.budget, "passed": c.passed}
                           for c in self.checks]}


def _errors(actual: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, float, int]:
    if len(actual) != len(reference):
        raise ValueError(f"the rollout returned {len(actual)} chunks, the reference {len(reference)}")
    per_chunk = [float((a.double() - r.double()).abs().max()) for a, r in zip(actual, reference)]
    scale = max(float(r.double().abs().max()) for r in reference)
    worst = max(range(len(per_chunk)), key=per_chunk.__getitem__)
    return per_chunk[worst], per_chunk[worst] / scale if scale else math.inf, worst


def _run(model_factory: ModelFactory, rollout: Rollout, backend: str, options: dict | None) -> tuple[list, Any, int]:
    """The rollout's outputs (detached copies), the compiled model and the graph breaks it caused."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = model_factory()
    compiled = model if backend == "none" else torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        outs = [o.detach().clone() for o in rollout(compiled)]
    if not outs:
        raise ValueError("the rollout returned no outputs to compare")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return outs, compiled, breaks


def check_equivalence(
    model_factory: ModelFactory,
    rollout: Rollout,
    plan: HeadPlan,
    modes: Sequence[str] = DEFAULT_MODES,
    lowering: str = "inductor",
    factor: float = NOISE_FACTOR,
) -> EquivalenceReport:
    """Run ``rollout(model)`` (a list of per-chunk outputs) eagerly, plainly compiled and under each of
    ``modes``; compare every chunk (see the module docstring for what against what)."""
    from ..report import report

    unknown = [m for m in modes if m not in CHECKED_MODES]
    if unknown:
        raise ValueError(f"modes expected some of {CHECKED_MODES}, got {unknown}")
    plain = {"inductor": "inductor", "aot_eager": "aot_eager", "eager": "eager"}[lowering]
    eager = _run(model_factory, rollout, "none", None)[0]
    compiled_plain = _run(model_factory, rollout, plain, None)[0]
    noise = _errors(compiled_plain, eager)[0]
    dtype = eager[0].dtype if eager[0].is_floating_point() else torch.float32
    scale = max(float(o.double().abs().max()) for o in eager)
    budget = max(factor * noise, ULPS * torch.finfo(dtype).eps * scale)
    results: dict[str, list[torch.Tensor]] = {}
    err, rel, worst = _errors(compiled_plain, eager)
    checks = [ModeCheck(plain, "eager (dense)", err, rel, worst, REPRODUCIBLE * scale, 0, 0, 0,
                        error="" if err <= REPRODUCIBLE * scale else
                        f"the plainly compiled rollout differs from the eager one by {rel:.1%} of the outputs' scale: "
                        "the rollout is not reproducible (seed the model's weights and the inputs), no budget can be "
                        "derived")]
    for mode in modes:
        try:
            outs, compiled, breaks = _run(model_factory, rollout, "forcing_kv",
                                          {"plan": plan, "mode": mode, "lowering": lowering})
            results[mode] = outs
            rep = report(compiled, print_table=False)
            if mode == "off":
                ref_name, ref, mode_budget = plain, compiled_plain, 0.0
            elif mode == "oracle":
                ref_name, ref, mode_budget = "eager (dense)", eager, math.inf
            else:
                if "oracle" not in results:
                    results["oracle"] = _run(model_factory, rollout, "forcing_kv",
                                             {"plan": plan, "mode": "oracle", "lowering": lowering})[0]
                ref_name, ref, mode_budget = "oracle", results["oracle"], budget
            err, rel, worst = _errors(outs, ref)
            if mode == "off" and any(not torch.equal(a, b) for a, b in zip(outs, ref)):
                err = max(err, math.ulp(0.0))  # bit-identical means equal bits, not a zero rounded difference
            limited = [f.function for f in rep.frames if f.at_limit]
            checks.append(ModeCheck(mode, ref_name, err, rel, worst, mode_budget, rep.graphs, breaks,
                                    sum(s.action.is_site for s in rep.sites),
                                    error=f"{', '.join(limited)} hit torch._dynamo.config.recompile_limit: later "
                                    "chunks ran eagerly, uncompressed (the oracle too, so outputs can still agree)"
                                    if limited else ""))
        except Exception as exc:  # a failing mode is a result to report, not the end of the check
            checks.append(ModeCheck(mode, "-", math.nan, math.nan, -1, budget, 0, 0, 0,
                                    error=f"{type(exc).__name__}: {exc}"))
    return EquivalenceReport(tuple(checks), len(eager), noise)
