"""The plan against the traced model: heads (a rank's share under head parallelism), frame geometry, and, without a
plan, the start of self-calibration with the geometry the traced patch embedding or the options give."""

from __future__ import annotations

import dataclasses
import logging
import warnings

from torch import nn

from ..bundled import PLANS
from ..config import Mode, OptionsError
from ..modes.calibration import Calibrator, Geometry, GeometryError
from ..modes.sharding import make_shard
from ..modes.state import Session
from ..plan import PlanError
from .geometry import watch_patch_embeddings
from .sites import AttentionSite

__all__ = ["PlanNeverAppliesWarning", "traced_shape", "check_plan_fits", "adapt_bundled_plan", "start_calibration"]

log = logging.getLogger("fkv_compile")


class PlanNeverAppliesWarning(UserWarning):
    """The plan's chunk is shorter than what an attention call queries: the keep rule never applies, it runs dense."""


def traced_shape(site: AttentionSite) -> tuple[object, object, object]:
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
    if session.config.mode is Mode.ORACLE and any(shard.spans(layer) for layer in range(shard.plan.num_layers)):
        raise OptionsError("mode 'oracle' under head parallelism with selection='layer': the oracle is the "
                           "single-process reference; compile it without a process group")
    session.shard, session.plan = shard, shard.local
    log.info("forcing_kv: head parallelism: rank %d of %d attends for heads %d-%d of the plan's %d", shard.rank,
             shard.world_size, shard.heads.start, shard.heads.stop - 1, shard.plan.num_heads)


def check_plan_fits(site: AttentionSite, session: Session) -> None:
    """Heads and frame geometry of the plan against the shapes traced at this site (static sizes only)."""
    heads, queries, _ = traced_shape(site)
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


def _fitting(found: list[Geometry], sites: list[AttentionSite]) -> list[Geometry]:
    """The patch geometries that fit every site traced with static token counts (``Lq = F h w``)."""
    shapes = [(lq, lk) for _, lq, lk in map(traced_shape, sites) if isinstance(lq, int) and isinstance(lk, int)]
    return [g for g in found if all(g.fits(lq, lk) for lq, lk in shapes)]


def adapt_bundled_plan(session: Session, traced: list[Geometry], sites: list[AttentionSite], model: nn.Module | None) -> None:
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
          and all(traced_shape(site)[0] == config.plan.num_heads for site in sites)):  # else the check names the heads
        session.plan, session.num_layers = None, None  # the layer count is learned as in calibration, then checked
        session.calibrator = Calibrator(config.calibration, None, template=config.plan)
        hooked = watch_patch_embeddings(model, session.calibrator)
        log.info("forcing_kv: plan %r: its native geometry does not fit the attention; reading the geometry from "
                 "the next call of %d Conv3d patch embeddings", config.plan_name, hooked)


def start_calibration(session: Session, traced: list[Geometry], sites: list[AttentionSite], model: nn.Module | None) -> None:
    """No plan: the sites run dense and record until the :class:`Calibrator` makes one; find the geometry."""
    config = session.config
    if config.mode is Mode.PROFILE:
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
            _, lq, lk = traced_shape(sites[0])
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

