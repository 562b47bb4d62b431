"""Find attention calls over windows of a KV cache in a dynamo FX graph, structurally (never by names).

A site is an attention call (``F.scaled_dot_product_attention``, a hand-written ``softmax(q @ k^T * s) @ v``,
:mod:`.manual_attention`, or flash-attn's varlen op, :mod:`.varlen_attention`) whose keys and values trace back to
windows of two KV cache inputs (:mod:`.windows`; the patterns and the site types: :mod:`.sites`). Every other
attention call is declined with its reason, which the report lists.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import nearest_param, writes_into
from .manual_attention import ManualAttention, match_manual_attention
from .sites import AttentionSite, CachePattern, CacheWindow, Declined
from .varlen_attention import VarlenAttention, arguments, is_flatten, match_varlen_attention
from .windows import operand_windows, trace_window

__all__ = ["find_attention_sites", "is_attention"]

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _match_sdpa(node: fx.Node) -> tuple[AttentionSite | None, Declined | None]:
    args = list(node.args) + [None] * (6 - len(node.args))
    q, k, v = args[:3]
    kw = dict(node.kwargs)
    windows = operand_windows(node, k, v)
    if isinstance(windows, Declined):
        return None, windows
    mask = kw.get("attn_mask", args[3])
    dropout = kw.get("dropout_p", args[4] if args[4] is not None else 0.0)
    causal = kw.get("is_causal", args[5] if args[5] is not None else False)
    if mask is not None:
        return None, Declined(node, "attention has an explicit attn_mask", candidate=True)
    if dropout != 0.0:
        return None, Declined(node, f"attention has dropout_p={dropout}", candidate=True)
    if causal:
        return None, Declined(node, "attention is causal (is_causal=True)", candidate=True)
    if kw.get("enable_gqa", False):
        return None, Declined(node, "NYI: grouped-query attention (enable_gqa=True)", candidate=True)
    return _site(node, q, k, v, kw.get("scale"), windows, "sdpa", ())


def _match_manual(manual: ManualAttention) -> tuple[AttentionSite | None, Declined | None]:
    windows = operand_windows(manual.out, manual.k, manual.v)
    if isinstance(windows, Declined):
        return None, windows
    return _site(manual.out, manual.q, manual.k, manual.v, manual.scale, windows, "matmul-softmax", manual.internal)


def _match_varlen(varlen: VarlenAttention) -> tuple[AttentionSite | None, Declined | None]:
    windows = operand_windows(varlen.out, varlen.k, varlen.v)
    if isinstance(windows, Declined):
        return None, windows
    return _site(varlen.out, varlen.q, varlen.k, varlen.v, varlen.scale, windows, "flash-attn-varlen",
                 varlen.internal, layout="blhd")


def _site(node: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, scale: float | None, windows: list[CacheWindow],
          function: str, internal: tuple[fx.Node, ...], layout: str = "bhld",
          ) -> tuple[AttentionSite | None, Declined | None]:
    qv, kv_ = q.meta.get("example_value"), k.meta.get("example_value")
    if qv is None or kv_ is None or qv.dim() != 4 or kv_.dim() != 4:
        return None, Declined(node, "attention operands are not 4-d [B, H, L, D]", candidate=True)
    heads = 1 if layout == "bhld" else 2
    if qv.shape[heads] != kv_.shape[heads]:
        return None, Declined(node, "NYI: query and key head counts differ", candidate=True)
    k_window, v_window = windows
    if k_window.cache is v_window.cache:
        return None, Declined(node, "keys and values are read from the same input", candidate=True)
    param = nearest_param(node)
    return (
        AttentionSite(
            node=node, q=q, k=k, v=v, scale=scale,
            k_window=k_window, v_window=v_window,
            layer_key=param if param is not None else k_window.cache,
            layer_key_kind="param" if param is not None else "cache",
            writes_in_graph=writes_into(k_window.cache),
            function=function, internal=internal, layout=layout,
        ),
        None,
    )


def find_attention_sites(graph: fx.Graph) -> tuple[list[AttentionSite], list[Declined]]:
    """Every attention call of ``graph``: rewritable sites, and declined calls with their reasons."""
    sites, declined = [], []
    for node in graph.nodes:
        if is_attention(node):
            site, no = _match_sdpa(node)
        elif (manual := match_manual_attention(node)) is not None:
            site, no = _match_manual(manual)
        elif (varlen := match_varlen_attention(node)) is not None:
            if isinstance(varlen, str):
                k_arg = arguments(node)["k"]
                reads_cache = isinstance(trace_window(k_arg.args[0] if is_flatten(k_arg) else k_arg), CacheWindow)
                site, no = None, Declined(node, varlen, candidate=reads_cache)
            else:
                site, no = _match_varlen(varlen)
        else:
            continue
        if site is not None:
            sites.append(site)
        else:
            declined.append(no)
    keys = [s.layer_key for s in sites]
    if len(set(keys)) != len(keys):
        # one parameter shared by several sites cannot tell their layers apart: use the caches,
        # except grown ones (a new tensor every call)
        declined += [Declined(s.node, "a cat-grown cache needs a per-layer parameter to identify its layer, and "
                              "the nearest one is shared", candidate=True)
                     for s in sites if s.k_window.pattern is CachePattern.CAT_GROWTH]
        sites = [
            AttentionSite(**{**s.__dict__, "layer_key": s.k_window.cache, "layer_key_kind": "cache"})
            for s in sites if s.k_window.pattern is not CachePattern.CAT_GROWTH
        ]
    return sites, declined
