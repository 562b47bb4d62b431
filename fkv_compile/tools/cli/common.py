"""What every ``fkv`` verb shares: the user-facing error, output, and loading plans and callables."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections.abc import Callable
from typing import Any

from ...bundled import bundled_plan, is_bundled_name
from ...plan import HeadPlan, PlanError

__all__ = ["CliError", "emit", "load_plan", "load_callable", "positive_int", "non_negative_int"]


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (a count of frames, chunks, layers, ...)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0 (a budget, a number of sink frames)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
    return value


def emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    """``data`` as JSON with ``--json``, else ``text``."""
    print(json.dumps(data, indent=1) if args.json else text)


def load_plan(path: str) -> HeadPlan:
    """A plan file, or a bundled plan by name (``fkv plan list``) at its model's native geometry."""
    if is_bundled_name(path) and not os.path.exists(path):
        try:
            return bundled_plan(path)
        except PlanError as exc:
            raise CliError(str(exc)) from None
    try:
        return HeadPlan.load(path)
    except FileNotFoundError:
        raise CliError(f"plan file not found: {path}") from None


def load_callable(spec: str, option: str, expected: str) -> Callable[..., Any]:
    """The callable ``module:attr`` names (``expected`` says what else ``option`` accepts, for the error)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"{option} expected {expected} or 'module:callable', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"{option} {spec!r}: cannot load it ({exc})") from None
    if not callable(obj):
        raise CliError(f"{option} {spec!r} is not callable")
    return obj
