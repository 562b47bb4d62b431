"""Equivalence checking of a user's model for their CI: one rollout per mode, every chunk compared.

- ``off`` must be bit-identical to the same model compiled by the plain lowering (``inductor``,
  ``aot_eager`` or ``eager``): the pass changed nothing it should not have.
- ``select`` and ``compact`` must match ``oracle`` (dense attention masked by the keep rule) within
  a budget derived from the data: ``factor`` times the difference between the eager model and the
  plainly compiled one (the numeric noise of two correct implementations in the model's dtype), at
  least a few ulps of the outputs' scale. Rollouts are autoregressive, so both differences grow
  alike over chunks.
- a budget must be able to see a wrong result: beside it the check measures the *effects* it must
  detect (what compression changes, oracle vs dense; and the oracles of the kept sets one recent
  frame off and one selected segment fewer, :func:`wrong_kept_sets`). A comparison is conclusive
  when every effect is at least ``CONCLUSIVE`` budgets. One that is not (bf16 and fp16 models
  usually: their rounding is as large as what compression changes) is made conclusive by a higher
  precision twin of the model (``reference``: the same weights and inputs in float32), in which
  ``select`` and ``compact`` are compared while the user's dtype still runs every mode (crashes,
  recompiles); without a twin the check fails as inconclusive, saying so.
- ``oracle`` itself is compared with the eager dense model for information only: that difference is
  what the plan's compression changes, not an error.
- the budget's base must itself be small: a plainly compiled run further than
  ``REPRODUCIBLE`` (relative to the outputs' scale) from the eager run means the rollout is not
  reproducible (unseeded weights or inputs), and the check fails rather than derive a huge budget.

A rollout should generate two videos or more (the bundled miniatures' do): state carried from one
video into the next (a compact store that did not reset) only shows in the second.

Each mode runs on a fresh model from ``model_factory`` after ``torch._dynamo.reset()``, under
``torch.no_grad()`` (the ops are inference-only); a mode that raises (a plan that does not fit the
model, say) fails with the exception's message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import MODES
from ..plan import DYNAMIC, HeadPlan, PlanError, RoleParams

__all__ = ["ModeCheck", "EquivalenceReport", "Target", "check_equivalence", "wrong_kept_sets", "DEFAULT_MODES",
           "CHECKED_MODES", "CONCLUSIVE"]

CHECKED_MODES: tuple[str, ...] = tuple(m for m in MODES if m != "profile")  # profile makes plans: nothing to compare
DEFAULT_MODES: tuple[str, ...] = ("off", "oracle", "select", "compact")
NOISE_FACTOR = 4.0  # the budget in multiples of the eager vs plainly compiled difference
ULPS = 16
REPRODUCIBLE = 0.05
CONCLUSIVE = 4.0  # every effect the check must see is at least this many budgets
COMPRESSED_MODES = ("select", "compact")

ModelFactory = Callable[[], torch.nn.Module]
Rollout = Callable[[torch.nn.Module], Sequence[torch.Tensor]]
Step = Callable[[str], None]  # told what runs next (progress)


def _quiet(what: str) -> None:
    """The default ``progress``: nothing."""


@dataclass(frozen=True)
class Target:
    """What is checked: a fresh model per call of ``model_factory``, and the rollout giving its per-chunk outputs."""

    model_factory: ModelFactory
    rollout: Rollout


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
    effect: float = math.inf  # the smallest effect the comparison must see (compressed modes)

    @property
    def passed(self) -> bool:
        return not self.error and self.max_abs_error <= self.budget


@dataclass(frozen=True)
class EquivalenceReport:
    checks: tuple[ModeCheck, ...]
    chunks: int
    noise: float  # eager vs plainly compiled: the budget's base
    effects: Mapping[str, float] = dataclasses.field(default_factory=dict)  # in the precision compared
    compared_in: str = ""  # the dtype select and compact were compared in

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        """One line per distinct reason, naming every mode that failed for it."""
        reasons: dict[str, list[str]] = {}
        for c in self.checks:
            if not c.passed:
                reason = c.error or (f"max abs error {c.max_abs_error:.3e} vs {c.reference} (chunk {c.worst_chunk}) "
                                     f"exceeds the budget {c.budget:.3e}")
                reasons.setdefault(reason, []).append(c.mode)
        return [f"{', '.join(modes)}: {reason}" for reason, modes in reasons.items()]

    def table(self) -> str:
        effects = ", ".join(f"{name} {value:.3e}" for name, value in self.effects.items())
        lines = [f"fkv check: {self.chunks} chunks compared; budget base (eager vs compiled) {self.noise:.3e}; "
                 f"select/compact compared in {self.compared_in}, effects to see: {effects}",
                 f"{'mode':<8} {'vs':<22} {'max abs err':>11} {'rel err':>9} {'chunk':>5} {'budget':>10} "
                 f"{'effect/budget':>13} {'graphs':>6} {'breaks':>6} {'sites':>5}  result"]
        for c in self.checks:
            budget = "info" if math.isinf(c.budget) else "bit-exact" if c.budget == 0 else f"{c.budget:.3e}"
            ratio = f"{c.effect / c.budget:.1f}" if math.isfinite(c.effect) and c.budget else "-"
            result = "ok" if c.passed else "FAIL (below)" if c.error else "FAIL"
            lines.append(f"{c.mode:<8} {c.reference:<22} {c.max_abs_error:>11.3e} {c.max_rel_error:>9.2e} "
                         f"{c.worst_chunk:>5} {budget:>10} {ratio:>13} {c.graphs:>6} {c.graph_breaks:>6} "
                         f"{c.cache_sites:>5}  {result}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def finite(x: float) -> float | None:
            return None if math.isinf(x) else x

        return {"passed": self.passed, "chunks": self.chunks, "noise": self.noise, "effects": dict(self.effects),
                "compared_in": self.compared_in,
                "checks": [{**asdict(c), "budget": finite(c.budget), "effect": finite(c.effect), "passed": c.passed}
                           for c in self.checks]}


def wrong_kept_sets(plan: HeadPlan) -> dict[str, HeadPlan]:
    """Plans whose kept sets differ from ``plan``'s by the least a check must see: every compressed role one recent
    frame off (one fewer, or one more where there are none), and dynamic heads one selected segment fewer."""

    def frame_off(p: RoleParams) -> RoleParams:
        return dataclasses.replace(p, recent_frames=p.recent_frames - 1 if p.recent_frames else 1)

    wrong = {"one recent frame off": dataclasses.replace(plan, static=frame_off(plan.static),
                                                         dynamic=frame_off(plan.dynamic))}
    p = plan.dynamic
    if plan.count(DYNAMIC) and p.selected_segments and p.candidate_frames:
        fewer = (p.selected_segments - 1) / (p.candidate_frames * p.segments_per_frame)  # k - 1 after rounding
        wrong["one segment fewer"] = dataclasses.replace(plan, dynamic=dataclasses.replace(p, retention=fewer))
    return wrong


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


@dataclass(frozen=True)
class _Baseline:
    """One precision's references: the dense runs, the budget, the oracle, and the effects the budget must see."""

    dtype: torch.dtype
    eager: list[torch.Tensor]
    plain: list[torch.Tensor]
    noise: float
    scale: float
    budget: float
    oracle_run: tuple[list[torch.Tensor], Any, int] | None  # the oracle mode's run (``_run``); None: it failed
    effects: dict[str, float]
    error: str = ""

    @property
    def oracle(self) -> list[torch.Tensor] | None:
        return None if self.oracle_run is None else self.oracle_run[0]

    @property
    def effect(self) -> float:
        return min(self.effects.values(), default=math.nan)

    @property
    def conclusive(self) -> bool:
        return self.effect >= CONCLUSIVE * self.budget


