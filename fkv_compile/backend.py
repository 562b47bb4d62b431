"""The ``forcing_kv`` torch.compile backend: parse options, run the passes, hand the graph to a lowering.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="forcing_kv", options={"plan": plan})`` works without importing
this package first. It must not also call ``register_backend`` (duplicate-name error).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from .kernels import KERNEL_CHOICES, KernelsError, default_kernels
from .plan import HeadPlan
from .runtime import LOWERINGS, MODES, Session, open_session

__all__ = ["forcing_kv", "OptionsError"]

OPTION_NAMES = ("plan", "mode", "lowering", "strict", "kernels")


class OptionsError(ValueError):
    """The backend options are malformed."""


def _parse_options(options: Mapping[str, Any] | None) -> tuple[HeadPlan, str, str, bool, str]:
    if options is None or "plan" not in options:
        raise OptionsError(
            "backend 'forcing_kv' expected options={'plan': HeadPlan or path, ...}, got no plan; "
            "pass torch.compile(model, backend='forcing_kv', options={'plan': plan})"
        )
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise OptionsError(f"backend 'forcing_kv' got unknown options {unknown}; expected some of {OPTION_NAMES}")
    plan = options["plan"]
    if isinstance(plan, (str, os.PathLike)):
        plan = HeadPlan.load(plan)
    if not isinstance(plan, HeadPlan):
        raise OptionsError(f"option plan expected a HeadPlan or a path, got {type(plan).__name__}")
    mode = options.get("mode", "select")
    if mode not in MODES:
        raise OptionsError(f"option mode expected one of {MODES}, got {mode!r}")
    lowering = options.get("lowering", "inductor")
    if lowering not in LOWERINGS:
        raise OptionsError(f"option lowering expected one of {LOWERINGS}, got {lowering!r}")
    strict = options.get("strict", False)
    if not isinstance(strict, bool):
        raise OptionsError(f"option strict expected a bool, got {strict!r}")
    try:
        kernels = options.get("kernels") or default_kernels()
    except KernelsError as e:
        raise OptionsError(str(e)) from None
    if kernels not in KERNEL_CHOICES:
        raise OptionsError(f"option kernels expected one of {KERNEL_CHOICES}, got {kernels!r}")
    return plan, mode, lowering, strict, kernels


def _lower(gm: fx.GraphModule, example_inputs: list[Any], session: Session, inductor_mode: str | None) -> Callable:
    if session.lowering == "eager":
        return gm.forward
    if session.lowering == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(inductor_mode) if inductor_mode else None
    return compile_fx(gm, example_inputs, config_patches=patches)


def forcing_kv(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable:
    """Dynamo backend. ``options``: ``plan`` (required), ``mode`` (``off``/``oracle``/``select``/``compact``/
    ``profile``, default ``select``), ``lowering`` (``inductor``/``aot_eager``/``eager``), ``strict`` (raise on attention
    over a cache that cannot be rewritten), ``kernels`` (``auto``: Triton on CUDA, torch on CPU; ``torch``; ``triton``,
    on CPU through the interpreter; default ``$FKV_KERNELS`` or ``auto``). ``mode`` (the torch.compile argument) goes to Inductor.
    """
    from . import ops  # noqa: F401  registers the custom ops before any graph uses them
    from .passes import run_passes

    plan, fkv_mode, lowering, strict, kernels = _parse_options(options)
    session = open_session(options, plan, fkv_mode, lowering, strict, kernels)
    if (session.plan, session.mode, session.lowering, session.strict, session.kernels) != (
            plan, fkv_mode, lowering, strict, kernels):
        raise OptionsError("the options of a compiled model were changed after its first compile; compile it anew")
    run_passes(gm, session)
    return _lower(gm, example_inputs, session, mode)
