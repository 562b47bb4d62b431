"""Segment similarity of the dynamic heads' candidate frames (the keep rule's score), as a kernel.

Similarity of a segment = mean over its tokens of the cosine between the token's key and the key
of the same token one frame later, the key being the concatenation of a selection group's heads
(one group of all dynamic heads for ``selection="layer"``, one group per head for ``"head"``).
One program per (segment, batch item, group) streams the segment's tokens in blocks and the
group's heads one by one, accumulating dot products and squared norms in fp32. The segments'
bounds come from :func:`fkv_compile.semantics.segment_table` (the keep rule's own).

Shape legend: ``B`` batch, ``H`` heads of the keys, ``L`` tokens, ``D`` head dim, ``F`` frame tokens,
``P`` segments per frame, ``G`` groups of ``Hg`` heads each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..semantics import COSINE_EPS, check_candidate_region, segment_table
from . import interpreting
from .tuning import TunedKernel

__all__ = ["segment_similarity", "SIMILARITY"]


@triton.jit
def _segment_similarity_kernel(
    K, SIM, HEADS, SEG_START, SEG_END,
    first_token, F, S, G, HG,
    s_kb, s_kh, s_kl, s_kd,
    eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // G
    g = pid_bg % G
    seg_start = tl.load(SEG_START + seg)  # tokens after first_token, frame-major
    seg_end = tl.load(SEG_END + seg)
    here_base = K + b * s_kb + first_token * s_kl
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(seg_start, seg_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < seg_end
        ok = t_ok[:, None] & d_ok[None, :]
        dot = tl.zeros([BLOCK_T], tl.float32)
        sq_here = tl.zeros([BLOCK_T], tl.float32)
        sq_next = tl.zeros([BLOCK_T], tl.float32)
        for i in range(0, HG):
            h = tl.load(HEADS + g * HG + i)
            ptrs = here_base + h * s_kh + t[:, None] * s_kl + offs_d[None, :] * s_kd
            a = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
            c = tl.load(ptrs + F * s_kl, mask=ok, other=0.0).to(tl.float32)
            dot += tl.sum(a * c, 1)
            sq_here += tl.sum(a * a, 1)
            sq_next += tl.sum(c * c, 1)
        cos = dot / (tl.maximum(tl.sqrt(sq_here), eps) * tl.maximum(tl.sqrt(sq_next), eps))
        total += tl.where(t_ok, cos, 0.0)
    tl.store(SIM + (b * G + g) * S + seg, tl.sum(total, 0) / (seg_end - seg_start))


CUDA_CONFIGS = [triton.Config({"BLOCK_T": t}, num_warps=w, num_stages=s)
                for t in (32, 64, 16, 128) for w in (4, 2, 8) for s in (2, 3)]
"""The autotune list on a GPU, the default first (cut per architecture to what can win: ``tuning.fitting``)."""


def _configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=1)]
    return CUDA_CONFIGS


SIMILARITY = TunedKernel("segment_similarity", _segment_similarity_kernel, _configs(), key=["HEAD_DIM", "HG"])


def segment_similarity(
    keys: torch.Tensor,
    groups: torch.Tensor,
    first_frame: int,
    num_candidates: int,
    frame_tokens: int,
    segments: int,
) -> torch.Tensor:
    """Similarity ``[B, G, num_candidates * P]`` (fp32, frame-major) of the candidate frames
    ``[first_frame, first_frame + num_candidates)`` of ``keys`` ``[B, H, L, D]`` (any strides), each
    against the next frame; ``groups`` ``[G, Hg]``: the heads whose keys each selection concatenates.
    """
    b, _, length, d = keys.shape
    check_candidate_region(length, first_frame, num_candidates, frame_tokens, segments)
    groups = groups.to(device=keys.device, dtype=torch.int32).contiguous()
    g, hg = groups.shape
    count = num_candidates * segments
    sim = torch.empty((b, g, count), device=keys.device, dtype=torch.float32)
    if count == 0:
        return sim
    table = segment_table(frame_tokens, segments, num_candidates, keys.device)
    SIMILARITY.launch(
        lambda meta: (count, b * g), keys.device,
        keys, sim, groups, table.start.to(torch.int32), table.end.to(torch.int32),
        first_frame * frame_tokens, frame_tokens, count, g, hg,
        *keys.stride(), COSINE_EPS,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return sim
