"""Rewrite found attention sites into the project's custom ops, in place on the dynamo graph."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops import GROWN_OP, OPS, ROLL_OP, SELECT_CACHE_OP, STAGED_OP
from .sites import AttentionSite
from .compact import CacheAccesses, GrownAccesses

__all__ = ["with_example", "erase_dead_chain", "rewrite_site", "rewrite_compact", "rewrite_select_cache", "rewrite_grown", "lint_and_recompile"]


def _example(node: fx.Node) -> object:
    return node.meta.get("example_value", node.meta.get("val"))


def with_example(node: fx.Node, source: fx.Node, compute: Callable[[Any], Any]) -> fx.Node:
    """``node`` with ``meta["example_value"] = compute(<source's example>)``, computed in that example's fake mode
    (the graph's own, not the backend context's), so later passes and Inductor see the right shape and strides."""
    example = _example(source)
    fake_mode = getattr(example, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            node.meta["example_value"] = compute(example)
    return node


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, *, mode: str, session: int, site_id: int) -> fx.Node:
    """Replace ``site.node`` by ``fkv::<mode>_attention(q, k, v, layer_key, session, site_id, scale)``.

    The new node gets an ``example_value`` from the op's fake implementation, so later passes and
    Inductor see the right shape and strides; nothing else in the graph changes.
    """
    op = OPS[mode]
    q, k, v = _heads_major(gm, site, (site.q, site.k, site.v))
    args = (q, k, v, site.layer_key, session, site_id, site.scale)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_function(op, args=args)
    # the fake impl never reads layer_key; k stands in (a parameter's example may live in another fake mode)
    with_example(new, q, lambda qx: op(qx, _example(k), _example(v), _example(k), session, site_id, site.scale))
    _replace_site(gm, site, new)
    counters["fkv_compile"][f"{mode}_attention"] += 1
    return new


def _heads_major(gm: fx.GraphModule, site: AttentionSite, nodes: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
    """The ops take ``[B, H, L, D]``: transposed views of a ``[B, L, H, D]`` site's (flash-attn varlen) inputs."""
    if site.layout != "blhd":
        return nodes
    return tuple(_method(gm, site.node, "transpose", (x, 1, 2)) for x in nodes)


def _replace_site(gm: fx.GraphModule, site: AttentionSite, new: fx.Node) -> None:
    """Route the users of ``site.node`` to ``new`` (an op's ``[B, H, Lq, D]`` output) in the site's layout
    and dtype, then erase the attention and its now unused internal nodes."""
    result = new
    if site.layout == "blhd":  # back to the packed [B * L, H, D] the varlen call returned
        result = _method(gm, site.node, "flatten", (_method(gm, site.node, "transpose", (new, 1, 2)), 0, 1))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in site.node.meta:
            new.meta[key] = site.node.meta[key]
    result = _cast_like(gm, result, site.node)
    site.node.replace_all_uses_with(result)
    gm.graph.erase_node(site.node)
    for node in site.internal[1:]:  # a hand-written attention's scores and softmax, varlen's call; users first
        if not node.users:
            gm.graph.erase_node(node)


def _method(gm: fx.GraphModule, before: fx.Node, name: str, args: tuple) -> fx.Node:
    """``args[0].<name>(*args[1:])`` inserted before ``before``, with its example value."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_method(name, args=args)
    return with_example(node, args[0], lambda x: getattr(x, name)(*args[1:]))


def _cast_like(gm: fx.GraphModule, new: fx.Node, old: fx.Node) -> fx.Node:
    """``new`` cast to ``old``'s dtype where they differ (a hand-written attention may end in another
    dtype than q's, which the ops return)."""
    before, after = _example(old), new.meta.get("example_value")
    if before is None or after is None or before.dtype == after.dtype:
        return new
    with gm.graph.inserting_after(new):
        cast = gm.graph.call_method("to", args=(new, before.dtype))
    return with_example(cast, new, lambda x: x.to(before.dtype))


def erase_dead_chain(gm: fx.GraphModule, node: object) -> None:
    """Erase ``node`` and then its inputs while they have no users (never placeholders)."""
    while isinstance(node, fx.Node) and not node.users and node.op != "placeholder":
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        node = inputs[0] if len(inputs) == 1 else None


def rewrite_compact(gm: fx.GraphModule, site: AttentionSite, acc: CacheAccesses, *, session: int, site_id: int) -> None:
    """Replace the site's rolls, write and attention by ``fkv::store_roll`` and ``fkv::store_attention`` (a staged
    cache: all of them, on the clones, by one ``fkv::staged_store_attention``, and the clones go)."""
    if acc.staged is None:
        tokens = _rewrite_rolls(gm, site, acc, session, site_id)
        _rewrite_write_and_attention(gm, site, acc, OPS["compact"], (tokens,), session, site_id)
    else:
        rolls = [bound for roll in acc.rolls for bound in (roll.dst, roll.src, roll.src_end)]
        for roll in acc.rolls:
            for setitem in roll.setitems:
                source = setitem.args[2]
                gm.graph.erase_node(setitem)
                erase_dead_chain(gm, source)
        _rewrite_write_and_attention(gm, site, acc, STAGED_OP, (rolls,), session, site_id)
        for clone in acc.staged:
            for user in list(clone.users):  # the window reads, dead now
                if not user.users:
                    gm.graph.erase_node(user)
            erase_dead_chain(gm, clone)
    counters["fkv_compile"]["compact_attention"] += 1


def rewrite_select_cache(gm: fx.GraphModule, site: AttentionSite, acc: CacheAccesses, *, session: int,
                         site_id: int) -> None:
    """Replace the site's write and attention (no rolls) by ``fkv::select_cache_attention``, which makes the write."""
    if acc.rolls:
        raise ValueError("select_cache_attention takes a site whose graph does not roll its cache")
    _rewrite_write_and_attention(gm, site, acc, SELECT_CACHE_OP, (), session, site_id)
    counters["fkv_compile"]["select_attention"] += 1


def _rewrite_rolls(gm: fx.GraphModule, site: AttentionSite, acc: CacheAccesses, session: int,
                   site_id: int) -> list[fx.Node]:
    """Each roll pair becomes a ``fkv::store_roll``; returns their tokens (the attention op takes them)."""
    k_cache, v_cache = site.k_window.cache, site.v_window.cache
    tokens = []
    for roll in acc.rolls:
        with gm.graph.inserting_before(roll.setitems[0]):
            token = gm.graph.call_function(ROLL_OP, args=(site.layer_key, k_cache, v_cache, roll.dst, roll.src, roll.src_end,
                                                          session, site_id))
        tokens.append(with_example(token, site.layer_key, lambda key: key.new_empty(0)))
        for setitem in roll.setitems:
            source = setitem.args[2]
            gm.graph.erase_node(setitem)
            erase_dead_chain(gm, source)
    return tokens


def _rewrite_write_and_attention(gm: fx.GraphModule, site: AttentionSite, acc: CacheAccesses, op: Any,
                                 ordering: tuple, session: int, site_id: int) -> None:
    """Replace the site's cache write and attention by ``op(q, k_new, v_new, k_cache, v_cache, layer_key,
    *ordering, write start, write end, window start, window end, protected, session, site, scale)``."""
    (q,) = _heads_major(gm, site, (site.q,))
    args = (q, acc.k_new, acc.v_new, site.k_window.cache, site.v_window.cache, site.layer_key, *ordering, acc.start,
            acc.end, *acc.window, acc.protected, session, site_id, site.scale)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_function(op, args=args)
    with_example(new, q, lambda qx: qx.new_empty((*qx.shape[:-1], _example(acc.v_new).shape[-1])))
    old_k, old_v = site.k, site.v
    _replace_site(gm, site, new)
    for read in (old_k, old_v):
        erase_dead_chain(gm, read)
    for setitem in acc.writes:
        gm.graph.erase_node(setitem)


def rewrite_grown(gm: fx.GraphModule, site: AttentionSite, acc: GrownAccesses, *, session: int, site_id: int) -> None:
    """Replace a grown cache's concatenations and the attention by ``fkv::store_grown_attention``, whose released
    grown K and V take the concatenations' place among the graph's outputs."""
    k_cache, v_cache = site.k_window.cache, site.v_window.cache
    (q,) = _heads_major(gm, site, (site.q,))
    start = acc.start
    with gm.graph.inserting_before(site.node):
        if start is None:  # the whole cache input is the history
            start = _method(gm, site.node, "size", (k_cache, 1))
        new = gm.graph.call_function(GROWN_OP, args=(q, acc.k_new, acc.v_new, k_cache, v_cache, site.layer_key, start,
                                                     session, site_id, site.scale))
    with_example(new, q, lambda qx: GROWN_OP(qx, _example(acc.k_new), _example(acc.v_new), _example(k_cache),
                                              _example(v_cache), _example(acc.k_new), _example_or_value(start),
                                              session, site_id, site.scale))
    out, k_grown, v_grown = (_item(gm, new, i) for i in range(3))
    old_k, old_v = site.k, site.v
    _replace_site(gm, site, out)
    for read in (old_k, old_v):
        erase_dead_chain(gm, read)
    for cat, grown, history in zip(acc.cats, (k_grown, v_grown), acc.histories):
        cat.replace_all_uses_with(grown)
        gm.graph.erase_node(cat)
        erase_dead_chain(gm, history)
    counters["fkv_compile"]["compact_attention"] += 1


def _item(gm: fx.GraphModule, node: fx.Node, index: int) -> fx.Node:
    """``node[index]`` inserted after ``node``, with its example value."""
    with gm.graph.inserting_after(node):
        item = gm.graph.call_function(operator.getitem, args=(node, index))
    return with_example(item, node, lambda x: x[index])


def _example_or_value(value: object) -> object:
    return _example(value) if isinstance(value, fx.Node) else value


def lint_and_recompile(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()

