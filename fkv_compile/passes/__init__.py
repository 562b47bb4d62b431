"""Graph passes over the dynamo FX graph (torch-level IR) that a ``forcing_kv`` backend call receives.

Invariants every pass keeps:

- only attention nodes the matchers accept are touched; everything else stays exactly as traced,
  and every declined attention call gets a report row with its reason;
- a new node gets an ``example_value`` from its op's fake implementation;
- no new aliasing: the custom ops return fresh tensors and declare no mutation; ``compact``'s ops
  keep their order through data (roll tokens feed the attention op) and only release the dense
  cache storage of sites whose every cache access they replaced (see :mod:`.compact`);
- no dead-code elimination: ``eliminate_dead_code`` on a dynamo graph deletes in-place cache
  writes (``setitem``, ``fill_``), so the passes erase only the nodes they replace;
- no buffers owned by the backend inside the graph: run-time state lives in the session
  (:mod:`fkv_compile.modes.state`), reached through integer ids baked into the op calls.

:func:`run_passes` runs, in order: count the compile for its frame (recompile limit), find the
attention sites, check the plan against their traced shapes, record the declined calls, rewrite the
sites for the mode.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import warnings

import torch
import torch.fx as fx
from torch import nn

from ..bundled import PLANS
from ..config import OptionsError
from ..modes.calibration import Calibrator, Geometry, GeometryError
from ..modes.sharding import make_shard
from ..modes.state import FrameRecord, Session, SiteAction
from ..modes.store import compact_unsupported
from ..plan import PlanError
from .attention import AttentionSite, CachePattern, Declined, find_attention_sites
from .compact import CacheAccesses, GrownAccesses, match_compact, match_grown
from .frames import compiled_variants, current_frame, guarded_ints, recompile_limit, specialized_expressions
from .geometry import traced_patch_geometry, watch_patch_embeddings
from .replay import dropping_outputs, rewrite_replays
from .rewrite import lint_and_recompile, rewrite_compact, rewrite_grown, rewrite_select_cache, rewrite_site

__all__ = ["SiteError", "RecompileLimitWarning", "PlanNeverAppliesWarning", "GeometryError", "run_passes", "AttentionSite", "Declined",
           "find_attention_sites", "dropping_outputs"]

log = logging.getLogger("fkv_compile")


class SiteError(RuntimeError):
    """``strict=True`` and an attention call over a cache window could not be rewritten."""


class PlanNeverAppliesWarning(UserWarning):
    """The plan's chunk is shorter than what an attention call queries: the keep rule never applies, it runs dense."""


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


def _count_compile(gm: fx.GraphModule, session: Session, graph_id: int) -> None:
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
    if session.config.mode == "off":
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


def _traced_shape(site: AttentionSite) -> tuple[object, object, object]:
    """Heads, query tokens and key tokens the site's attention was traced with (ints, or symbols when dynamic)."""
    heads, tokens = (1, 2) if site.layout == "bhld" else (2, 1)
    q, k = site.q.meta["example_value"].shape, site.k.meta["example_value"].shape
    return q[heads], q[tokens], k[tokens]


def _shard_plan(session: Session, heads: int, where: str) -> None:
    """Head parallelism: the site has ``heads`` of the plan's heads; from now on ``session.plan`` is this rank's."""
    if session.shard is not None:
        raise PlanError(f"plan does not match the model: {where} has {heads} heads, another attention of this rank "
                        f"{session.plan.num_heads} (heads {session.shard.heads.start}-{session.shard.heads.stop - 1} "
                        f"of the plan's {session.shard.plan.num_heads})")
    shard = make_shard(session.plan, heads, session.config, where)
    if session.config.mode == "oracle" and any(shard.spans(layer) for layer in range(shard.plan.num_layers)):
        raise OptionsError("mode 'oracle' under head parallelism with selection='layer': the oracle is the "
                           "single-process reference; compile it without a process group")
    session.shard, session.plan = shard, shard.local
    log.info("forcing_kv: head parallelism: rank %d of %d attends for heads %d-%d of the plan's %d", shard.rank,
             shard.world_size, shard.heads.start, shard.heads.stop - 1, shard.plan.num_heads)


