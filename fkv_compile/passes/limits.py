"""Dynamo's recompile limit, per compiled frame: past it dynamo runs a frame's new variants eagerly, without the
pass, so attention there is dense again. Counted here at every compile, told once (a warning naming what to do;
``strict`` raises), and the compact store holds the dense buffers, which those eager variants read and write."""

from __future__ import annotations

import types
import warnings

import torch.fx as fx

from ..modes.state import FrameRecord, Session
from .frames import compiled_variants, current_frame, guarded_ints, recompile_limit, specialized_expressions
from .sites import SiteError

__all__ = ["RecompileLimitWarning", "count_compile"]


class RecompileLimitWarning(UserWarning):
    """A compiled frame reached dynamo's recompile limit: its new variants, and those of the frames it calls,
    run eagerly, with dense attention."""


_AT_LIMIT: dict[int, tuple[str, types.CodeType | None]] = {}
"""Frames (dynamo's frame ids, one per code object) that reached dynamo's recompile limit in this process -> their
function and code object (still at the limit while dynamo keeps that many variants: a reset clears them)."""


_DENSE_THERE = "attention there is the model's dense attention (not compressed)"


_LIMIT_HINT = (f"{_DENSE_THERE}. A recompile per chunk usually means positions are specialized "
               "(torch.compile(dynamic=False) with Python-int indices); compile with the default dynamic=None, or raise "
               "torch._dynamo.config.recompile_limit (every new position then compiles)")


def _limit_hint(record: FrameRecord) -> str:
    """What to do about a frame at the recompile limit: name the Python ints it recompiled on and the expressions
    its code pinned, if any."""
    ints, exprs = record.changing()
    if not ints and not exprs:
        return _LIMIT_HINT
    hints = []
    if ints:
        hints.append(f"it recompiled on new values of the Python int(s) {', '.join(ints)} (positions that change every "
                     "chunk: dynamo specializes ints read from globals, and every int under dynamic=False); mark them "
                     f"dynamic before the first compile: torch.compiler.config.dynamic_sources = \"{','.join(ints)}\" "
                     "(or the environment variable TORCH_COMPILE_DYNAMIC_SOURCES)")
    if exprs:
        hints.append(f"the model's code pins {'; '.join(exprs)} to a value that changes between calls (a dict or cache "
                     "keyed by a position, say), which recompiles whatever dynamic is: take that lookup out of the "
                     "compiled code or turn it off")
    return f"{_DENSE_THERE}. " + "; ".join(h[0].upper() + h[1:] for h in hints)


def count_compile(gm: fx.GraphModule, session: Session, graph_id: int) -> None:
    """Count this compile for its frame; warn (``strict``: raise) once a frame reaches dynamo's recompile
    limit: dynamo then runs its new variants eagerly, and new variants of the frames it calls (the resume
    function holding the attention after a graph break, say) too, all without the pass. Dynamo counts per code
    object over every model in the process: a frame another model brought to the limit is told here too."""
    ident = current_frame(gm, fallback=graph_id)
    record = session.frames.setdefault(ident.frame, FrameRecord(ident.frame, ident.function))
    record.compiles += 1
    for found, into in ((guarded_ints(), record.ints), (specialized_expressions(), record.exprs)):
        for name, value in found.items():
            into.setdefault(name, set()).add(value)
    if not session.config.mode.rewrites:
        return
    variants = max(record.compiles, ident.variants)
    if not record.at_limit and variants >= recompile_limit():
        _AT_LIMIT[ident.frame] = (ident.function, ident.code)
        others = (f" ({variants - record.compiles} of them for other compiled models of the same code: dynamo counts "
                  "per code object)" if variants > record.compiles else "")
        _reached_limit(session, record, f"{record.function} was compiled {variants} times{others}, "
                       f"torch._dynamo.config.recompile_limit: dynamo runs its next variants, and new variants of the "
                       f"frames it calls, eagerly: {_limit_hint(record)}")
    file = ident.code.co_filename if ident.code is not None else None
    for frame, (function, code) in list(_AT_LIMIT.items()):
        if frame == ident.frame:
            continue
        if code is None or compiled_variants(code) < recompile_limit():
            del _AT_LIMIT[frame]  # dynamo was reset, or its limit raised
        elif code.co_filename == file and not session.frames.get(frame, FrameRecord(frame, function)).at_limit:
            inherited = session.frames.setdefault(frame, FrameRecord(frame, function))
            _reached_limit(session, inherited, f"{function} reached torch._dynamo.config.recompile_limit through other "
                           f"compiled models of the same code (dynamo counts per code object): its new variants run "
                           f"eagerly for this model too: {_LIMIT_HINT}")


def _reached_limit(session: Session, record: FrameRecord, message: str) -> None:
    record.at_limit = True
    session.compact.hold(f"{record.function} reached dynamo's recompile limit: its eager variants read and write the "
                         "dense buffers")
    if session.config.strict:
        raise SiteError(f"strict: {message}")
    warnings.warn(message, RecompileLimitWarning, stacklevel=3)

