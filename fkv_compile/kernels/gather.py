"""The commit of the compact store as a kernel: copy chosen tokens (recent frames, selected segments)
of a head group's K and V into the store's new buffers, per batch item.

``dst[b, g, t] = src[b, g, index[b, t]]`` for K and V in one pass: one program per (token block,
batch item, head), D in one vector. Padding slots (``index < 0``) are written as zeros.

Shape legend: ``B`` batch, ``G`` heads, ``Ls`` source tokens, ``T`` gathered tokens, ``D`` head dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .tuning import TunedKernel

__all__ = ["gather_tokens", "GATHER"]


@triton.jit
def _gather_tokens_kernel(
    SRC_K, SRC_V, DST_K, DST_V, INDEX,
    T, G,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_ib,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = t < T
    idx = tl.load(INDEX + b * s_ib + t, mask=t_ok, other=-1)
    src_ok = (idx >= 0)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst_ok = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = idx[:, None] * s_kl + offs_d[None, :] * s_kd
    kx = tl.load(SRC_K + b * s_kb + g * s_kh + src, mask=src_ok, other=0.0)
    vx = tl.load(SRC_V + b * s_vb + g * s_vh + idx[:, None] * s_vl + offs_d[None, :] * s_vd, mask=src_ok, other=0.0)
    dst = ((b * G + g) * T + t[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DST_K + dst, kx, mask=dst_ok)
    tl.store(DST_V + dst, vx, mask=dst_ok)


CUDA_CONFIGS = [triton.Config({"BLOCK_T": t}, num_warps=w, num_stages=1) for t in (64, 32, 128, 256) for w in (4, 2, 8)]
"""The autotune list on a GPU, the default first (cut per architecture to what can win: ``tuning.fitting``)."""


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=1)]
    return CUDA_CONFIGS


GATHER = TunedKernel("gather_tokens", _gather_tokens_kernel, _configs(), key=["HEAD_DIM"])


def gather_tokens(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k[b, :, index[b]]`` and the same of ``v``, contiguous ``[B, G, T, D]``; ``index`` ``[B, T]``
    (int, ``-1`` for padding slots, which come out as zeros). k, v ``[B, G, Ls, D]``, any strides."""
    b, g, length, d = k.shape
    if v.shape != k.shape or index.dim() != 2 or index.shape[0] != b:
        raise ValueError(f"gather_tokens: k {tuple(k.shape)}, v {tuple(v.shape)}, index {tuple(index.shape)} do not agree")
    if index.numel() and int(index.max()) >= length:
        raise IndexError(f"gather_tokens: index {int(index.max())} out of range for {length} tokens")
    index = index.to(device=k.device, dtype=torch.int32).contiguous()
    t = index.shape[1]
    dst_k = k.new_empty((b, g, t, d))
    dst_v = v.new_empty((b, g, t, d))
    if t == 0:
        return dst_k, dst_v
    GATHER.launch(
        lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), b * g), k.device,
        k, v, dst_k, dst_v, index, t, g, *k.stride(), *v.stride(), index.stride(0),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
    )
    return dst_k, dst_v
