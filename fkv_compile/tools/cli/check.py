"""``fkv check``: the equivalence of every mode on a model's rollout, for CI (exit status 1 on failure)."""

from __future__ import annotations

import argparse
import sys
import time

from ..check import check_equivalence
from .common import CliError, emit, load_plan
from ...models.miniatures import MINIATURES
from .targets import check_target, miniature_geometry

__all__ = ["cmd_check"]


def cmd_check(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    if args.model in MINIATURES:  # a bundled miniature's geometry is known: a misfit is said before anything runs
        problems = miniature_geometry(args.model).misfits(plan)
        if problems:
            raise CliError(f"{args.plan} does not fit {args.model}: {'; '.join(problems)} (make a plan for it: "
                           f"fkv profile --model {args.model} --out plan.json)")
    target, twin = check_target(args)
    result = check_equivalence(target.model_factory, target.rollout, plan, args.modes, args.lowering,
                               reference=twin, progress=_Steps(enabled=not args.quiet))
    emit(args, result.to_dict(), result.table())
    if not result.passed:
        print("fkv check: FAILED\n  " + "\n  ".join(result.failures()), file=sys.stderr)
        return 1
    return 0


class _Steps:
    """Each rollout on standard error as it starts, numbered, with the time since the check began."""

    def __init__(self, enabled: bool):
        self.enabled, self.count, self.start = enabled, 0, time.perf_counter()

    def __call__(self, what: str) -> None:
        self.count += 1
        if self.enabled:
            print(f"fkv check [{time.perf_counter() - self.start:6.1f} s] rollout {self.count}: {what}",
                  file=sys.stderr, flush=True)
