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

import sympy
import torch
import torch.fx as fx

__all__ = ["FrameId", "current_frame", "compiled_variants", "recompile_limit", "guarded_ints", "specialized_expressions"]

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


def guarded_ints() -> dict[str, int]:
    """The Python ints the graph being compiled is specialized on (dynamo's value guards on globals and locals), by
    source name as ``torch.compiler.config.dynamic_sources`` takes it, with their values in this call."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    context, tx = torch._guards.TracingContext.try_get(), InstructionTranslator.current_tx()
    if context is None or tx is None:
        return {}
    scope = {"L": tx.f_locals, "G": tx.f_globals}
    found = {}
    for guard in context.guards_context.dynamo_guards:
        kind = getattr(guard.create_fn, "func", guard.create_fn)
        if getattr(kind, "__name__", "") not in ("CONSTANT_MATCH", "EQUALS_MATCH"):
            continue
        try:
            value = eval(guard.name, {}, scope)  # noqa: S307  a source name: subscripts and attributes of L and G
        except Exception:  # a source that is not a plain expression of the frame's scope
            continue
        if type(value) is int:
            found[guard.name] = value
    return found


def specialized_expressions() -> dict[str, int]:
    """The expressions of dynamic ints the model's own code pinned to a value in the graph being compiled (a dict
    keyed by ``n // 24``, say: dynamo guards ``Eq(n // 24, 8)``), as ``"<expression> (<file:line>)"`` with the
    value: a value that changes every chunk recompiles whatever ``dynamic`` is."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    env = getattr(getattr(tx, "output", None), "shape_env", None)
    if env is None:
        return {}
    found = {}
    for guard in env.guards:
        expr = guard.expr
        if not (isinstance(expr, sympy.Eq) and isinstance(expr.rhs, sympy.Integer) and expr.lhs.free_symbols):
            continue
        names = {s: sympy.Symbol(env.var_to_sources[s][0].name) for s in expr.lhs.free_symbols
                 if env.var_to_sources.get(s)}
        where = guard.sloc.maybe_user_loc or guard.sloc.framework_loc
        found[f"{expr.lhs.xreplace(names)} ({where})"] = int(expr.rhs)
    return found
