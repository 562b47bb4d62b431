"""One dispatch for the compressed ops: torch or Triton, chosen once per device and ``kernels`` option.

``select`` and the compact store call the ops through the :class:`Kernels` they are given, never
deciding themselves. ``auto`` runs Triton on CUDA tensors (when Triton is installed) and torch
elsewhere; there, range attention is a contest per shape between the kernel and SDPA over the kept
tokens gathered (:mod:`.contest`). ``triton`` forces the kernels, on CPU through the interpreter
(``TRITON_INTERPRET=1`` in the environment before Python starts); ``torch`` forces the torch code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import KERNELS
from ..kernels import interpreting, triton_installed
from . import torch_ops

__all__ = ["Kernels", "KernelsError", "kernels_for", "contested"]


class KernelsError(RuntimeError):
    """The requested kernels cannot run here."""


@dataclass(frozen=True)
class Kernels:
    """The implementations of the three compressed ops (signatures of :mod:`.torch_ops`)."""

    name: str  # "torch" or "triton"
    range_attention: Callable[..., torch.Tensor]
    segment_similarity: Callable[..., torch.Tensor]
    gather_tokens: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @property
    def triton(self) -> bool:
        return self.name == "triton"


TORCH = Kernels("torch", torch_ops.range_attention, torch_ops.segment_similarity, torch_ops.gather_tokens)


def _wants_triton(choice: str, device_type: str) -> bool:
    if choice not in KERNELS:
        raise KernelsError(f"kernels expected one of {KERNELS}, got {choice!r}")
    if choice == "torch":
        return False
    if choice == "auto":
        return device_type == "cuda" and triton_installed()
    if not triton_installed():
        raise KernelsError("kernels='triton' needs Triton: pip install 'fkv-compile[triton]'")
    if device_type == "cpu" and not interpreting():
        raise KernelsError("kernels='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in "
                           "the environment before Python starts")
    if device_type not in ("cpu", "cuda"):
        raise KernelsError(f"kernels='triton' runs on CUDA (or CPU via the interpreter), got device {device_type}")
    return True


@functools.cache
def kernels_for(choice: str, device_type: str) -> Kernels:
    """The ops that run on ``device_type`` tensors for the ``kernels`` option ``choice``."""
    if not _wants_triton(choice, device_type):
        return TORCH
    from ..kernels.attention import range_attention
    from ..kernels.gather import gather_tokens
    from ..kernels.similarity import segment_similarity

    kernels = Kernels("triton", range_attention, segment_similarity, gather_tokens)
    return contested(kernels) if choice == "auto" else kernels


def contested(kernels: Kernels, **contest: Any) -> Kernels:
    """``kernels`` with range attention raced per shape against the torch path (SDPA over the gathered kept
    tokens); ``contest``: :class:`.contest.RangeAttentionContest`'s ``bench`` and ``cache``."""
    from .contest import RangeAttentionContest

    race = RangeAttentionContest({kernels.name: kernels.range_attention, "sdpa": torch_ops.range_attention}, **contest)
    return dataclasses.replace(kernels, range_attention=race)
