"""``compact``'s guard of the pipeline's K/V buffers: which store stands for which buffers, and when they may go.

The pass proves that one graph only writes, rolls and reads a cache through the store ops. It cannot see the code
around the graph: a pipeline that zeroes its buffers and rebuilds them with another forward at every block, that
zeroes them between videos, or that serves two videos in turns. So at run time, per layer:

- every pair of buffers gets its own :class:`LayerStore` (two streams in turns, a new batch size, a new video in
  new buffers: never one store for another's history), bound by a :class:`~.watch.CacheMark`;
- while the buffers are kept, the ops also make the pipeline's own writes and rolls on them, so they stay what the
  pipeline expects, and the version counters show whether anything else wrote them between two calls;
- a layer's buffers are released (storage resized to 0) only once that layer has been watched over a whole video
  and into the next one with nothing but the ops writing them. A released buffer cannot be watched (writing it
  would crash the process), which is why the proof comes first;
- buffers written by anything else, buffers without version counters (``torch.inference_mode`` tensors) and a
  chunk of another length than the plan's (a short last chunk: the keep rule leaves it dense, which needs the
  dense history) make the layer keep its dense buffers from then on and run ``select`` over them, with the reason
  in the report. A store never serves a history it did not see written.

A staged cache (LongLive v1: the graph rolls and writes a clone, the pipeline repeats both on its buffers after all
layers, in another graph) is served by the store at the attention, and the pipeline's later roll and write are
checked against what the store did (:meth:`CompactCaches.expect`, :meth:`CompactCaches.replayed`): the same bounds
and the very tensor the store was given, into buffers nothing else wrote since. Only such a replay keeps the layer's
buffers watched; anything else leaves it dense, as any other write does.

Caches the store cannot watch this way (caches grown by concatenation, new tensors at every call) are served by one
store per layer, released at once, as the pass's proof for that pattern allows (:meth:`CompactCaches.unwatched`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .store import LayerStore, StoreError
from .watch import CacheMark, Touch

__all__ = ["CompactCache", "CompactCaches", "roll_step", "write_step"]


def _nbytes(cache_k: torch.Tensor, cache_v: torch.Tensor) -> int:
    return cache_k.untyped_storage().nbytes() + cache_v.untyped_storage().nbytes()


def _free(cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
    """Release the pipeline's buffers: storage resized to 0, as FSDP does (a sliced read then fails loudly)."""
    cache_k.untyped_storage().resize_(0)
    cache_v.untyped_storage().resize_(0)


Step = tuple  # ("roll", dst, src, length) or ("write", start, end, the written tensor's identity)


def roll_step(dst: int, src: int, length: int) -> Step:
    return ("roll", dst, src, length)


def write_step(start: int, end: int, value: torch.Tensor) -> Step:
    """A write of ``value``: its bounds and the tensor itself (storage, offset, shape, strides, version)."""
    return ("write", start, end, value.untyped_storage()._cdata, value.storage_offset(), tuple(value.shape),
            value.stride(), value._version if not value.is_inference() else None)


@dataclass
class CompactCache:
    """One pair of the pipeline's K/V buffers of one layer and the store that stands for it (``None``: the buffers
    are kept and the layer runs ``select`` over them)."""

    store: LayerStore | None
    mark: CacheMark
    dense_bytes: int
    released: bool = False
    expected: tuple[list[Step], list[Step]] = field(default_factory=lambda: ([], []))  # staged: K's, V's replays

    def keeps_dense(self) -> bool:
        """Whether the pipeline's buffers still hold the dense cache (the ops write them)."""
        return not self.released


