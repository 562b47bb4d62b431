"""Backward of the attention ops: the gradient of attention over the kept tokens (or all, for ``profile``).

The kept set is a constant of the backward, as a top-k's indices are: what ``select`` keeps equals the
keep rule's mask (:func:`fkv_compile.semantics.keep_mask`), so the gradients are those of the masked
dense oracle, for q and for the K/V window the forward read. Computed densely (one ``[Lq, Lk]`` score
matrix per head): training steps in these pipelines differentiate one chunk, whose window is short.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_grads"]


def attention_grads(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``sdpa(q, k, v)`` restricted to ``mask`` ``[B, H, Lk]`` (None: every token).

    Written out (the ops' bodies run below autograd): with ``P = softmax(scale q k^T)``, ``dv = P^T dO``,
    ``dS = P * (dO v^T - rowsum(dO * out))``, ``dq = scale dS k``, ``dk = scale dS^T q``; in float32 at least.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32, g32 = (x.to(compute) for x in (q, k, v, grad_out))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * q32 @ k32.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = p @ v32
    ds = p * (g32 @ v32.transpose(-1, -2) - (g32 * out).sum(-1, keepdim=True))
    dq, dk, dv = scale * ds @ k32, scale * ds.transpose(-1, -2) @ q32, p.transpose(-1, -2) @ g32
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
