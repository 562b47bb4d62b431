"""The ``forcing_kv`` torch.compile backend: build the config, run the passes, hand the graph to a lowering.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``torch.compile(model, backend="forcing_kv", options={"plan": plan})`` works without importing
this package first. It must not also call ``register_backend`` (duplicate-name error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from .config import Config, OptionsError
from .modes.state import Session, compiling_module, open_session
from .passes import dropping_outputs, run_passes

__all__ = ["forcing_kv", "OptionsError"]


def _lower(gm: fx.GraphModule, example_inputs: list[Any], lowering: str, inductor_mode: str | None) -> Callable:
    if lowering == "eager":
        return gm.forward
    if lowering == "aot_eager":
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
    """Dynamo backend; ``options`` are the fields of :class:`fkv_compile.Config` (none required).
    ``mode`` (the torch.compile argument, possible without options) goes to Inductor, as does the option
    ``inductor_mode``."""
    from . import ops  # noqa: F401  registers the custom ops before any graph uses them

    compiled = compiling_module()
    session: Session = open_session(options, compiled, Config.from_options)
    config = session.config
    replay_tokens = run_passes(gm, session, compiled._orig_mod if compiled is not None else None)
    lowered = _lower(gm, example_inputs, config.lowering, config.inductor_mode or mode)
    if replay_tokens:  # a staged cache's write-back: the replay ops' tokens are outputs dynamo does not expect
        lowered = dropping_outputs(lowered, replay_tokens)
    return session.owns(lowered)