class CompactCaches:
    """Per layer, the watched buffer pairs with their stores, and what the watching has shown."""

    def __init__(self, new_store: Callable[[int, torch.device], LayerStore], trust: bool = False):
        self._new_store = new_store
        self.trust = trust  # option release="trust": buffers released at their first call, without watching
        self._caches: dict[int, list[CompactCache]] = {}
        self._unwatched: dict[int, LayerStore] = {}
        self._unwatched_bytes: dict[int, int] = {}
        self.dense: dict[int, str] = {}  # layers that keep their dense buffers and run select, with the reason
        self.proven: set[int] = set()  # layers watched over a whole video untouched: their buffers may go
        self._progressed: set[int] = set()  # layers that wrote past their first chunk
        self.held = ""  # why no buffer may be released any more (the model runs partly outside the compiled graphs)
        self.pairs_seen = 0  # buffer pairs watched so far
        self.pairs_released = 0

    # -- watched buffers ---------------------------------------------------------------------------
    def enter(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor, device: torch.device,
              write_start: int | None = None, serve: bool = True) -> CompactCache:
        """The entry of these buffers (a new one for new buffers), checked: buffers written since the last op, or
        without version counters, leave the layer dense. ``write_start``: where the op writes (``None``: a roll);
        0 after a layer has written past its first chunk starts a second video, which proves the layer.
        ``serve=False``: the op runs dense (calibration): the buffers are watched, no store is made yet."""
        entries = [e for e in self._caches.get(layer, []) if e.mark.owner() is not None]
        entry = next((e for e in entries if e.mark.describes(cache_k, cache_v)), None)
        if entry is None:
            mark = CacheMark.of(cache_k, cache_v)
            entry = CompactCache(None, mark, _nbytes(cache_k, cache_v))
            entries.append(entry)
            self.pairs_seen += 1
            if not mark.tracked:
                self.leave_dense(layer, entry, "the K/V buffers have no version counters (torch.inference_mode "
                                  "tensors), so nothing proves that only the compiled graph writes them; run the "
                                  "pipeline under torch.no_grad() to let compact release them")
        else:
            touch = entry.mark.compare(cache_k, cache_v)
            if touch is not Touch.SAME and layer not in self.dense:  # calibrating (no store yet) included
                self.leave_dense(layer, entry, f"its K/V buffers were written outside the compiled graph between two "
                                  f"calls (version counters {entry.mark.versions} -> "
                                  f"{(cache_k._version, cache_v._version) if touch is Touch.TOUCHED else '?'}: "
                                  "zeroed, rebuilt or written by eager code or another graph)")
        self._caches[layer] = entries
        if write_start == 0 and layer in self._progressed and layer not in self.dense:
            self.proven.add(layer)
        if serve and entry.store is None and layer not in self.dense and not entry.released:
            entry.store = self._new_store(layer, device)  # it adopts the dense history the buffers hold
        return entry

    def wrote(self, layer: int, entry: CompactCache, cache_k: torch.Tensor, cache_v: torch.Tensor,
              write_start: int | None = None) -> None:
        """After the op's own writes: mark the buffers; after an attention's write (``write_start`` given, not a
        roll's, which the attention follows), release them once the layer is proven."""
        if write_start:
            self._progressed.add(layer)
        if (write_start is not None and entry.store is not None and not entry.released
                and (layer in self.proven or self.trust) and not self.held):
            _free(cache_k, cache_v)
            entry.released = True
            self.pairs_released += 1
        entry.mark = CacheMark.of(cache_k, cache_v)

    # -- staged caches: the pipeline's own roll and write come later --------------------------------
    def expect(self, layer: int, entry: CompactCache, rolls: list[tuple[int, int, int]], write: tuple[int, int],
               k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """A staged op made ``rolls`` (dst, src, length) and the write of ``k_new``/``v_new`` at ``write`` on the
        store: the pipeline is to make them on its buffers next. Steps still expected from the last call were
        never made there."""
        if any(entry.expected) and layer not in self.dense:
            self.leave_dense(layer, entry, "the pipeline did not repeat on its K/V buffers the roll and write its "
                             "graph made on a clone of them (a staged cache whose write-back was skipped)")
        entry.expected = tuple([*(roll_step(*r) for r in rolls), write_step(*write, new)] for new in (k_new, v_new))

    def replayed(self, buffer: torch.Tensor, step: Step, make: Callable[[], None]) -> None:
        """The pipeline's roll or write ``step`` of ``buffer``: a staged layer's expected next step, into buffers
        nothing else wrote since, is made on the buffers only while they are kept; anything else is made, and
        leaves that layer dense (an error once its buffers are released)."""
        found = self._owner_of(buffer)
        if found is None or found[0] in self.dense:
            make()
            return
        layer, entry, slot = found
        expected = entry.expected[slot].pop(0) if entry.expected[slot] else None
        untouched = entry.mark.versions is not None and buffer._version == entry.mark.versions[slot]
        if expected != step or not untouched:
            entry.expected = ([], [])
            self.leave_dense(layer, entry, f"its {'KV'[slot]} buffer was written by the pipeline with "
                             f"{step[:3]}, not the roll or write its graph made on the staged clone "
                             f"({expected[:3] if expected else 'none expected'})"
                             + ("" if untouched else ", after something else wrote it"))
            make()
            return
        if entry.keeps_dense():
            make()
        entry.mark = entry.mark.advanced(slot, buffer)

    def _owner_of(self, buffer: torch.Tensor) -> tuple[int, CompactCache, int] | None:
        """The layer, entry and slot (0: K, 1: V) whose watched buffers ``buffer`` is one of."""
        storage = buffer.untyped_storage()._cdata
        for layer, entries in self._caches.items():
            for entry in entries:
                if storage in entry.mark.storages and entry.mark.owner() is not None:
                    return layer, entry, entry.mark.storages.index(storage)
        return None

    def hold(self, reason: str) -> None:
        """Release no buffer from now on: code outside the rewritten graphs (eager fallbacks) reads and writes them."""
        self.held = self.held or reason

    def leave_dense(self, layer: int, entry: CompactCache, reason: str) -> None:
        """This layer keeps its dense buffers from now on and runs select over them; ``entry``'s must still hold the
        dense cache (a released one cannot serve what the store dropped: an error, never a silent answer)."""
        if entry.released:
            raise StoreError(f"compact: layer {layer} released its K/V buffers after watching a whole video, but "
                             f"then {reason}; compile with mode='select' for this pipeline")
        entry.store = None
        self.dense.setdefault(layer, reason)
        self.proven.discard(layer)

    # -- caches served without watching ----------------------------------------------------------
    def unwatched(self, layer: int, device: torch.device) -> LayerStore:
        """The one store of ``layer`` for caches that are new tensors at every call (clones, concatenations)."""
        if layer not in self._unwatched:
            self._unwatched[layer] = self._new_store(layer, device)
        return self._unwatched[layer]

    def unwatched_store(self, layer: int) -> LayerStore | None:
        return self._unwatched.get(layer)

    def release_unwatched(self, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """Free such a cache's buffers at once (storage resized to 0, as FSDP does): the pass proved the graph alone
        reads them; a later read from outside fails loudly (``RuntimeError: ... out of bounds``)."""
        nbytes = _nbytes(cache_k, cache_v)
        if nbytes:  # a new video may bring new buffers: they are released too
            self._unwatched_bytes[layer] = nbytes
            _free(cache_k, cache_v)

    # -- reading -----------------------------------------------------------------------------------
    def stores(self) -> dict[int, LayerStore]:
        """Per layer, the store of its most recent buffers (or its unwatched store); a store outlives its buffers
        until the layer's next call, so a finished video can still be reported."""
        found = dict(self._unwatched)
        for layer, entries in self._caches.items():
            stores = [e.store for e in entries if e.store is not None]
            if stores:
                found[layer] = stores[-1]
        return found

    def dense_bytes(self, layer: int) -> int:
        """The K + V bytes of the layer's most recent buffers (released or not)."""
        entries = self._caches.get(layer)
        return entries[-1].dense_bytes if entries else self._unwatched_bytes.get(layer, 0)

    def kept_dense_bytes(self, layer: int) -> int:
        """The K + V bytes of the layer's live buffers still held (watched, or left dense)."""
        return sum(e.dense_bytes for e in self._caches.get(layer, []) if not e.released and e.mark.owner() is not None)

    def summary(self) -> str:
        """What the guard did, for the report: buffers released or kept, and every layer left dense with its reason
        (empty when no watched buffer was seen)."""
        if not self.pairs_seen:
            return ""
        lines = [f"{self.pairs_released} of {self.pairs_seen} K/V buffer pairs released"]
        if self.pairs_released < self.pairs_seen:
            lines[0] += "; the others are kept " + ("(watched until a second video proves that only the compiled "
                                                    "graph writes them)" if not self.dense else "(see the layers left dense)")
        lines += [f"layer {layer} keeps its dense K/V buffers and runs select: {reason}"
                  for layer, reason in sorted(self.dense.items())]
        if self.held:
            lines.append(f"no buffer is released from now on: {self.held}")
        return "\n".join(lines)
