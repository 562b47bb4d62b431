"""``profile`` mode's recording: frame-level attention mass of the current chunk's queries, per call.

The ``profile`` mode of the backend computes attention exactly as dense and records, per layer and
call, the softmax mass per key frame (streamed over query blocks: the attention matrix is never
materialized whole). Calls are labelled with :func:`tag` (sample, step, chunk), so that role
stability can be measured; :mod:`fkv_compile.tools.profiling` turns the records into plans.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``n`` key frames.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..classify import MassRecord
from ..semantics import window_layout

__all__ = ["MassRecord", "frame_mass", "tag", "current_labels", "record_call"]

_LABELS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("fkv_profile_labels", default={})
MAX_BLOCK_ELEMENTS = 1 << 24  # scores of one query block: 64 MiB in float32


@contextlib.contextmanager
def tag(**labels: Any) -> Iterator[None]:
    """Label the attention calls recorded inside (e.g. ``tag(sample=0, chunk=3, step=1)``); nests."""
    token = _LABELS.set({**_LABELS.get(), **labels})
    try:
        yield
    finally:
        _LABELS.reset(token)


def current_labels() -> dict[str, Any]:
    return dict(_LABELS.get())


def frame_mass(
    q: torch.Tensor, k: torch.Tensor, frame_tokens: int, scale: float | None = None,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Softmax attention mass per key frame, summed over queries: ``[B, H, n]`` (float32 or float64).

    q: ``[B, H, Lq, D]``, k: ``[B, H, Lk, D]`` with ``Lk = n * frame_tokens``. Query blocks are
    sized so that one block's scores hold at most ``max_block_elements`` numbers.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    if lk % frame_tokens:
        raise ValueError(f"keys expected a whole number of frames of {frame_tokens} tokens, got Lk={lk}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kt = k.to(dtype).transpose(-1, -2)
    block = max(1, max_block_elements // (b * h * lk))
    total = torch.zeros(b, h, lk, dtype=dtype, device=q.device)
    for start in range(0, lq, block):
        scores = (q[:, :, start : start + block].to(dtype) @ kt) * scale
        total += scores.softmax(dim=-1).sum(dim=2)
    return total.view(b, h, lk // frame_tokens, frame_tokens).sum(-1)


def record_call(records: list[MassRecord], layer: int, q: torch.Tensor, k: torch.Tensor, scale: float | None,
                frame_tokens: int, chunk_frames: int) -> None:
    """Append one dense call's frame mass to ``records`` (calls that do not fit the geometry are skipped)."""
    if window_layout(q.shape[2], k.shape[2], frame_tokens, chunk_frames) is None:
        return
    mass = frame_mass(q, k, frame_tokens, scale).sum(0).double() / (q.shape[0] * q.shape[2])
    records.append(MassRecord(layer=layer, labels=current_labels(), mass=mass.cpu()))
