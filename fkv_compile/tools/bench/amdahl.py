"""The limit a compressed run is set against: Amdahl's, with only attention shrunk to the kept tokens' share."""

from __future__ import annotations

import math

from ...plan import HeadPlan
from ...semantics import kept_token_count

__all__ = ["kept_fraction", "amdahl", "attention_saving", "saving_in_words", "NOISE"]


def kept_fraction(plan: HeadPlan, window_frames: int | None, chunks: int) -> float:
    """Kept over dense key tokens, summed over every chunk's window, layer and head of a video: the share of dense
    attention work the keep rule leaves."""
    kept = dense = 0.0
    for chunk in range(chunks):
        frames = (chunk + 1) * plan.chunk_frames
        window = frames if window_frames is None else min(frames, window_frames)
        for role in (role for row in plan.roles for role in row):
            dense += window * plan.frame_tokens
            kept += kept_token_count(plan, role, window)
    return kept / dense


def amdahl(ratio: float, attention_share: float, kept: float) -> dict[str, float]:
    """The best video time ratio the kept tokens allow when only attention shrinks (``1 - a + a * kept``, ``a`` the
    dense run's attention share), and the share of that saving a measured ``ratio`` realises."""
    limit = 1 - attention_share + attention_share * kept
    return {"amdahl_limit": limit, "saving_realised": (1 - ratio) / (1 - limit) if limit < 1 else math.nan}


NOISE = 0.05  # a possible saving below this share of the time is within what a shared machine's timing moves


def saving_in_words(share: float, possible: float, what: str) -> str:
    """The share of a possible saving (``possible``: a fraction of the time) a run realised, in words that hold at
    every size: at a tiny size the possible saving drowns in timing noise and the share means nothing."""
    if possible < NOISE:
        return f"{what} possible saving ({100 * possible:.1f}%) is within timing noise at this size"
    if share < 0:
        return f"slower than dense: per-call costs outweigh {what} possible {100 * possible:.0f}% at this size"
    return f"{100 * share:.0f}% of {what} possible {100 * possible:.0f}% saving realised"


def attention_saving(ratio: float, kept: float) -> dict[str, float]:
    """The profiled attention time over dense (``ratio``) and the share it realises of the saving the kept
    fraction allows there (``1 - kept``): the rollout's saving without the noise of its dense compute, which
    on a shared CPU moves a video's time by more than the attention saves. ``compact``'s attention op also
    writes the chunk into its store (dense and ``select`` write their cache outside attention)."""
    return {"attention_time": ratio, "attention_saving_realised": (1 - ratio) / (1 - kept) if kept < 1 else math.nan}

