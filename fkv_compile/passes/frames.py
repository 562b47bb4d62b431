"""Which code object (frame) dynamo is compiling, for the report's compile counts and the recompile-limit check.

Dynamo compiles one graph per frame and variant: a graph break starts a new frame (a resume function
``torch_dynamo_resume_in_<fn>_at_<line>``), a guard failure compiles the same frame again. When a
frame reaches ``torch._dynamo.config.recompile_limit`` compiles, dynamo runs its later variants
eagerly, and new variants of the frames called from them (resume functions included): attention
there is the model's own, dense. That must not pass silently.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["FrameId", "current_frame", "compiled_variants", "recompile_limit"]

_FILE_LINE = re.compile(r'File "(?P<file>[^"]+)", line \d+, in (?P<function>\S+)')


@dataclass(frozen=True)
class FrameId:
    frame: int  # dynamo's frame id; negative for graphs compiled outside dynamo (no frame)
    function: str  # "forward (self_forcing.py)": the outermost user function of the graph's code
    variants: int = 1  # dynamo's compiled variants of the code object with this one, over every model in the process
    code: types.CodeType | None = None  # the code object (None outside dynamo)


def current_frame(gm: fx.GraphModule, fallback: int) -> FrameId:
    """The frame dynamo is compiling ``gm`` for, named by the outermost function in its nodes' stack traces."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    frame = compile_id.frame_id if compile_id is not None and compile_id.frame_id is not None else -1 - fallback
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    code = tx.f_code if tx is not None else None
    variants = 1 + compiled_variants(code) if code is not None else 1
    for node in gm.graph.nodes:
        match = _FILE_LINE.search(node.meta.get("stack_trace") or "")
        if match:
            return FrameId(frame, f"{match['function']} ({match['file'].rsplit('/', 1)[-1]})", variants, code)
    return FrameId(frame, "<graph without source>", variants, code)


def compiled_variants(code: object) -> int:
    """Dynamo's compiled variants of ``code`` now. Dynamo keeps them per code object, so other models of the same
    class (and other compiles of this one) count too: the recompile limit is theirs together."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(code))


def recompile_limit() -> int:
    return int(torch._dynamo.config.recompile_limit)
