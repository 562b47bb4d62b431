"""The call level of ``fkv bench``: one attention call of a full window's last chunk, dense vs ``select`` vs
``compact``, beside SDPA over the kept tokens gathered beforehand (the practical limit) and FlexAttention (the peer)."""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from .settings import BenchSettings
from .timing import interleaved_times, paired_ratio

__all__ = ["call_level", "pregathered", "flex_call"]


def call_level(s: BenchSettings) -> list[dict[str, Any]]:
    """One attention call of the last chunk of a full window: dense vs select vs compact, side by side."""
    from ...modes.dispatch import kernels_for
    from ...modes.select import SelectionMemo, compressed_attention
    from ...modes.store import LayerStore
    from ...semantics import keep_mask

    cfg, device, dtype = s.config(), torch.device(s.device), getattr(torch, s.dtype)
    plan = s.head_plan(cfg)
    f, c, frames = cfg.frame_tokens, cfg.chunk_frames, cfg.cache_frames
    gen = torch.Generator().manual_seed(0)
    k_all, v_all = (torch.randn(1, frames * f, cfg.num_heads, cfg.head_dim, generator=gen).to(device, dtype)
                    for _ in range(2))
    q = torch.randn(1, c * f, cfg.num_heads, cfg.head_dim, generator=gen).to(device, dtype).transpose(1, 2)
    k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
    kernels = kernels_for("auto", device.type)
    rows = []
    for layer in range(min(plan.num_layers, 2)):
        store = LayerStore(plan, layer, kernels)
        for start in range(0, frames * f, c * f):
            end = start + c * f
            store.write(k_all[:, start:end], v_all[:, start:end], start, end, (0, end))
        kept = compressed_attention(q, k, v, plan, layer, kernels=kernels)[1]
        keep = keep_mask(k, plan, layer, q.shape[2])
        groups = pregathered(q, k, v, keep)
        memo = SelectionMemo()  # the same history at every call: a chunk's later calls
        calls = {"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                 "select": lambda: compressed_attention(q, k, v, plan, layer, kernels=kernels),
                 "select_reused": lambda: compressed_attention(q, k, v, plan, layer, kernels=kernels, memo=memo,
                                                               history=(0, 0)),
                 "compact": lambda: store.attention(q, (0, frames * f), None),
                 "pregathered": lambda: [F.scaled_dot_product_attention(*g) for g in groups],
                 "flex": flex_call(q, k, v, keep)}
        times = interleaved_times(calls, repeats=max(3, s.repeats), warmup=2, device=device)
        row = {"layer": layer, "kept_ratio": float(kept.kept.mean()) / kept.window, "kernels": kernels.name}
        for name in calls:
            row[f"{name}_ms"] = 1e3 * statistics.median(times[name])
            if name != "dense":
                row[f"{name}_ratio"] = paired_ratio(times, name, "dense")
        for name in ("select", "select_reused", "compact"):  # the goals: >= 92% (select), >= 97% (compact)
            row[f"{name}_share_of_limit"] = paired_ratio(times, "pregathered", name)
        rows.append(row)
    return rows


def pregathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """q, K and V of each group of heads with equal kept counts, the kept tokens gathered (batch 1)."""
    counts = keep[0].sum(-1)
    groups = []
    for count in counts.unique().tolist():
        heads = (counts == count).nonzero().flatten()
        index = torch.stack([keep[0, h].nonzero().flatten() for h in heads.tolist()])  # [G, count]
        gathered = [torch.gather(x[:, heads], 2, index[None, ..., None].expand(-1, -1, -1, x.shape[-1])).contiguous()
                    for x in (k, v)]
        groups.append((q[:, heads].contiguous(), *gathered))
    return groups


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor):
    """FlexAttention, compiled, over the kept set as a block mask (blocks with no kept token are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def kept(b, h, q_idx, kv_idx):
        return keep[b, h, kv_idx]

    mask = create_block_mask(kept, keep.shape[0], keep.shape[1], q.shape[2], k.shape[2], device=str(q.device))
    compiled = torch.compile(flex_attention, dynamic=False)
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    return lambda: compiled(qc, kc, vc, block_mask=mask)

