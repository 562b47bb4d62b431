"""Timing side by side: contenders in rounds, each once per round in a rotated order, ratios of same-round pairs.

On a shared machine whose speed drifts over minutes, times taken one contender after the other are not comparable;
the drift falls on every contender of a round alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Clock", "interleaved_times", "paired_ratio", "median_seconds"]


class Clock:
    """Wall time on CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start


def interleaved_times(fns: dict[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1,
                      device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Each function's time in each of ``repeats`` rounds (after ``warmup`` untimed rounds; CUDA events on a GPU).
    A round runs every function once, in an order rotated from round to round, so that the drift of a shared
    machine falls on all of them alike: their ratios are measured side by side (:func:`paired_ratio`)."""
    clock = Clock(torch.device(device))
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock.mark()
            fns[name]()
            times[name].append(clock.seconds(start, clock.mark()))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``num``'s time over ``den``'s in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median_seconds(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1,
                   device: torch.device | str = "cpu") -> float:
    """Median time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (CUDA events on a GPU)."""
    return statistics.median(interleaved_times({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"])