def _baseline(target: Target, plan: HeadPlan, lowering: str, factor: float, step: Step) -> _Baseline:
    """The oracle first: a plan that does not fit the model raises its ``PlanError`` before any other run."""

    def oracle(p: HeadPlan, lowering: str) -> tuple[list[torch.Tensor], Any, int]:
        return _run(target.model_factory, target.rollout, "forcing_kv", {"plan": p, "mode": "oracle",
                                                                           "lowering": lowering})

    step("oracle (dense attention masked by the plan's keep rule)")
    try:
        reference: tuple[list[torch.Tensor], Any, int] | None = oracle(plan, lowering)
        failed = ""
    except Exception as exc:  # the modes' own runs report it, or this message does
        cause = _cause(exc)
        if isinstance(cause, PlanError):
            raise cause from None
        reference, failed = None, f"the oracle failed: {_reason(exc)}"
    step("eager rollout (dense, the reference)")
    eager = _run(target.model_factory, target.rollout, "none", None)[0]
    step(f"{lowering} rollout (dense, the budget's base)")
    plain = _run(target.model_factory, target.rollout, lowering, None)[0]
    noise = _errors(plain, eager)[0]
    dtype = eager[0].dtype if eager[0].is_floating_point() else torch.float32
    scale = max(float(o.double().abs().max()) for o in eager)
    budget = max(factor * noise, ULPS * torch.finfo(dtype).eps * scale)
    if reference is None:
        return _Baseline(dtype, eager, plain, noise, scale, budget, None, {}, failed)
    effects = {"compression": _errors(reference[0], eager)[0]}
    if effects["compression"] >= CONCLUSIVE * budget:  # else inconclusive already: spare the runs
        # the wrong kept sets' effects are sizes, not comparisons: eager lowering (the quickest compile) will do
        for name, wrong in wrong_kept_sets(plan).items():
            step(f"oracle with a kept set {name} (an effect the budget must see)")
            effects[name] = _errors(oracle(wrong, "eager")[0], reference[0])[0]
    return _Baseline(dtype, eager, plain, noise, scale, budget, reference, effects)


def _reproducible(base: _Baseline, lowering: str) -> ModeCheck:
    err, rel, worst = _errors(base.plain, base.eager)
    limit = REPRODUCIBLE * base.scale
    return ModeCheck(lowering, f"eager (dense, {_name(base.dtype)})", err, rel, worst, limit, 0, 0, 0,
                     error="" if err <= limit else
                     f"the plainly compiled rollout differs from the eager one by {rel:.1%} of the outputs' scale: the "
                     "rollout is not reproducible (seed the model's weights and the inputs), no budget can be derived")


