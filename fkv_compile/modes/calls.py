"""What the custom ops do at a call (:mod:`fkv_compile.ops` registers them; the bodies are here, at run time).

Each body gets the session, the site and the layer the op resolved from its key tensor (:mod:`.state`), and
returns what the op returns before its layout is fixed: the attention of ``select``, ``oracle``, ``profile`` and of
a calibrating call; ``select`` over a cache whose chunk write it makes itself; the compact store's write, roll and
attention (:mod:`.store`), with the guard of the pipeline's buffers (:mod:`.guard`) deciding when the store serves
and when the buffers may go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import semantics
from . import state
from .guard import CompactCache, roll_step, write_step
from .profile import record_call
from .select import History, compressed_attention
from .store import LayerStore, StoreError

__all__ = ["select", "oracle", "dense", "profile", "select_over_cache", "kept_mask", "store_attention",
           "staged_store_attention", "replay_write", "replay_roll", "store_roll", "store_grown_attention"]


def select(s: state.Session, site: int, layer: int, q, k, v, scale, history: History | None = None):
    if not k.untyped_storage().nbytes():
        raise RuntimeError(
            f"fkv select_attention (site {site}, layer {layer}): the KV cache buffer was released by compact mode at "
            "another site of this layer, but this site could not be served compactly (see fkv_compile.report); "
            "compile with mode='select' for this model"
        )
    if not in_order(s, site, layer, q, k, v):
        return out_of_order(s, site, layer, q, k, v, scale)
    out, kept = compressed_attention(q, k, v, s.plan, layer, scale, s.kernels(q.device), s.shard, s.selections,
                                     history)
    s.record(site, layer, kept.kept, kept.window, kept.layout_fits)
    return out


def oracle(s: state.Session, site: int, layer: int, q, k, v, scale):
    if not in_order(s, site, layer, q, k, v):
        return out_of_order(s, site, layer, q, k, v, scale)
    plan = s.plan
    mask = semantics.keep_mask(k, plan, layer, q.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=scale)
    fits = semantics.window_layout(q.shape[-2], k.shape[-2], plan.frame_tokens, plan.chunk_frames) is not None
    s.record(site, layer, tuple(mask.sum(-1).float().mean(0).tolist()), k.shape[-2], fits)
    return out


def in_order(s: state.Session, site: int, layer: int, q, k, v) -> bool:
    """Whether the keep rule's positions apply: proven at run time for a window written outside the graph
    (:mod:`fkv_compile.modes.order`), by the pass elsewhere."""
    return not s.sites[site].checks_order or s.order.sampled(layer, k, v, q.shape[-2], s.plan.frame_tokens)


def out_of_order(s: state.Session, site: int, layer: int, q, k, v, scale):
    """A window not in written order: the model's own attention, counted apart in the report."""
    s.selections.forget(layer)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    s.record(site, layer, (float(k.shape[-2]),) * q.shape[1], k.shape[-2], True, ordered=False)
    return out


