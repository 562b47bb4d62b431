"""Equivalence helpers for tests (ours and users'): data-derived error budgets and an eager oracle.

Budgets follow attention-gym: the error allowed to an implementation is a small multiple of the
error an independent low-precision implementation of the same oracle makes against float64.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import semantics
from ..plan import DYNAMIC, HeadPlan
from .check import DEFAULT_MODES, EquivalenceReport, Target, check_equivalence

__all__ = [
    "assert_equivalent",
    "BUDGET_FACTOR",
    "max_abs_error",
    "error_budget",
    "assert_within_budget",
    "selection_margin",
    "OracleAttentionMode",
    "WriteStamps",
    "is_plain_sdpa",
]

BUDGET_FACTOR = 2.0  # the budget in multiples of an independent low-precision implementation's error vs fp64


def max_abs_error(actual: torch.Tensor | Sequence[torch.Tensor], reference: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Largest absolute difference, in float64, over a tensor or matching sequences of tensors."""
    if isinstance(actual, torch.Tensor):
        actual, reference = [actual], [reference]
    if len(actual) != len(reference):
        raise ValueError(f"expected sequences of equal length, got {len(actual)} and {len(reference)}")
    return max(float((a.double() - r.double()).abs().max()) for a, r in zip(actual, reference))


def error_budget(low_precision: Any, reference64: Any, *, factor: float = BUDGET_FACTOR, floor: float = 0.0) -> float:
    """``factor`` times the error of an independent low-precision implementation against float64."""
    return max(factor * max_abs_error(low_precision, reference64), floor)


def assert_within_budget(actual: Any, reference64: Any, budget: float, what: str = "output") -> None:
    err = max_abs_error(actual, reference64)
    if not err <= budget:
        raise AssertionError(f"{what}: max abs error {err:.3e} exceeds the budget {budget:.3e}")


def selection_margin(k: torch.Tensor, plan: HeadPlan, layer: int, lq: int) -> float:
    """Smallest gap between the last kept and first dropped segment similarity of ``layer`` (float64).

    Kept sets are discrete: when this margin is below the similarity error of a dtype, two correct
    implementations may keep different segments (a near tie); tests skip or widen such cases.
    """
    layout = semantics.window_layout(lq, k.shape[2], plan.frame_tokens, plan.chunk_frames)
    heads = plan.heads(layer, DYNAMIC)
    if layout is None or not heads:
        return float("inf")
    p = plan.dynamic
    keys = semantics.selection_keys(k.double(), heads, plan.selection)
    sims = semantics.candidate_similarity(keys, layout, p).sort(dim=-1).values
    count = semantics.selected_count(p, sims.shape[-1])
    if count == 0 or count == sims.shape[-1]:
        return float("inf")
    return float((sims[..., count] - sims[..., count - 1]).min())


def assert_equivalent(
    model_factory: Callable[[], torch.nn.Module],
    rollout: Callable[[torch.nn.Module], Sequence[torch.Tensor]],
    plan: HeadPlan,
    modes: Sequence[str] = DEFAULT_MODES,
    lowering: str = "inductor",
    reference: Target | None = None,
) -> EquivalenceReport:
    """For a user's CI (pytest or not): ``off`` bit-identical to the plain lowering, ``select`` and
    ``compact`` equal to ``oracle`` within the data-derived budget over every chunk of ``rollout(model)``,
    a budget shown able to see a dense or wrong result (``reference``: a float32 twin to compare a bf16 or
    fp16 model in; see :mod:`fkv_compile.tools.check`). Raises ``AssertionError`` with the report's table on
    failure.

        def test_forcing_kv_keeps_my_model():
            assert_equivalent(lambda: MyModel().eval(), lambda m: my_rollout(m, seed=0), HeadPlan.load("plan.json"))
    """
    result = check_equivalence(model_factory, rollout, plan, modes, lowering, reference=reference)
    if not result.passed:
        raise AssertionError("fkv_compile equivalence failed:\n  " + "\n  ".join(result.failures()) + "\n"
                             + result.table())
    return result