def _check_plan_fits(site: AttentionSite, session: Session) -> None:
    """Heads and frame geometry of the plan against the shapes traced at this site (static sizes only)."""
    heads, queries, _ = _traced_shape(site)
    where = f"the attention at {site.node.name} (keys from {site.k_window.source})"
    if isinstance(heads, int) and heads != session.plan.num_heads:
        _shard_plan(session, heads, where)
    plan = session.plan
    chunk = plan.chunk_frames * plan.frame_tokens
    if isinstance(queries, int) and queries > chunk:  # a shorter query is a short last chunk: dense, as the rule says
        message = (f"plan does not match the model: {where} queries {queries} tokens, more than the plan's chunk of "
                   f"{plan.chunk_frames} frames x {plan.frame_tokens} tokens ({chunk}): the keep rule never applies to "
                   "it and it runs dense; make the plan for this model's frame size and chunk")
        if session.config.strict:
            raise PlanError(f"strict: {message}")
        warnings.warn(message, PlanNeverAppliesWarning, stacklevel=2)
    grown = site.k_window.grown
    # a preallocated cache's size is the longest window; a grown one's (or a window's from an earlier graph)
    # is only known per call
    read = site.k_window.read if grown else site.k_window.cache
    cache_tokens = read.meta["example_value"].shape[site.k_window.dim]
    if not isinstance(cache_tokens, int):
        return
    if cache_tokens % plan.frame_tokens:
        raise PlanError(
            f"plan does not match the model: frame_tokens: plan has {plan.frame_tokens}, but the cache of {where} "
            f"holds {cache_tokens} tokens, not a whole number of frames; make the plan for this resolution"
        )
    if not grown:
        plan.validate_geometry(window_frames=cache_tokens // plan.frame_tokens)


def _compact_pattern(site: AttentionSite) -> str | None:
    """Why ``compact`` cannot own this site's cache by its pattern alone, or ``None``."""
    if site.k_window.pattern is CachePattern.WINDOW_INPUT:
        return (f"NYI: compact for {CachePattern.WINDOW_INPUT} caches (the window is read in an earlier graph, where "
                "its cache stays dense)")
    recomputed = [w.pattern for w in (site.k_window, site.v_window) if w.recomputed]
    if recomputed:
        return (f"{recomputed[0]}: keys transformed from the cache at every call (re-rotated) cannot be served from "
                "a store of the cached ones")
    return None


def _record_declined(declined: list[Declined], session: Session, graph_id: int) -> None:
    for no in declined:
        if no.candidate and session.config.strict:
            raise SiteError(f"strict: attention {no.node.name} in graph {graph_id} left dense: {no.reason}")
        session.new_site(graph=graph_id, node=no.node.name, pattern="-", action=SiteAction.LEFT_ALONE, reason=no.reason)
        log.info("graph %d: %s left alone: %s", graph_id, no.node.name, no.reason)


def _rewrite_select(gm: fx.GraphModule, site: AttentionSite, session: Session, site_id: int) -> None:
    """``select``: where the graph alone writes the chunk into the cache and reads the window, without a roll or a
    staged copy
    (:func:`.compact.match_compact`), and autograd is off, the op makes the write itself, so that the buffers'
    version counters tell it when a layer's kept ranges can be reused
    (:class:`fkv_compile.modes.select.SelectionMemo`); elsewhere every call chooses its ranges."""
    accesses = None
    if site.k_window.pattern not in (CachePattern.CAT_GROWTH, CachePattern.WINDOW_INPUT) and not torch.is_grad_enabled():
        accesses = match_compact(site)
    if isinstance(accesses, CacheAccesses) and not accesses.rolls and accesses.staged is None:
        rewrite_select_cache(gm, site, accesses, session=session.id, site_id=site_id)
    else:
        rewrite_site(gm, site, mode="select", session=session.id, site_id=site_id)


def _rewrite(gm: fx.GraphModule, site: AttentionSite, session: Session, graph_id: int) -> None:
    config = session.config
    record = session.new_site(
        graph=graph_id,
        node=site.node.name,
        pattern=site.pattern + (" (+writes)" if site.writes_in_graph else ""),
        action=SiteAction.FOUND if config.mode == "off" else SiteAction.REWRITTEN,
        cache=site.k_window.source,
        layer_key=site.layer_key_kind,
        checks_order=site.k_window.pattern in (CachePattern.CACHE_WINDOW, CachePattern.WINDOW_INPUT)
        and not site.writes_in_graph,
    )
    if config.mode == "compact":
        plan = session.shard.plan if session.shard is not None else session.plan
        unsupported = compact_unsupported(plan) if plan is not None else None
        grown = site.k_window.pattern is CachePattern.CAT_GROWTH
        accesses = unsupported or _compact_pattern(site) or (match_grown(site) if grown else match_compact(site))
        if isinstance(accesses, CacheAccesses):
            rewrite_compact(gm, site, accesses, session=session.id, site_id=record.site)
            record.action = SiteAction.COMPACT
            session.staged |= accesses.staged is not None
        elif isinstance(accesses, GrownAccesses):
            rewrite_grown(gm, site, accesses, session=session.id, site_id=record.site)
            record.action = SiteAction.COMPACT
        else:
            if config.strict:
                raise SiteError(f"strict: attention {site.node.name} in graph {graph_id} not compact: {accesses}")
            _rewrite_select(gm, site, session, record.site)
            record.action, record.reason = SiteAction.SELECT, f"compact fell back to select: {accesses}"
    elif config.mode == "select":
        _rewrite_select(gm, site, session, record.site)
    elif config.mode != "off":
        rewrite_site(gm, site, mode=config.mode, session=session.id, site_id=record.site)
    log.info("graph %d: %s over %s: %s %s", graph_id, site.node.name, record.cache, record.action, record.reason)


def _fitting(found: list[Geometry], sites: list[AttentionSite]) -> list[Geometry]:
    """The patch geometries that fit every site traced with static token counts (``Lq = F h w``)."""
    shapes = [(lq, lk) for _, lq, lk in map(_traced_shape, sites) if isinstance(lq, int) and isinstance(lk, int)]
    return [g for g in found if all(g.fits(lq, lk) for lq, lk in shapes)]


def _adapt_bundled_plan(session: Session, traced: list[Geometry], sites: list[AttentionSite], model: nn.Module | None) -> None:
    """A plan given by name carries its model's native geometry: the patch embedding's wins. Traced, it is set now;
    else, if the native geometry does not fit the attention, the plan waits for the embedding's hook (run time)."""
    config = session.config
    checked = any(r.action.is_site for r in session.sites)
    if config.plan_name is None or config.frame_tokens or config.chunk_frames or checked or session.calibrator:
        return
    fitting = _fitting(traced, sites)
    native = Geometry(config.plan.frame_tokens, config.plan.chunk_frames, f"plan {config.plan_name!r}")
    if fitting:
        g = fitting[0]
        session.plan = dataclasses.replace(config.plan, frame_tokens=g.frame_tokens, chunk_frames=g.chunk_frames)
        log.info("forcing_kv: plan %r at %d tokens per frame, %d frames per chunk, from %s", config.plan_name,
                 g.frame_tokens, g.chunk_frames, g.source)
    elif (not _fitting([native], sites) and model is not None and not traced
          and all(_traced_shape(site)[0] == config.plan.num_heads for site in sites)):  # else the check names the heads
        session.plan, session.num_layers = None, None  # the layer count is learned as in calibration, then checked
        session.calibrator = Calibrator(config.calibration, None, template=config.plan)
        hooked = watch_patch_embeddings(model, session.calibrator)
        log.info("forcing_kv: plan %r: its native geometry does not fit the attention; reading the geometry from "
                 "the next call of %d Conv3d patch embeddings", config.plan_name, hooked)


def _start_calibration(session: Session, traced: list[Geometry], sites: list[AttentionSite], model: nn.Module | None) -> None:
    """No plan: the sites run dense and record until the :class:`Calibrator` makes one; find the geometry."""
    config = session.config
    if config.mode == "profile":
        raise OptionsError(
            f"backend 'forcing_kv' in mode 'profile' found attention over a KV cache ({sites[0].node.name}) but got "
            f"no plan to take the geometry from; pass a plan ({', '.join(PLANS)}; fkv plan list), or drop mode "
            "'profile': without a plan the model calibrates itself"
        )
    if (config.frame_tokens is None) != (config.chunk_frames is None):
        raise OptionsError("options frame_tokens and chunk_frames go together when there is no plan; pass both")
    if config.frame_tokens is not None:
        geometry = Geometry(config.frame_tokens, config.chunk_frames, "the options")
        if not _fitting([geometry], sites):
            _, lq, lk = _traced_shape(sites[0])
            raise GeometryError(f"options frame_tokens={config.frame_tokens}, chunk_frames={config.chunk_frames} do "
                                f"not fit the attention at {sites[0].node.name} ({lq} query, {lk} key tokens)")
    else:
        fitting = _fitting(traced, sites)
        if traced and not fitting:
            raise GeometryError(f"the traced patch embeddings {[g.source for g in traced]} do not fit the attention "
                                f"at {sites[0].node.name}; pass options frame_tokens and chunk_frames")
        geometry = fitting[0] if fitting else None
    if session.calibrator is None:
        session.calibrator = Calibrator(config.calibration, geometry)
        hooked = 0 if geometry is not None or model is None else watch_patch_embeddings(model, session.calibrator)
        log.info("forcing_kv: no plan: calibrating on %s (geometry %s)",
                 "the first video" if config.calibration.chunks is None else f"{config.calibration.chunks} chunks",
                 geometry.source if geometry else f"from the next call of {hooked} Conv3d patch embeddings")
    elif session.calibrator.geometry is None:
        session.calibrator.geometry = geometry


def run_passes(gm: fx.GraphModule, session: Session, model: nn.Module | None = None) -> int:
    """Find the attention sites of ``gm``, record them in ``session``, and rewrite them per its mode. ``model``:
    the module being compiled (its patch embedding tells a plan-less model's geometry). In ``compact``, from the
    first staged site on, the write-backs of its caches become replay ops (:mod:`.replay`); returns the number
    of their tokens added to the graph's outputs (:func:`dropping_outputs` hides them again)."""
    graph_id = session.graphs
    session.graphs += 1
    _count_compile(gm, session, graph_id)
    sites, declined = find_attention_sites(gm.graph)
    traced = traced_patch_geometry(gm)
    session.patch_geometry.extend(traced)
    if sites and session.config.mode != "off":
        if session.config.plan is None:
            _start_calibration(session, session.patch_geometry, sites, model)
        else:
            _adapt_bundled_plan(session, session.patch_geometry, sites, model)
    if session.config.plan is None and not sites:
        log.info("forcing_kv: no attention over a KV cache in graph %d: compiled with %s alone", graph_id,
                  session.config.lowering)
    for site in sites if session.plan is not None else ():
        _check_plan_fits(site, session)
    _record_declined(declined, session, graph_id)
    for site in sites:
        _rewrite(gm, site, session, graph_id)
    replays = rewrite_replays(gm, session.id) if session.staged else 0
    if (sites and session.config.mode != "off") or replays:
        lint_and_recompile(gm)
    return replays