def dense(s: state.Session, site: int, layer: int, q, k, v, scale):
    """The model's own attention: ``profile``'s, and a calibrating call's (``Session.calibrating`` recorded it)."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    s.record(site, layer, (float(k.shape[-2]),) * q.shape[1], k.shape[-2], True)
    return out


def profile(s: state.Session, site: int, layer: int, q, k, v, scale):
    record_call(s.profile_records, layer, q, k, scale, s.plan.frame_tokens, s.plan.chunk_frames)
    return dense(s, site, layer, q, k, v, scale)


def window_of(cache: torch.Tensor, start: int, end: int, protected: int) -> torch.Tensor:
    """The window ``cache[:, start:end]`` ``[B, L, H, D]`` as the attention reads it, ``[B, H, L, D]``: after the sink
    ``cache[:, :protected]`` when ``protected`` (LongLive's cat-window)."""
    window = cache[:, start:end]
    if protected:
        window = torch.cat([cache[:, :protected], window], 1)
    return window.transpose(1, 2)


def write_chunk(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, start: int,
           end: int) -> None:
    """The pipeline's own write of the chunk into its dense buffers."""
    cache_k[:, start:end] = k_new
    cache_v[:, start:end] = v_new


def select_over_cache(s: state.Session, site: int, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write: tuple[int, int],
                       window: tuple[int, int], protected: int, scale: float | None,
                       history: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The chunk's write, made here between the memo's two looks at the buffers, then ``select`` over the window.
    ``history``: the pipeline's buffers whose history ``cache_k``/``cache_v`` hold (a staged clone's), for the
    window's order; their write-back is the pipeline's own, after the call (replayed and checked against the store
    in ``compact``), so only a clone's own buffers are checked for writes from elsewhere between calls."""
    touched = history is None and s.order.touched(layer, cache_k, cache_v)
    s.selections.before_write(layer, cache_k, cache_v)
    write_chunk(cache_k, cache_v, k_new, v_new, *write)
    s.selections.after_write(layer, cache_k, cache_v)
    k, v = (window_of(c, *window, protected) for c in (cache_k, cache_v))
    frame_tokens = s.plan.frame_tokens if s.plan is not None else q.shape[2]  # calibrating: no frames yet
    ordered = s.order.written(layer, *(history or (cache_k, cache_v)), write, window[1], k.shape[2], q.shape[2],
                              frame_tokens, touched)
    if s.calibrating(layer, q, k, scale):
        return dense(s, site, layer, q, k, v, scale)
    if not ordered:
        return out_of_order(s, site, layer, q, k, v, scale)
    return select(s, site, layer, q, k, v, scale, (write[0], window[0]))


def served_window(site: int, layer: int, protected: int, window_start: int, window_end: int) -> tuple[int, int]:
    """The window a store serves: ``[0, window_end)`` for a cat-window whose sink ``[0, protected)`` the window
    follows (LongLive's cache is as long as its attention window); any other cat-window is an error."""
    if protected and window_start != protected:
        raise StoreError(
            f"fkv compact (site {site}, layer {layer}): the attention reads the sink [0, {protected}) and the window "
            f"[{window_start}, {window_end}), which does not follow it; compact serves cat(sink, window) only as one "
            "window (a cache as long as the attention window, as LongLive's); compile with mode='select'")
    return (0 if protected else window_start), window_end


def entered(s: state.Session, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor, q: torch.Tensor,
             write_start: int, window: tuple[int, int]) -> CompactCache:
    """The guard's entry of these buffers for a call that writes at ``write_start``; a call the keep rule leaves
    dense (it needs the dense history) leaves the layer dense."""
    entry = s.compact.enter(layer, cache_k, cache_v, q.device, write_start, serve=s.plan is not None)
    if entry.store is not None and not fits_plan(s, q, window):
        s.compact.leave_dense(layer, entry, f"a call of {q.shape[2]} query tokens over a window of "
                              f"{window[1] - window[0]} tokens does not fit the plan's chunks (a short last chunk?): "
                              "the keep rule leaves it dense, which needs the dense history")
    return entry


def fits_plan(s: state.Session, q: torch.Tensor, window: tuple[int, int]) -> bool:
    """Whether the call's query and window fit the plan's geometry (else the keep rule leaves it dense)."""
    plan = s.plan
    return semantics.window_layout(q.shape[2], window[1] - window[0], plan.frame_tokens, plan.chunk_frames) is not None


def serve(s: state.Session, site: int, layer: int, store: LayerStore, q: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write: tuple[int, int],
           window: tuple[int, int], scale: float | None, protected: int = 0) -> torch.Tensor:
    """The store's side of a compact call: the chunk's write, then the attention over ``window``."""
    if store.chunk is None and write[0] > window[0] and cache_k.untyped_storage().nbytes():
        # a store that starts within a video (calibration ended there, or buffers first seen there): it starts from
        # the dense window's history
        store.adopt(cache_k[:, window[0]:write[0]], cache_v[:, window[0]:write[0]], window[0])
    store.write(k_new, v_new, *write, window, protected)
    out = store.attention(q, window, scale)
    s.record(site, layer, store.kept_counts(q.shape[1]), window[1] - window[0], True)
    return out


def shift(buffer: torch.Tensor, dst: int, src: int, length: int) -> None:
    """The pipeline's own eviction on a dense buffer: ``buffer[:, dst:dst + n] = buffer[:, src:src + n].clone()``."""
    buffer[:, dst : dst + length] = buffer[:, src : src + length].clone()


def roll_buffers(cache_k: torch.Tensor, cache_v: torch.Tensor, dst: int, src: int, length: int) -> None:
    """The pipeline's own eviction on its dense K and V buffers."""
    for cache in (cache_k, cache_v):
        shift(cache, dst, src, length)


def kept_mask(s: state.Session, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The keep rule's mask over ``k``'s window for the backward of a masked attention op."""
    if s.shard is not None and s.shard.spans(layer):
        raise NotImplementedError(
            "fkv backward under head parallelism with selection='layer': the selection spans ranks; train with "
            "a plan of selection='head' (or without a process group)")
    return semantics.keep_mask(k, s.plan, layer, q.shape[-2])


def store_attention(s: state.Session, site: int, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                    v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write: tuple[int, int],
                    window: tuple[int, int], protected: int, scale: float | None) -> torch.Tensor:
    """``fkv::store_attention``: the chunk's write and the window's attention, by the layer's store once the guard
    gives it one, else by ``select`` over the buffers (calibrating: the pipeline's write, then dense)."""
    window = served_window(site, layer, protected, *window)
    if s.plan is None:  # calibrating: the pipeline's own write into its dense cache, then the dense window
        entry = s.compact.enter(layer, cache_k, cache_v, q.device, write[0], False)
        write_chunk(cache_k, cache_v, k_new, v_new, *write)
        s.compact.wrote(layer, entry, cache_k, cache_v, write[0])
        k, v = (window_of(c, *window, 0) for c in (cache_k, cache_v))
        if s.calibrating(layer, q, k, scale):
            return dense(s, site, layer, q, k, v, scale)
    entry = entered(s, layer, cache_k, cache_v, q, write[0], window)
    if entry.store is None:
        out = select_over_cache(s, site, layer, q, k_new, v_new, cache_k, cache_v, write, window, 0, scale)
    else:
        out = serve(s, site, layer, entry.store, q, k_new, v_new, cache_k, cache_v, write, window, scale, protected)
        if entry.keeps_dense():  # watched, not yet released: the buffers stay what the pipeline expects
            write_chunk(cache_k, cache_v, k_new, v_new, *write)
    s.compact.wrote(layer, entry, cache_k, cache_v, write[0])
    return out


def staged_store_attention(s: state.Session, site: int, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                           v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, rolls: list[int],
                           write: tuple[int, int], window: tuple[int, int], protected: int,
                           scale: float | None) -> torch.Tensor:
    """``fkv::staged_store_attention``: the graph's rolls (``dst, src, src_end`` triples) and write on the clone of a
    staged cache, made by the store, the guard expecting the pipeline's own afterwards; a layer left dense reads a
    clone with the rolls and the write, as the graph did."""
    window = served_window(site, layer, protected, *window)
    triples = [(rolls[i], rolls[i + 1], rolls[i + 2] - rolls[i + 1]) for i in range(0, len(rolls), 3)]
    entry = entered(s, layer, cache_k, cache_v, q, write[0], window)
    s.compact.expect(layer, entry, triples, write, k_new, v_new)
    store = entry.store
    adopting = store is not None and store.chunk is None and bool(triples)  # a new store adopting a rolled history
    if store is None or adopting:  # the clone with the rolls, as the graph had it
        staged = [c.clone() for c in (cache_k, cache_v)]
        for dst, src, length in triples:
            roll_buffers(*staged, dst, src, length)
    if store is None:
        out = select_over_cache(s, site, layer, q, k_new, v_new, *staged, write, window, 0, scale,
                                (cache_k, cache_v))
    else:
        for dst, src, length in triples if store.chunk is not None else ():
            store.roll(dst, src, length)
        history = staged if adopting else (cache_k, cache_v)
        out = serve(s, site, layer, store, q, k_new, v_new, *history, write, window, scale, protected)
    s.compact.wrote(layer, entry, cache_k, cache_v, write[0])
    return out


def replay_write(s: state.Session, buffer: torch.Tensor, value: torch.Tensor, start: int, end: int) -> None:
    """``fkv::replay_write``: the pipeline's write-back of a staged cache, made, or checked against the store's."""
    def make() -> None:
        buffer[:, start:end] = value

    s.compact.replayed(buffer, write_step(start, end, value), make)


def replay_roll(s: state.Session, buffer: torch.Tensor, dst: int, src: int, length: int) -> None:
    """``fkv::replay_roll``: the pipeline's roll of a staged cache's buffer, made, or checked against the store's."""
    s.compact.replayed(buffer, roll_step(dst, src, length), lambda: shift(buffer, dst, src, length))


def store_roll(s: state.Session, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor, dst: int, src: int,
               length: int) -> None:
    """``fkv::store_roll``: the pipeline's eviction, on the layer's store, and on the buffers while they are kept."""
    entry = s.compact.enter(layer, cache_k, cache_v, cache_k.device, serve=s.plan is not None)
    if entry.store is not None and entry.store.chunk is not None:
        entry.store.roll(dst, src, length)
    if entry.keeps_dense():
        roll_buffers(cache_k, cache_v, dst, src, length)
    s.compact.wrote(layer, entry, cache_k, cache_v)


def store_grown_attention(s: state.Session, site: int, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                          v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                          scale: float | None, grown: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fkv::store_grown_attention``: the attention over ``cat([cache[:, :start], new])``, served by the store, and
    ``grown``, the K and V the pipeline keeps, released; calibrating: the pipeline's own concatenation, then dense
    attention over it (the concatenation returned instead)."""
    end = start + k_new.shape[1]
    if s.plan is None:
        k, v = (torch.cat([c[:, :start], new], 1) for c, new in ((cache_k, k_new), (cache_v, v_new)))
        if s.calibrating(layer, q, k.transpose(1, 2), scale):
            return dense(s, site, layer, q, k.transpose(1, 2), v.transpose(1, 2), scale), [k, v]
    out = serve(s, site, layer, s.compact.unwatched(layer, q.device), q, k_new, v_new, cache_k, cache_v, (start, end),
                (0, end), scale)
    s.compact.release_unwatched(layer, *grown)
    return out, grown
