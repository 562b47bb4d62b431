"""Which KV buffers a piece of run-time state describes, and whether anything but the rewritten ops wrote them since.

The pass proves what one graph does to a cache; the cache itself lives across graphs, eager code and Python-int
state. Code the pass never sees (a pipeline that zeroes its buffers, rebuilds them with another forward, or serves
two videos in turns) can change the history a selection was chosen from, or that the compact store stands for.

PyTorch counts every in-place write to a tensor, through any view of it, in a version counter shared by the
views (``tensor._version``). The rewritten ops make the graph's own cache writes themselves, so after each op the
counter is a known value: a :class:`CacheMark` taken then proves, at the next call, that nothing else wrote the
buffers (:attr:`Touch.SAME`) or that something did (:attr:`Touch.TOUCHED`). Tensors made under
``torch.inference_mode()`` carry no counter (:attr:`Touch.UNTRACKED`): nothing can be proven about them.

A mark also binds state to its buffers: the storage they live in, alive (a weak reference to the tensor whose
storage it is, so that a freed buffer's address taken by a new allocation is never mistaken for it).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch

from ..config import Choice

__all__ = ["Touch", "CacheMark", "storage_id"]


class Touch(Choice):
    """What happened to a pair of K/V buffers since a mark was taken."""

    NEW = "new"  # other buffers than the marked ones (or the marked ones were freed)
    SAME = "same"  # the marked buffers, not written since
    TOUCHED = "touched"  # the marked buffers, written by something else since
    UNTRACKED = "untracked"  # the marked buffers, but without version counters (inference tensors)


def storage_id(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (the same for all its views, and after the storage is released)."""
    return t.untyped_storage()._cdata


def _versions(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int] | None:
    try:
        return k._version, v._version
    except RuntimeError:  # "Inference tensors do not track version counter."
        return None


def _owner(t: torch.Tensor) -> torch.Tensor:
    """The tensor that owns ``t``'s storage as far as Python sees: its base, for a view."""
    return t._base if t._base is not None else t


@dataclass(frozen=True)
class CacheMark:
    """K/V buffers and their version counters at one moment (taken right after an op's own writes)."""

    owner: weakref.ref
    storages: tuple[int, int]
    versions: tuple[int, int] | None

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor) -> CacheMark:
        return cls(weakref.ref(_owner(k)), (storage_id(k), storage_id(v)), _versions(k, v))

    @property
    def tracked(self) -> bool:
        return self.versions is not None

    def describes(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether ``k``, ``v`` are the marked buffers (or views of them), still alive."""
        return self.owner() is not None and self.storages == (storage_id(k), storage_id(v))

    def advanced(self, slot: int, buffer: torch.Tensor) -> CacheMark:
        """This mark after a write the guard allowed into one of the buffers (``slot`` 0: K, 1: V)."""
        if self.versions is None:
            return self
        versions = (buffer._version, self.versions[1]) if slot == 0 else (self.versions[0], buffer._version)
        return dataclasses.replace(self, versions=versions)

    def compare(self, k: torch.Tensor, v: torch.Tensor) -> Touch:
        if not self.describes(k, v):
            return Touch.NEW
        now = _versions(k, v)
        if now is None or self.versions is None:
            return Touch.UNTRACKED
        return Touch.SAME if now == self.versions else Touch.TOUCHED
