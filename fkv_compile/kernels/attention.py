"""Attention of each head over its own list of key-token ranges: one kernel for ``select`` and ``compact``.

Per (batch, head, query block) the program walks the head's ranges ``[start, end)`` of K/V in
blocks with an online softmax (fp32 accumulation), so the cost is the kept tokens, whatever the
window length. ``select`` passes ranges into the dense window (sink, selected segments,
recent + current chunk); ``compact`` passes the ranges a head group's store holds. Tensors are
read through their strides: the models' ``[B, L, H, D]`` buffers seen as ``[B, H, L, D]`` are
never copied. ``q_heads`` maps the kernel's heads to the heads of ``q`` and the output, so one
head group of a store runs without gathering its queries.

Shape legend: ``B`` batch, ``H`` heads of q/out, ``G`` heads of k/v (``H`` unless ``q_heads``),
``Lq``/``Lk`` tokens, ``D`` head dim, ``R`` ranges per head (shorter lists padded with empty ranges).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreting
from .tuning import TunedKernel

__all__ = ["range_attention", "ATTENTION"]


@triton.jit
def _range_attention_kernel(
    Q, K, V, O, LSE, STARTS, ENDS, Q_HEADS,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    Lq, H, G, R,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ob, s_oh, s_ol, s_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, MAP_HEADS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    h = tl.load(Q_HEADS + g) if MAP_HEADS else g

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * s_kb + g * s_kh
    v_base = V + b * s_vb + g * s_vh
    range_base = (b * G + g) * R
    for r in range(0, R):
        start = tl.load(STARTS + range_base + r)
        end = tl.load(ENDS + range_base + r)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + offs_n
            n_ok = cols < end
            kt = tl.load(k_base + cols[None, :] * s_kl + offs_d[:, None] * s_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vb = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :] * s_vd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                vb = vb.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
            m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    m_ok = offs_m < Lq
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:  # natural-log log-sum-exp of the scaled scores, [B, H, Lq] contiguous
        lse = tl.where(l_i > 0, (m_i + tl.log2(safe_l)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=m_ok)


CUDA_CONFIGS = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)] + [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
    if (m, n, w, s) != (128, 64, 8, 3)
]
"""The autotune list on a GPU, the default first (cut per architecture to what can win: ``tuning.fitting``)."""


def _configs() -> list[triton.Config]:
    """Interpreter: one large block (its cost is programs x iterations). CUDA: :data:`CUDA_CONFIGS`."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return CUDA_CONFIGS


ATTENTION = TunedKernel("range_attention", _range_attention_kernel, _configs(), key=["HEAD_DIM", "Lq", "PRECISION"])


def _check_ranges(starts: torch.Tensor, ends: torch.Tensor, b: int, g: int) -> None:
    if starts.shape != ends.shape or starts.dim() != 3 or tuple(starts.shape[:2]) != (b, g):
        raise ValueError(f"ranges expected starts and ends of shape [B={b}, G={g}, R], got {tuple(starts.shape)} "
                         f"and {tuple(ends.shape)}")


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: float | None = None,
    q_heads: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every head of ``k``/``v`` over the key tokens of its ranges.

    q ``[B, H, Lq, D]``; k, v ``[B, G, Lk, D]`` (any strides); starts, ends ``[B, G, R]`` token
    ranges ``[start, end)`` into ``k``'s ``Lk`` (empty ranges pad shorter lists; ranges must not
    overlap, or their tokens count twice). ``q_heads`` ``[G]``: the head of ``q`` and of the
    output each kernel head serves (default: head ``g`` is head ``g``, ``G == H``). Writes into
    ``out`` ``[B, H, Lq, D]`` when given (other heads untouched). Returns the output, and with
    ``return_lse`` the natural-log log-sum-exp ``[B, H, Lq]`` (fp32, ``-inf`` for heads with no tokens).
    """
    b, num_heads, lq, d = q.shape
    g = k.shape[1]
    if k.shape[0] != b or v.shape != k.shape or k.shape[3] != d:
        raise ValueError(f"range_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree")
    if q_heads is None and g != num_heads:
        raise ValueError(f"range_attention: k has {g} heads, q {num_heads}; pass q_heads to map them")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"range_attention: expected float32, float16 or bfloat16 q, k, v of one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    _check_ranges(starts, ends, b, g)
    starts = starts.to(device=q.device, dtype=torch.int32).contiguous()
    ends = ends.to(device=q.device, dtype=torch.int32).contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, num_heads, lq), device=q.device, dtype=torch.float32) if return_lse else out
    heads = q_heads.to(device=q.device, dtype=torch.int32).contiguous() if q_heads is not None else starts
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    upcast = interpreting() or q.dtype == torch.float32
    # fp32 stays fp32 (TF32 would miss the oracle's budget); fp16/bf16 feed the tensor cores natively
    precision = "ieee" if upcast else "tf32"

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * g)

    ATTENTION.launch(
        grid, q.device,
        q, k, v, out, lse, starts, ends, heads,
        scale * 1.4426950408889634,
        lq, num_heads, g, starts.shape[2],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        UPCAST=upcast, PRECISION=precision, MAP_HEADS=q_heads is not None, STORE_LSE=return_lse,
    )
    return (out, lse) if return_lse else out
