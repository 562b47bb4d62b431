"""The pass pipeline a ``forcing_kv`` backend call runs over one dynamo graph, and the rewrite chosen per mode."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from ..config import Mode
from ..modes.state import Session, SiteAction, SiteRecord
from ..modes.store import compact_unsupported
from .attention import find_attention_sites
from .compact import CacheAccesses, GrownAccesses, match_compact, match_grown
from .fit import adapt_bundled_plan, check_plan_fits, start_calibration
from .geometry import traced_patch_geometry
from .limits import count_compile
from .replay import rewrite_replays
from .rewrite import lint_and_recompile, rewrite_compact, rewrite_grown, rewrite_select_cache, rewrite_site
from .sites import AttentionSite, CachePattern, Declined, SiteError

__all__ = ["run_passes", "REWRITES"]

log = logging.getLogger("fkv_compile")


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


def _rewrite_select(gm: fx.GraphModule, site: AttentionSite, session: Session, record: SiteRecord) -> None:
    """``select``: where the graph alone writes the chunk into the cache and reads the window, without a roll or a
    staged copy (:func:`.compact.match_compact`), and autograd is off, the op makes the write itself, so that the
    buffers' version counters tell it when a layer's kept ranges can be reused
    (:class:`fkv_compile.modes.select.SelectionMemo`); elsewhere every call chooses its ranges."""
    accesses = None
    if site.k_window.pattern not in (CachePattern.CAT_GROWTH, CachePattern.WINDOW_INPUT) and not torch.is_grad_enabled():
        accesses = match_compact(site)
    if isinstance(accesses, CacheAccesses) and not accesses.rolls and accesses.staged is None:
        rewrite_select_cache(gm, site, accesses, session=session.id, site_id=record.site)
    else:
        rewrite_site(gm, site, mode=Mode.SELECT, session=session.id, site_id=record.site)


def _rewrite_compact(gm: fx.GraphModule, site: AttentionSite, session: Session, record: SiteRecord) -> None:
    """``compact``: the site's cache accesses go to the layer's store where the pass proves it may own them
    (:mod:`.compact`); elsewhere ``select``, with the reason in the report (``strict`` raises)."""
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
        if session.config.strict:
            raise SiteError(f"strict: attention {site.node.name} in graph {record.graph} not compact: {accesses}")
        _rewrite_select(gm, site, session, record)
        record.action, record.reason = SiteAction.SELECT, f"compact fell back to select: {accesses}"


def _rewrite_masked(gm: fx.GraphModule, site: AttentionSite, session: Session, record: SiteRecord) -> None:
    """``oracle`` and ``profile``: the attention node becomes the mode's op over the same operands."""
    rewrite_site(gm, site, mode=session.config.mode, session=session.id, site_id=record.site)


def _found(gm: fx.GraphModule, site: AttentionSite, session: Session, record: SiteRecord) -> None:
    """``off``: the site is found and reported, the graph left as traced."""
    record.action = SiteAction.FOUND


Rewrite = Callable[[fx.GraphModule, AttentionSite, Session, SiteRecord], None]
REWRITES: dict[Mode, Rewrite] = {
    Mode.OFF: _found,
    Mode.ORACLE: _rewrite_masked,
    Mode.SELECT: _rewrite_select,
    Mode.COMPACT: _rewrite_compact,
    Mode.PROFILE: _rewrite_masked,
}
"""What the pass does with a site, per mode: the one place the modes part ways at compile time."""


def _rewrite(gm: fx.GraphModule, site: AttentionSite, session: Session, graph_id: int) -> None:
    record = session.new_site(
        graph=graph_id,
        node=site.node.name,
        pattern=site.pattern + (" (+writes)" if site.writes_in_graph else ""),
        action=SiteAction.REWRITTEN,
        cache=site.k_window.source,
        layer_key=site.layer_key_kind,
        checks_order=site.k_window.pattern in (CachePattern.CACHE_WINDOW, CachePattern.WINDOW_INPUT)
        and not site.writes_in_graph,
    )
    REWRITES[session.config.mode](gm, site, session, record)
    log.info("graph %d: %s over %s: %s %s", graph_id, site.node.name, record.cache, record.action, record.reason)


def run_passes(gm: fx.GraphModule, session: Session, model: nn.Module | None = None) -> int:
    """Find the attention sites of ``gm``, record them in ``session``, and rewrite them per its mode. ``model``:
    the module being compiled (its patch embedding tells a plan-less model's geometry). In ``compact``, from the
    first staged site on, the write-backs of its caches become replay ops (:mod:`.replay`); returns the number
    of their tokens added to the graph's outputs (:func:`.replay.dropping_outputs` hides them again)."""
    graph_id = session.graphs
    session.graphs += 1
    count_compile(gm, session, graph_id)
    sites, declined = find_attention_sites(gm.graph)
    traced = traced_patch_geometry(gm)
    session.patch_geometry.extend(traced)
    if sites and session.config.mode.rewrites:
        if session.config.plan is None:
            start_calibration(session, session.patch_geometry, sites, model)
        else:
            adapt_bundled_plan(session, session.patch_geometry, sites, model)
    if session.config.plan is None and not sites:
        log.info("forcing_kv: no attention over a KV cache in graph %d: compiled with %s alone", graph_id,
                  session.config.lowering)
    for site in sites if session.plan is not None else ():
        check_plan_fits(site, session)
    _record_declined(declined, session, graph_id)
    for site in sites:
        _rewrite(gm, site, session, graph_id)
    replays = rewrite_replays(gm, session.id) if session.staged else 0
    if (sites and session.config.mode.rewrites) or replays:
        lint_and_recompile(gm)
    return replays

