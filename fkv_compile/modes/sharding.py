"""Head parallelism (Ulysses sequence parallelism): this process attends for a slice of one global plan's heads.

Under Ulysses an all-to-all turns the sequence split into a head split before attention, so a rank's
attention sees ``num_heads / N`` of the model's heads over the whole sequence, and keeps a KV cache of
only those. Every rank is given the same global plan; :func:`make_shard` finds this rank's heads (its
contiguous slice by rank in the process group, or the option ``head_range``) and checks, with one
gather over the group, that the ranks' slices cover the plan's heads exactly once.

Per-head rules (sink, recent, per-head selection, baselines) are local. A layer-level selection (one
choice over the concatenated keys of a layer's dynamic heads) spans ranks: the cosine of two
concatenated keys is ``sum(dots) / (sqrt(sum(squares)) sqrt(sum(squares')))`` over the heads, so each
rank sums its heads' share (:func:`~fkv_compile.modes.torch_ops.similarity_partials`), one all-reduce
per layer and call adds the shares, and every rank picks the segments the single device picks. Every
rank of the group takes part in that all-reduce for every layer whose global plan has dynamic heads,
also a rank that holds none of them (it adds zeros): a rank that skipped it would hang the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import Config
from ..plan import DYNAMIC, HeadPlan, PlanError
from ..semantics import check_candidate_region
from .torch_ops import similarity_from_partials, similarity_partials

__all__ = ["HeadShard", "ReduceStats", "make_shard", "default_group"]


@dataclass
class ReduceStats:
    """The selection all-reduces this rank took part in (for the report)."""

    calls: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class HeadShard:
    """This rank's heads ``heads`` of the global ``plan``, and the process group the ranks share."""

    plan: HeadPlan
    heads: range
    group: dist.ProcessGroup
    rank: int
    all_heads: tuple[range, ...]  # every rank's slice, by rank in the group
    stats: ReduceStats = field(default_factory=ReduceStats, compare=False)

    @property
    def world_size(self) -> int:
        return len(self.all_heads)

    @property
    def local(self) -> HeadPlan:
        """The plan of this rank's heads (what its attention sees)."""
        return self.plan.head_slice(self.heads)

    def spans(self, layer: int) -> bool:
        """Whether ``layer``'s segment choice needs every rank: a layer-level similarity selection over dynamic
        heads (the same answer on every rank: it reads the global plan only)."""
        p = self.plan
        return p.selection == "layer" and p.segment_choice == "similarity" and bool(p.heads(layer, DYNAMIC))

    def layer_similarity(self, keys: torch.Tensor, heads: tuple[int, ...], first_frame: int, num_candidates: int,
                         frame_tokens: int, segments: int) -> torch.Tensor:
        """The layer-level similarity ``[B, 1, nc * P]`` over the dynamic heads of every rank, given this rank's
        keys ``[B, h, L, D]`` and its dynamic heads ``heads`` among them (none: only the batch size and device of
        ``keys`` are read, and this rank adds zeros)."""
        b, f, nc = keys.shape[0], frame_tokens, num_candidates
        if nc == 0:
            return keys.new_empty((b, 1, 0), dtype=torch.float32)
        if heads:
            check_candidate_region(keys.shape[2], first_frame, nc, f, segments)
            group = torch.tensor([heads], device=keys.device)
            dots, squares = similarity_partials(keys, group, first_frame, nc, f)
        else:
            dots = keys.new_zeros((b, 1, nc, f), dtype=torch.float32)
            squares = keys.new_zeros((b, 1, nc + 1, f), dtype=torch.float32)
        sums = torch.cat([dots.flatten(), squares.flatten()])
        dist.all_reduce(sums, group=self.group)
        self.stats.calls += 1
        self.stats.bytes += sums.nbytes
        return similarity_from_partials(sums[: dots.numel()].view_as(dots), sums[dots.numel() :].view_as(squares),
                                        segments)


def default_group(config: Config) -> dist.ProcessGroup | None:
    """The sequence-parallel group: the option ``process_group``, else the default group when
    ``torch.distributed`` is initialized, else ``None``."""
    if config.process_group is not None:
        return config.process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _local_slice(plan: HeadPlan, traced_heads: int, config: Config, rank: int, world_size: int, where: str) -> range:
    """This rank's heads of ``plan`` (``PlanError`` naming what does not fit)."""
    if config.head_range is not None:
        heads = range(*config.head_range)
        if heads.stop > plan.num_heads or len(heads) != traced_heads:
            raise PlanError(f"option head_range {tuple(config.head_range)}: {len(heads)} heads of the plan's "
                            f"{plan.num_heads}, but {where} has {traced_heads}")
        return heads
    if plan.num_heads % world_size:
        raise PlanError(f"plan does not match the model: the plan's {plan.num_heads} heads do not split evenly over "
                        f"the {world_size} ranks of the process group, and {where} has {traced_heads}")
    if traced_heads * world_size != plan.num_heads:
        raise PlanError(f"plan does not match the model: num_heads: plan has {plan.num_heads}, {where} has "
                        f"{traced_heads} on each of {world_size} ranks ({traced_heads * world_size} in all); a plan "
                        "for another model, or another head layout (options head_range, process_group)")
    return plan.shard_heads(world_size)[rank]


def make_shard(plan: HeadPlan, traced_heads: int, config: Config, where: str) -> HeadShard:
    """This rank's shard of ``plan`` for an attention traced with ``traced_heads`` heads (not the plan's).

    Collective over the group (every rank compiles the same graphs): each rank's slice, or its error, is
    gathered, so a misfit on any rank raises the same ``PlanError`` on every rank instead of a hang."""
    group = default_group(config)
    world_size = dist.get_world_size(group) if group is not None else 1
    if world_size == 1:
        raise PlanError(f"plan does not match the model: num_heads: plan has {plan.num_heads}, {where} has "
                        f"{traced_heads}; a plan made for another model (make one for this model: fkv profile)"
                        + ("" if group is not None or plan.num_heads % traced_heads else
                           f", or this is one of {plan.num_heads // traced_heads} ranks splitting the heads and "
                           "torch.distributed is not initialized"))
    rank = dist.get_rank(group)
    try:
        mine: range | str = _local_slice(plan, traced_heads, config, rank, world_size, where)
    except PlanError as exc:
        mine = str(exc)
    slices: list[range | str] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(slices, mine, group=group)
    errors = [(r, s) for r, s in enumerate(slices) if isinstance(s, str)]
    if errors:
        raise PlanError("; ".join(f"rank {r}: {s}" for r, s in errors))
    covered = sorted(h for s in slices for h in s)
    if covered != list(range(plan.num_heads)):
        raise PlanError(f"the ranks' heads {[(s.start, s.stop) for s in slices]} do not cover the plan's "
                        f"{plan.num_heads} heads exactly once; fix option head_range")
    return HeadShard(plan=plan, heads=slices[rank], group=group, rank=rank, all_heads=tuple(slices))