_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "enable_gqa": False}
"""SDPA's keyword arguments that, at these values, leave it plain attention (pipelines often pass them)."""


def is_plain_sdpa(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """An SDPA call of q, k, v (and a scale) alone, or with the other keywords at their defaults."""
    if len(args) != 3 or kwargs.keys() - {"scale", *_SDPA_DEFAULTS}:
        return False
    return all(kwargs[name] is None if default is None else kwargs[name] == default
               for name, default in _SDPA_DEFAULTS.items() if name in kwargs)


class WriteStamps:
    """The writes an eager rollout made into its ``[B, L, H, D]`` buffers, to tell whether a window was written front
    to back: what the keep rule's positions assume (:mod:`fkv_compile.modes.order`). Every ``buf[:, a:b] = new``
    into one of ``buffers`` (all ``[B, L, H, D]`` tensors if not given) stamps tokens ``a:b`` with the write's
    number; a window is in written order if its stamps never decrease. A ring buffer's write inside the window
    (StreamDiffusionV2, once full) breaks it; there the pass runs dense."""

    def __init__(self, buffers: Callable[[], Iterable[torch.Tensor]] | None = None) -> None:
        self.buffers = buffers  # the caches whose writes count (others, e.g. a clone transformed in place, do not)
        self.tokens: dict[int, torch.Tensor] = {}  # per buffer (its storage): the last write's number per token
        self.writes = 0

    def stamp(self, buffer: torch.Tensor, index: object) -> None:
        tokens = index[1] if isinstance(index, tuple) and len(index) > 1 else None
        tracked = self.buffers is None or any(buffer is b for b in self.buffers())
        if tracked and buffer.dim() == 4 and isinstance(tokens, slice):
            key = buffer.untyped_storage().data_ptr()
            if key not in self.tokens:  # forgotten with the buffer: a later tensor at its address is another one
                self.tokens[key] = torch.zeros(buffer.shape[1], dtype=torch.long)
                weakref.finalize(buffer, self.tokens.pop, key, None)
            self.writes += 1
            self.tokens[key][tokens] = self.writes

    def in_written_order(self, k: torch.Tensor) -> bool:
        """Whether the window ``k`` ``[B, H, L, D]`` was written front to back (a window of no stamped buffer: yes)."""
        stamps = self.tokens.get(k.untyped_storage().data_ptr())
        if stamps is None or not k.stride(2):
            return True
        start = k.storage_offset() // k.stride(2)
        window = stamps[start:start + k.shape[2]]
        return bool((window[1:] >= window[:-1]).all())


class OracleAttentionMode(TorchFunctionMode):
    """Eagerly replace SDPA over the given KV caches by the masked-dense oracle of ``plan``.

    The layer of a call is the index of the cache its keys are a view of (or its values, where the keys are
    recomputed from the cache at every call: re-rotated); attention over anything else (cross-attention) runs
    unchanged, and so does attention over a window not in written order (:class:`WriteStamps` of the caches'
    writes while the mode is on).
    """

    def __init__(self, plan: HeadPlan, kv_caches: Sequence[Mapping[str, torch.Tensor]]):
        super().__init__()
        self.plan = plan
        self.layer_of = {c[name].untyped_storage().data_ptr(): i for i, c in enumerate(kv_caches) for name in "kv"}
        self.stamps = WriteStamps(lambda: [c[n] for c in kv_caches for n in "kv"])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__setitem__:
            self.stamps.stamp(*args[:2])
        elif func is F.scaled_dot_product_attention and is_plain_sdpa(args, kwargs):
            layer = self.layer_of.get(args[1].untyped_storage().data_ptr(),
                                      self.layer_of.get(args[2].untyped_storage().data_ptr()))
            if layer is not None and self.stamps.in_written_order(args[1]):
                return semantics.oracle_attention(*args[:3], self.plan, layer, scale=kwargs.get("scale"))
        return func(*args, **kwargs)
