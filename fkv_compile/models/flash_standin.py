"""A CPU stand-in for flash-attn's registered varlen op, under its namespace and signature.

Real pipelines call ``flash_attn_varlen_func`` when flash-attn is installed; since flash-attn
2.6 that lands in the graph as ``torch.ops.flash_attn._flash_attn_varlen_forward`` (a CUDA-only
custom op). Where flash-attn is not installed, :func:`register` defines an op with the same
qualified name and schema that runs on any device, so that the miniature and the tests can put
the very same graph node in front of the pass. With flash-attn installed it does nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["register", "varlen_attention"]

QUALNAME = "flash_attn::_flash_attn_varlen_forward"


def _exists() -> bool:
    try:
        torch.ops.flash_attn._flash_attn_varlen_forward  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def register() -> None:
    """Define the stand-in op unless an op of that name exists (flash-attn installed, or done before)."""
    if _exists():
        return

    @torch.library.custom_op(QUALNAME, mutates_args=())
    def _varlen_forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
        window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
        alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
        block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
        seqused_k: torch.Tensor | None = None, zero_tensors: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if dropout_p or window_size_left != -1 or window_size_right != -1 or softcap or alibi_slopes is not None:
            raise NotImplementedError("the flash-attn stand-in supports plain (optionally causal) attention only")
        out = torch.empty_like(q)
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            qs, ks, vs = (x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))
            out[q0:q1] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale).transpose(0, 1)
            scores = (qs.float() @ ks.float().transpose(-1, -2)) * softmax_scale
            lse[:, q0:q1] = torch.logsumexp(scores, dim=-1)
        return out, lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64, device=q.device)

    @_varlen_forward.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
          window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
          block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False):
        return (torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32), q.new_empty(0),
                q.new_empty(2, dtype=torch.int64))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of ``[B, L, H, D]`` tensors the way Wan-based pipelines call flash-attn: sequences packed
    with ``flatten(0, 1)``, int32 ``cu_seqlens`` built from Python ints. Call :func:`register` first,
    outside compiled code (the model does it when built)."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.tensor([i * lq for i in range(b + 1)], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([i * lk for i in range(b + 1)], dtype=torch.int32, device=q.device)
    out = torch.ops.flash_attn._flash_attn_varlen_forward(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, lq, lk, 0.0, q.shape[-1] ** -0.5, False
    )[0]
    return out.unflatten(0, (b, lq))