def _cause(exc: BaseException) -> BaseException:
    """What a compile failure wraps (``BackendCompilerFailed`` holds the backend's own exception)."""
    inner = getattr(exc, "inner_exception", None)
    return _cause(inner) if isinstance(inner, BaseException) else exc


def _reason(exc: BaseException) -> str:
    """An exception in one line of what went wrong, without the compiler's wrapper and its advice."""
    cause = _cause(exc)
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inconclusive(base: _Baseline) -> str:
    effects = ", ".join(f"{name} {value:.3e}" for name, value in base.effects.items())
    return (f"inconclusive in {_name(base.dtype)}: the budget {base.budget:.3e} is not {CONCLUSIVE:g}x below every "
            f"effect it must see ({effects}), so a dense or wrong result could pass; give a float32 twin of the model "
            "(check_equivalence(..., reference=Target(...)), fkv check's third target element) to compare in")


def check_equivalence(
    model_factory: ModelFactory,
    rollout: Rollout,
    plan: HeadPlan,
    modes: Sequence[str] = DEFAULT_MODES,
    lowering: str = "inductor",
    factor: float = NOISE_FACTOR,
    reference: Target | None = None,
    progress: Step = _quiet,
) -> EquivalenceReport:
    """Run ``rollout(model)`` (a list of per-chunk outputs) eagerly, plainly compiled and under each of
    ``modes``; compare every chunk (see the module docstring for what against what). ``reference``: the same
    model and rollout in a higher precision, where ``select`` and ``compact`` are compared when the model's own
    dtype cannot see the effects of a wrong result. ``progress`` is told each rollout before it runs. A plan that
    does not fit the model raises its :class:`~fkv_compile.plan.PlanError` at the first rollout."""
    from ..report import report

    unknown = [m for m in modes if m not in CHECKED_MODES]
    if unknown:
        raise ValueError(f"modes expected some of {CHECKED_MODES}, got {unknown}")
    if lowering not in ("inductor", "aot_eager", "eager"):
        raise ValueError(f"lowering expected 'inductor', 'aot_eager' or 'eager', got {lowering!r}")
    user = Target(model_factory, rollout)
    base = _baseline(user, plan, lowering, factor, progress)
    compare = base
    checks = [_reproducible(base, lowering)]
    if not base.conclusive and reference is not None and any(m in COMPRESSED_MODES for m in modes):
        compare = _baseline(reference, plan, lowering, factor, lambda what: progress(f"higher-precision twin: {what}"))
        checks.append(_reproducible(compare, lowering))
    for mode in modes:
        try:
            if mode == "oracle" and base.oracle_run is not None:  # the baseline ran it: the same run, not a second
                outs, compiled, breaks = base.oracle_run
            else:
                progress(f"mode {mode!r}")
                outs, compiled, breaks = _run(model_factory, rollout, "forcing_kv",
                                              {"plan": plan, "mode": mode, "lowering": lowering})
            rep = report(compiled, print_table=False)
            effect, error = math.inf, ""
            if mode == "off":
                ref_name, ref, mode_budget = lowering, base.plain, 0.0
            elif mode == "oracle":
                ref_name, ref, mode_budget = f"eager (dense, {_name(base.dtype)})", base.eager, math.inf
            else:
                effect = compare.effect
                if compare is not base:  # the user's dtype ran (crashes, recompiles); compare in the twin's
                    progress(f"mode {mode!r} in {_name(compare.dtype)}")
                    outs = _run(reference.model_factory, reference.rollout, "forcing_kv",
                                {"plan": plan, "mode": mode, "lowering": lowering})[0]
                if compare.oracle is None:
                    raise RuntimeError(compare.error)
                ref_name, ref, mode_budget = f"oracle ({_name(compare.dtype)})", compare.oracle, compare.budget
                if not compare.conclusive:
                    error = _inconclusive(compare)
            err, rel, worst = _errors(outs, ref)
            if mode == "off" and any(not torch.equal(a, b) for a, b in zip(outs, ref)):
                err = max(err, math.ulp(0.0))  # bit-identical means equal bits, not a zero rounded difference
            limited = [f.function for f in rep.frames if f.at_limit]
            if limited:
                error = (f"{', '.join(limited)} hit torch._dynamo.config.recompile_limit: later chunks ran eagerly, "
                         "uncompressed (the oracle too, so outputs can still agree)")
            checks.append(ModeCheck(mode, ref_name, err, rel, worst, mode_budget, rep.graphs, breaks,
                                    sum(s.action.is_site for s in rep.sites), error=error, effect=effect))
        except Exception as exc:  # a failing mode is a result to report, not the end of the check
            checks.append(ModeCheck(mode, "-", math.nan, math.nan, -1, compare.budget, 0, 0, 0,
                                    error=_reason(exc)))
    return EquivalenceReport(tuple(checks), len(base.eager), base.noise, compare.effects, _name(compare.dtype))
