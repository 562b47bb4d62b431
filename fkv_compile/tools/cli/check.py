"""``fkv check``: the equivalence of every mode on a model's rollout, for CI (exit status 1 on failure)."""

from __future__ import annotations

import argparse
import sys

from ..check import check_equivalence
from .common import emit, load_plan
from .targets import check_target

__all__ = ["cmd_check"]


def cmd_check(args: argparse.Namespace) -> int:
    target, twin = check_target(args)
    result = check_equivalence(target.model_factory, target.rollout, load_plan(args.plan), args.modes, args.lowering,
                               reference=twin)
    emit(args, result.to_dict(), result.table())
    if not result.passed:
        print("fkv check: FAILED\n  " + "\n  ".join(result.failures()), file=sys.stderr)
        return 1
    return 0
