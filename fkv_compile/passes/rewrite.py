"""Rewrite found attention sites into the project's custom ops, in place on the dynamo graph."""

from __future__ import annotations

import torch.fx as fx
from torch._dynamo.utils import counters

from ..ops import OPS
from .attention import AttentionSite

__all__ = ["rewrite_site", "lint_and_recompile"]


def _example(node: fx.Node) -> object:
    return node.meta.get("example_value", node.meta.get("val"))


def rewrite_site(gm: fx.GraphModule, site: AttentionSite, *, mode: str, session: int, site_id: int) -> fx.Node:
    """Replace ``site.node`` by ``fkv::<mode>_attention(q, k, v, layer_key, session, site_id, scale)``.

    The new node gets an ``example_value`` from the op's fake implementation, so later passes and
    Inductor see the right shape and strides; nothing else in the graph changes.
    """
    op = OPS[mode]
    args = (site.q, site.k, site.v, site.layer_key, session, site_id, site.scale)
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_function(op, args=args)
    # the fake impl never reads layer_key; k stands in (a parameter's example may live in another fake mode)
    examples = [_example(n) for n in (site.q, site.k, site.v, site.k)]
    fake_mode = getattr(examples[0], "fake_mode", None)  # the graph's own mode, not the backend context's
    if fake_mode is not None:
        with fake_mode:
            new.meta["example_value"] = op(*examples, session, site_id, site.scale)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in site.node.meta:
            new.meta[key] = site.node.meta[key]
    site.node.replace_all_uses_with(new)
    gm.graph.erase_node(site.node)
    counters["fkv_compile"][f"{mode}_attention"] += 1
    return new


def lint_and_recompile(gm: fx.GraphModule) -> None:
    gm.graph.lint()
    gm.recompile()

