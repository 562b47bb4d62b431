"""Range attention by whichever is faster for each shape: the Triton kernel, or SDPA over the kept tokens gathered.

The range kernel walks each head's ranges in place; the library path (:func:`.torch_ops.range_attention`)
gathers the kept tokens into a compact tensor first and runs ``F.scaled_dot_product_attention`` on it, which on a
GPU is FlashAttention or cuDNN: a well-kept kernel the Triton one must beat to be worth running. Which wins
depends on the GPU and the shape (docs/gpu_model.md: at 450 against 600 TFLOP/s the kernel gives back a third of
the saving), so both are timed on a shape's first call and the winner runs from then on. Winners are kept in
the autotune cache file (:class:`~fkv_compile.kernels.tuning.TuningCache`, kernel ``range_attention:contest``),
so a machine races each shape once.

A shape is what the call's tensors say without reading them (no device sync): dtype, head dim, query and key
tokens, heads, ranges per head, batch. Calls that want the log-sum-exp (the backward) take the kernel: only it
returns one. With ``FKV_AUTOTUNE=0`` nothing is timed and the kernel runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..kernels.tuning import TuningCache, cpu_bench, machine_signature, shared_cache, tuning_enabled

__all__ = ["RangeAttentionContest", "CONTEST_KERNEL"]

CONTEST_KERNEL = "range_attention:contest"
Bench = Callable[[Callable[[], Any]], float]  # milliseconds of one call


def _bench_on(device: torch.device) -> Bench:
    """CUDA: Triton's benchmarker (CUDA events, median); elsewhere the wall clock."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda call: float(do_bench(call))
    return lambda call: cpu_bench(call, [0.5])[0]


class RangeAttentionContest:
    """A ``range_attention`` (same signature) that runs, per shape, the faster of its contenders.

    ``contenders``: name -> implementation, the first the kernel (what runs untimed, and for the log-sum-exp).
    ``bench`` times one call in milliseconds (default: per device, :func:`_bench_on`); ``cache`` keeps winners
    (default: the process-wide autotune cache).
    """

    def __init__(self, contenders: dict[str, Callable[..., Any]], bench: Bench | None = None,
                 cache: TuningCache | None = None):
        if len(contenders) < 2:
            raise ValueError(f"a contest needs two contenders, got {sorted(contenders)}")
        self.contenders = dict(contenders)
        self.kernel = next(iter(self.contenders))
        self.bench, self.cache = bench, cache
        self.winners: dict[tuple, str] = {}  # shape -> the contender that runs it
        self.raced = 0  # shapes timed in this process (tests check reuse)
        self._loaded: set[str] = set()  # machines whose persisted winners were read

    @staticmethod
    def shape(q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, q_heads: torch.Tensor | None) -> tuple:
        return (str(q.dtype).removeprefix("torch."), q.shape[-1], q.shape[2], k.shape[2], q.shape[1], k.shape[1],
                starts.shape[-1], q.shape[0], q_heads is not None)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                 scale: float | None = None, q_heads: torch.Tensor | None = None, out: torch.Tensor | None = None,
                 return_lse: bool = False) -> Any:
        if return_lse:
            return self.contenders[self.kernel](q, k, v, starts, ends, scale, q_heads=q_heads, out=out,
                                                return_lse=True)
        name = self.winner(q, k, v, starts, ends, scale, q_heads)
        return self.contenders[name](q, k, v, starts, ends, scale, q_heads=q_heads, out=out)

    def winner(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
               scale: float | None, q_heads: torch.Tensor | None) -> str:
        """The contender for this call's shape: remembered, persisted, or raced now."""
        if not tuning_enabled():
            return self.kernel
        shape = self.shape(q, k, starts, q_heads)
        if shape in self.winners:
            return self.winners[shape]
        cache = self.cache or shared_cache()
        signature = machine_signature(q.device)
        if signature["device"] not in self._loaded:
            self._loaded.add(signature["device"])
            for key, value in cache.values(signature, CONTEST_KERNEL).items():
                if isinstance(value, dict) and value.get("contender") in self.contenders:
                    self.winners.setdefault(key, value["contender"])
        if shape not in self.winners:
            bench = self.bench or _bench_on(q.device)
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
            times = {name: bench(lambda fn=fn: fn(q, k, v, starts, ends, scale, q_heads=q_heads, out=out))
                     for name, fn in self.contenders.items()}
            self.winners[shape] = min(times, key=times.__getitem__)
            self.raced += 1
            cache.put(signature, CONTEST_KERNEL, shape, {"contender": self.winners[shape],
                                                         "ms": {n: round(t, 6) for n, t in times.items()}})
        return self.winners[shape]
