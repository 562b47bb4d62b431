"""Custom ops the pass rewrites attention into: ``fkv::{select,oracle,profile}_attention``.

Torch-only, fixed-arity schemas, each fake beside its op. Both take the SDPA operands in
``[B, H, L, D]``, a per-layer key tensor and the (session, site) ids baked into the graph; the layer
is resolved at run time (see :mod:`fkv_compile.runtime`). Outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runtime, semantics
from .profile import record_call
from .select import compressed_attention

__all__ = ["select_attention", "oracle_attention", "profile_attention"]


def _fake_attention(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("fkv::select_attention", mutates_args=())
def select_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_key: torch.Tensor,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Each head attends only to the tokens its role keeps in the dense window ``k``/``v``."""
    s = runtime.session(session)
    layer = s.layer_of(site, layer_key)
    out, kept = compressed_attention(q, k, v, s.plan, layer, scale)
    s.record(site, layer, kept.kept, kept.window, kept.layout_fits)
    return out.contiguous()


@select_attention.register_fake
def _(q, k, v, layer_key, session, site, scale=None):
    return _fake_attention(q, v)


@torch.library.custom_op("fkv::oracle_attention", mutates_args=())
def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_key: torch.Tensor,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention masked by the keep rule (:func:`fkv_compile.semantics.oracle_attention`)."""
    s = runtime.session(session)
    layer = s.layer_of(site, layer_key)
    mask = semantics.keep_mask(k, s.plan, layer, q.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=scale)
    fits = semantics.window_layout(q.shape[-2], k.shape[-2], s.plan.frame_tokens, s.plan.chunk_frames) is not None
    kept = tuple(mask.sum(-1).float().mean(0).tolist())
    s.record(site, layer, kept, k.shape[-2], fits)
    return out.contiguous()


@oracle_attention.register_fake
def _(q, k, v, layer_key, session, site, scale=None):
    return _fake_attention(q, v)


@torch.library.custom_op("fkv::profile_attention", mutates_args=())
def profile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_key: torch.Tensor,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention, unchanged, plus the frame-level attention mass recorded for profiling."""
    s = runtime.session(session)
    layer = s.layer_of(site, layer_key)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    record_call(s, layer, q, k, scale)
    s.record(site, layer, (float(k.shape[-2]),) * q.shape[1], k.shape[-2], True)
    return out.contiguous()


@profile_attention.register_fake
def _(q, k, v, layer_key, session, site, scale=None):
    return _fake_attention(q, v)


OPS = {
    "select": torch.ops.fkv.select_attention.default,
    "oracle": torch.ops.fkv.oracle_attention.default,
    "profile": torch.ops.fkv.profile_attention.default,
}
