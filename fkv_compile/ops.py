"""Registration of the custom ops the pass rewrites graphs into (bodies live in :mod:`fkv_compile.modes`).

- ``fkv::select_attention``, ``fkv::oracle_attention``, ``fkv::profile_attention``: the SDPA operands
  in ``[B, H, L, D]``, a per-layer key tensor and the (session, site) ids baked into the graph;
- ``fkv::select_cache_attention`` (``select`` where the graph alone writes the chunk and reads the window): the
  chunk's cache write, made by the op, and the attention over the window; the buffers' version counters prove
  when a layer's kept ranges can be reused (:class:`fkv_compile.modes.select.SelectionMemo`);
- ``fkv::store_attention`` (``compact``): the chunk's cache write and the window's attention, served
  by the layer's compact store;
- ``fkv::store_roll`` (``compact``): the pipeline's eviction of history, on the store;
- ``fkv::staged_store_attention`` (``compact``): a staged cache (LongLive v1's clone, rolled and written, attended
  over), served by the store; ``fkv::replay_write`` and ``fkv::replay_roll``: the pipeline's own write and roll of
  the buffers afterwards, in a graph of its own, checked against the store's;
- ``fkv::store_grown_attention`` (``compact``): a cache grown by concatenation, served by the store;
- ``fkv::attention_backward``: the first three's backward (:mod:`fkv_compile.modes.grad`).

Fixed-arity schemas, each fake beside its op; the layer is resolved at run time from the key tensor
(:mod:`fkv_compile.modes.state`). Outputs are fresh contiguous tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import semantics
from .modes import state
from .modes.grad import attention_grads
from .modes.profile import record_call
from .modes.select import History, compressed_attention
from .modes.guard import CompactCache, roll_step, write_step
from .modes.store import LayerStore, StoreError

__all__ = ["select_attention", "oracle_attention", "profile_attention"]


def _attention_out(q: torch.Tensor, v: torch.Tensor, result: torch.Tensor | None = None) -> torch.Tensor:
    """The attention ops' output, ``[..., Lq, Dv]`` contiguous in q's dtype, for the fake (``result`` None: empty)
    and the real op (``result`` in that layout) alike, so that the two cannot drift apart: q and v are often
    transposed views of ``[B, L, H, D]`` buffers, whose strides the output must not take."""
    shape = (*q.shape[:-1], v.shape[-1])
    if result is None:
        return q.new_empty(shape)
    if tuple(result.shape) != shape or result.dtype != q.dtype:
        raise RuntimeError(f"fkv internal error: an attention op computed {tuple(result.shape)} {result.dtype}, its "
                           f"schema promises {shape} {q.dtype}")
    return result.contiguous()


def _token(like: torch.Tensor) -> torch.Tensor:
    """The empty tensor the cache-step ops return (real and fake) so that later ops can be ordered after them."""
    return like.new_empty(0)


AttentionBody = Callable[[state.Session, int, int, torch.Tensor, torch.Tensor, torch.Tensor, "float | None"],
                         torch.Tensor]


@torch.library.custom_op("fkv::attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_key: torch.Tensor,
    session: int,
    site: int,
    masked: bool,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of the attention ops: over the tokens the keep rule keeps (``masked``) or all (``profile``)."""
    mask = None
    if masked:
        s, layer = state.resolve(session, site, layer_key)
        if s.shard is not None and s.shard.spans(layer):
            raise NotImplementedError(
                "fkv backward under head parallelism with selection='layer': the selection spans ranks; train with "
                "a plan of selection='head' (or without a process group)")
        mask = semantics.keep_mask(k, s.plan, layer, q.shape[-2])
    grads = _grads_like(q, k, v)
    for out, grad in zip(grads, attention_grads(grad_out, q, k, v, mask, scale)):
        out.copy_(grad)
    return grads


def _grads_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's outputs, the real op's and the fake's alike: fresh contiguous tensors of q's, k's and v's
    shapes (q, k and v are often transposed views of ``[B, L, H, D]`` buffers: their strides are not the outputs')."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@attention_backward.register_fake
def _(grad_out, q, k, v, layer_key, session, site, masked, scale=None):
    return _grads_like(q, k, v)


def _attention_op(name: str, body: AttentionBody, doc: str, *, masked: bool):
    """Define ``fkv::<name>(q, k, v, layer_key, session, site, scale)`` with its fake and its backward
    (:mod:`fkv_compile.modes.grad`, over the kept tokens if ``masked``); ``body`` gets the session, site and the
    layer resolved from ``layer_key``. While the session calibrates (no plan yet) the call runs :func:`_dense`
    instead."""

    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_key: torch.Tensor,
        session: int,
        site: int,
        scale: float | None = None,
    ) -> torch.Tensor:
        s, layer = state.resolve(session, site, layer_key)
        if s.calibrating(layer, q, k, scale):
            return _attention_out(q, v, _dense(s, site, layer, q, k, v, scale))
        return _attention_out(q, v, body(s, site, layer, q, k, v, scale))

    op.__doc__ = doc
    registered = torch.library.custom_op(f"fkv::{name}", op, mutates_args=())
    registered.register_fake(lambda q, k, v, layer_key, session, site, scale=None: _attention_out(q, v))

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, layer_key, session, site, scale = inputs[:7]
        ctx.save_for_backward(q, k, v, layer_key)
        ctx.ids, ctx.scale = (session, site), scale
        ctx.masked = masked and state.running_session(session).plan is not None  # a calibrating call ran dense

    def backward(ctx, grad_out):
        q, k, v, layer_key = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, layer_key, *ctx.ids, ctx.masked, ctx.scale)
        return dq, dk, dv, None, None, None, None

    registered.register_autograd(backward, setup_context=setup_context)
    return registered


def _select(s: state.Session, site: int, layer: int, q, k, v, scale, history: History | None = None):
    if not k.untyped_storage().nbytes():
        raise RuntimeError(
            f"fkv select_attention (site {site}, layer {layer}): the KV cache buffer was released by compact mode at "
            "another site of this layer, but this site could not be served compactly (see fkv_compile.report); "
            "compile with mode='select' for this model"
        )
    if not _in_order(s, site, layer, q, k, v):
        return _out_of_order(s, site, layer, q, k, v, scale)
    out, kept = compressed_attention(q, k, v, s.plan, layer, scale, s.kernels(q.device), s.shard, s.selections,
                                     history)
    s.record(site, layer, kept.kept, kept.window, kept.layout_fits)
    return out


def _oracle(s: state.Session, site: int, layer: int, q, k, v, scale):
    if not _in_order(s, site, layer, q, k, v):
        return _out_of_order(s, site, layer, q, k, v, scale)
    plan = s.plan
    mask = semantics.keep_mask(k, plan, layer, q.shape[-2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, None, :], scale=scale)
    fits = semantics.window_layout(q.shape[-2], k.shape[-2], plan.frame_tokens, plan.chunk_frames) is not None
    s.record(site, layer, tuple(mask.sum(-1).float().mean(0).tolist()), k.shape[-2], fits)
    return out


def _in_order(s: state.Session, site: int, layer: int, q, k, v) -> bool:
    """Whether the keep rule's positions apply: proven at run time for a window written outside the graph
    (:mod:`fkv_compile.modes.order`), by the pass elsewhere."""
    return not s.sites[site].checks_order or s.order.sampled(layer, k, v, q.shape[-2], s.plan.frame_tokens)


def _out_of_order(s: state.Session, site: int, layer: int, q, k, v, scale):
    """A window not in written order: the model's own attention, counted apart in the report."""
    s.selections.forget(layer)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    s.record(site, layer, (float(k.shape[-2]),) * q.shape[1], k.shape[-2], True, ordered=False)
    return out


def _dense(s: state.Session, site: int, layer: int, q, k, v, scale):
    """The model's own attention: ``profile``'s, and a calibrating call's (``Session.calibrating`` recorded it)."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    s.record(site, layer, (float(k.shape[-2]),) * q.shape[1], k.shape[-2], True)
    return out


def _profile(s: state.Session, site: int, layer: int, q, k, v, scale):
    record_call(s.profile_records, layer, q, k, scale, s.plan.frame_tokens, s.plan.chunk_frames)
    return _dense(s, site, layer, q, k, v, scale)


select_attention = _attention_op(
    "select_attention", _select, "Each head attends only to the tokens its role keeps in the dense window k/v.",
    masked=True)
oracle_attention = _attention_op(
    "oracle_attention", _oracle, "Dense attention masked by the keep rule (fkv_compile.semantics.oracle_attention).",
    masked=True)
profile_attention = _attention_op(
    "profile_attention", _profile, "Dense attention, unchanged, plus the frame-level attention mass recorded.",
    masked=False)


OPS = {
    "select": torch.ops.fkv.select_attention.default,
    "oracle": torch.ops.fkv.oracle_attention.default,
    "profile": torch.ops.fkv.profile_attention.default,
}


def _window(cache: torch.Tensor, start: int, end: int, protected: int) -> torch.Tensor:
    """The window ``cache[:, start:end]`` ``[B, L, H, D]`` as the attention reads it, ``[B, H, L, D]``: after the sink
    ``cache[:, :protected]`` when ``protected`` (LongLive's cat-window)."""
    window = cache[:, start:end]
    if protected:
        window = torch.cat([cache[:, :protected], window], 1)
    return window.transpose(1, 2)


@torch.library.custom_op("fkv::select_cache_attention", mutates_args=())
def select_cache_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    layer_key: torch.Tensor,
    write_start: int,
    write_end: int,
    window_start: int,
    window_end: int,
    protected: int,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``select`` where the graph's only accesses of its caches are the chunk's write and the window read: the op
    makes the write ``cache[:, write_start:write_end] = k_new`` itself, then attends over the window. Between its
    writes the buffers' version counters prove whether the history is the one the layer's kept ranges were chosen
    from; anything else that wrote them (eager code, another graph, another video's buffers) makes the call choose
    anew.

    No mutation is declared, as for ``store_attention``: the pass erased the graph's own write, so the graph neither
    reads nor writes the caches but through this op, and the pipeline sees them written as before.
    """
    s, layer = state.resolve(session, site, layer_key)
    return _attention_out(q, v_new, _select_over_cache(s, site, layer, q, k_new, v_new, cache_k, cache_v,
                                                       (write_start, write_end), (window_start, window_end),
                                                       protected, scale))


def _write(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, start: int,
           end: int) -> None:
    """The pipeline's own write of the chunk into its dense buffers."""
    cache_k[:, start:end] = k_new
    cache_v[:, start:end] = v_new


def _select_over_cache(s: state.Session, site: int, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                       v_new: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, write: tuple[int, int],
                       window: tuple[int, int], protected: int, scale: float | None,
                       history: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The chunk's write, made here between the memo's two looks at the buffers, then ``select`` over the window.
    ``history``: the pipeline's buffers whose history ``cache_k``/``cache_v`` hold (a staged clone's), for the
    window's order."""
    s.selections.before_write(layer, cache_k, cache_v)
    _write(cache_k, cache_v, k_new, v_new, *write)
    s.selections.after_write(layer, cache_k, cache_v)
    k, v = (_window(c, *window, protected) for c in (cache_k, cache_v))
    ordered = s.order.written(layer, *(history or (cache_k, cache_v)), write, window[1], k.shape[2], q.shape[2])
    if s.calibrating(layer, q, k, scale):
        return _dense(s, site, layer, q, k, v, scale)
    if not ordered:
        return _out_of_order(s, site, layer, q, k, v, scale)
    return _select(s, site, layer, q, k, v, scale, (write[0], window[0]))


@select_cache_attention.register_fake
def _(q, k_new, v_new, cache_k, cache_v, layer_key, write_start, write_end, window_start, window_end, protected,
      session, site, scale=None):
    return _attention_out(q, v_new)


@torch.library.custom_op("fkv::store_attention", mutates_args=())
def store_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    layer_key: torch.Tensor,
    after: list[torch.Tensor],
    write_start: int,
    write_end: int,
    window_start: int,
    window_end: int,
    protected: int,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``compact``: the cache write ``cache[:, write_start:write_end] = k_new`` and the attention of ``q``
    over ``cache[:, window_start:window_end]`` (after the sink ``cache[:, :protected]`` if ``protected``:
    LongLive's cat-window), served by the layer's compact store.

    No mutation is declared: a declared one would make AOT functionalization clone the cache and
    copy it back, touching the released buffers. Order and liveness come from data instead: the
    output is used, and ``after`` holds the tokens of the rolls that must run first.
    ``cache_k``/``cache_v`` are kept and written here until :class:`fkv_compile.modes.guard.CompactCaches` proved
    that nothing else writes them (a watched video; option ``release``), then released (storage resized to 0);
    buffers written elsewhere keep the dense cache and the layer runs ``select`` over them.
    """
    s, layer = state.resolve(session, site, layer_key)
    window = _served_window(site, layer, protected, window_start, window_end)
    write = (write_start, write_end)
    if s.plan is None:  # calibrating: the pipeline's own write into its dense cache, then the dense window
        entry = s.compact.enter(layer, cache_k, cache_v, q.device, write_start, False)
        _write(cache_k, cache_v, k_new, v_new, write_start, write_end)
        s.compact.wrote(layer, entry, cache_k, cache_v, write_start)
        k, v = (_window(c, *window, 0) for c in (cache_k, cache_v))
        if s.calibrating(layer, q, k, scale):
            return _attention_out(q, v_new, _dense(s, site, layer, q, k, v, scale))
    entry = _entered(s, layer, cache_k, cache_v, q, write_start, window)
    if entry.store is None:
        out = _select_over_cache(s, site, layer, q, k_new, v_new, cache_k, cache_v, write, window, 0, scale)
    else:
        out = _serve(s, site, layer, entry.store, q, k_new, v_new, cache_k, cache_v, write, window, scale, protected)
        if entry.keeps_dense():  # watched, not yet released: the buffers stay what the pipeline expects
            _write(cache_k, cache_v, k_new, v_new, write_start, write_end)
    s.compact.wrote(layer, entry, cache_k, cache_v, write_start)
    return _attention_out(q, v_new, out)


def _served_window(site: int, layer: int, protected: int, window_start: int, window_end: int) -> tuple[int, int]:
    """The window a store serves: ``[0, window_end)`` for a cat-window whose sink ``[0, protected)`` the window
    follows (LongLive's cache is as long as its attention window); any other cat-window is an error."""
    if protected and window_start != protected:
        raise StoreError(
            f"fkv compact (site {site}, layer {layer}): the attention reads the sink [0, {protected}) and the window "
            f"[{window_start}, {window_end}), which does not follow it; compact serves cat(sink, window) only as one "
            "window (a cache as long as the attention window, as LongLive's); compile with mode='select'")
    return (0 if protected else window_start), window_end


def _entered(s: state.Session, layer: int, cache_k: torch.Tensor, cache_v: torch.Tensor, q: torch.Tensor,
             write_start: int, window: tuple[int, int]) -> CompactCache:
    """The guard's entry of these buffers for a call that writes at ``write_start``; a call the keep rule leaves
    dense (it needs the dense history) leaves the layer dense."""
    entry = s.compact.enter(layer, cache_k, cache_v, q.device, write_start, serve=s.plan is not None)
    if entry.store is not None and not _fits(s, q, window):
        s.compact.leave_dense(layer, entry, f"a call of {q.shape[2]} query tokens over a window of "
                              f"{window[1] - window[0]} tokens does not fit the plan's chunks (a short last chunk?): "
                              "the keep rule leaves it dense, which needs the dense history")
    return entry


@torch.library.custom_op("fkv::staged_store_attention", mutates_args=())
def staged_store_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    layer_key: torch.Tensor,
    rolls: list[int],
    write_start: int,
    write_end: int,
    window_start: int,
    window_end: int,
    protected: int,
    session: int,
    site: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``compact`` for a staged cache (LongLive v1): the graph made ``rolls`` (``dst, src, src_end`` triples) and the
    write ``[write_start, write_end) = k_new`` on a clone of ``cache_k`` (and V), then attended over its window; the
    pipeline makes the same roll and write on the buffers afterwards (``fkv::replay_write``, ``fkv::replay_roll``).
    The store makes them here and the guard expects the pipeline's; the buffers are never written here. A layer
    left dense reads a clone with the rolls and the write, as the graph did."""
    s, layer = state.resolve(session, site, layer_key)
    window, write = _served_window(site, layer, protected, window_start, window_end), (write_start, write_end)
    triples = [(rolls[i], rolls[i + 1], rolls[i + 2] - rolls[i + 1]) for i in range(0, len(rolls), 3)]
    entry = _entered(s, layer, cache_k, cache_v, q, write_start, window)
    s.compact.expect(layer, entry, triples, write, k_new, v_new)
    store = entry.store
    adopting = store is not None and store.chunk is None and bool(triples)  # a new store adopting a rolled history
    if store is None or adopting:  # the clone with the rolls, as the graph had it
        staged = [c.clone() for c in (cache_k, cache_v)]
        for dst, src, length in triples:
            _roll(*staged, dst, src, length)
    if store is None:
        out = _select_over_cache(s, site, layer, q, k_new, v_new, *staged, write, window, 0, scale,
                                 (cache_k, cache_v))
    else:
        for dst, src, length in triples if store.chunk is not None else ():
            store.roll(dst, src, length)
        history = staged if adopting else (cache_k, cache_v)
        out = _serve(s, site, layer, store, q, k_new, v_new, *history, write, window, scale, protected)
    s.compact.wrote(layer, entry, cache_k, cache_v, write_start)
    return _attention_out(q, v_new, out)


@staged_store_attention.register_fake
def _(q, k_new, v_new, cache_k, cache_v, layer_key, rolls, write_start, write_end, window_start, window_end, protected,
      session, site, scale=None):
    return _attention_out(q, v_new)


@torch.library.custom_op("fkv::replay_write", mutates_args=())
def replay_write(buffer: torch.Tensor, value: torch.Tensor, start: int, end: int, after: list[torch.Tensor],
                 session: int) -> torch.Tensor:
    """The pipeline's ``buffer[:, start:end] = value`` in a graph without attention (LongLive v1's write-back of a
    staged cache): made, or, for a buffer compact released, checked against what the store made
    (:meth:`fkv_compile.modes.guard.CompactCaches.replayed`). Returns a token; ``after``: the tokens of the steps on
    the same buffer before it. No mutation is declared (the buffer may be released: see ``store_attention``)."""
    def make() -> None:
        buffer[:, start:end] = value

    state.running_session(session).compact.replayed(buffer, write_step(start, end, value), make)
    return _token(buffer)


@torch.library.custom_op("fkv::replay_roll", mutates_args=())
def replay_roll(buffer: torch.Tensor, dst: int, src: int, src_end: int, after: list[torch.Tensor],
                session: int) -> torch.Tensor:
    """The pipeline's ``buffer[:, dst:dst + n] = buffer[:, src:src_end].clone()`` in a graph without attention, as
    :func:`replay_write`."""
    length = src_end - src
    make = functools.partial(_shift, buffer, dst, src, length)
    state.running_session(session).compact.replayed(buffer, roll_step(dst, src, length), make)
    return _token(buffer)


@replay_write.register_fake
def _(buffer, value, start, end, after, session):
    return _token(buffer)


@replay_roll.register_fake
def _(buffer, dst, src, src_end, after, session):
    return _token(buffer)


def _fits(s: state.Session, q: torch.Tensor, window: tuple[int, int]) -> bool:
    """Whether the call's query and window fit the plan's geometry (else the keep rule leaves it dense)."""
    plan = s.plan
    return semantics.window_layout(q.shape[2], window[1] - window[0], plan.frame_tokens, plan.chunk_frames) is not None


def _serve(s: state.Session, site: int, layer: int, store: LayerStore, q: torch.Tensor, k_new: torch.Tensor,
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


@store_attention.register_fake
def _(q, k_new, v_new, cache_k, cache_v, layer_key, after, write_start, write_end, window_start, window_end, protected,
      session, site, scale=None):
    return _attention_out(q, v_new)


@torch.library.custom_op("fkv::store_roll", mutates_args=())
def store_roll(
    layer_key: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, dst: int, src: int, src_end: int,
    session: int, site: int,
) -> torch.Tensor:
    """``compact``: the pipeline's eviction ``cache[:, dst:dst + n] = cache[:, src:src_end].clone()``, on the
    layer's store, or on the dense cache itself while the layer has no store yet (calibration).

    Returns an empty token that the site's ``store_attention`` takes, so the roll runs before it.
    """
    s, layer = state.resolve(session, site, layer_key)
    length = src_end - src
    entry = s.compact.enter(layer, cache_k, cache_v, layer_key.device, serve=s.plan is not None)
    if entry.store is not None and entry.store.chunk is not None:
        entry.store.roll(dst, src, length)
    if entry.keeps_dense():
        _roll(cache_k, cache_v, dst, src, length)
    s.compact.wrote(layer, entry, cache_k, cache_v)
    return _token(layer_key)


def _shift(buffer: torch.Tensor, dst: int, src: int, length: int) -> None:
    """The pipeline's own eviction on a dense buffer: ``buffer[:, dst:dst + n] = buffer[:, src:src + n].clone()``."""
    buffer[:, dst : dst + length] = buffer[:, src : src + length].clone()


def _roll(cache_k: torch.Tensor, cache_v: torch.Tensor, dst: int, src: int, length: int) -> None:
    """The pipeline's own eviction on its dense K and V buffers."""
    for cache in (cache_k, cache_v):
        _shift(cache, dst, src, length)


@store_roll.register_fake
def _(layer_key, cache_k, cache_v, dst, src, src_end, session, site):
    return _token(layer_key)


def _no_autograd_in_compact(ctx, inputs, output) -> None:
    raise RuntimeError(
        "fkv compact mode is inference-only: an input of a compacted attention requires grad (autograd is on and "
        "the model's parameters or inputs require grad), but the compact store keeps no differentiable history; "
        "run the rollout under torch.no_grad() or torch.inference_mode(), or compile with mode='select' for "
        "training (select and oracle are differentiable)"
    )


def _no_autograd_over_own_writes(ctx, inputs, output) -> None:
    raise RuntimeError(
        "fkv select_cache_attention writes the chunk into the cache itself and is chosen only for graphs traced "
        "without autograd, but it ran with an input that requires grad; compile the model anew (dynamo traces a "
        "graph per grad mode)"
    )


@torch.library.custom_op("fkv::store_grown_attention", mutates_args=())
def store_grown_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    layer_key: torch.Tensor,
    start: int,
    session: int,
    site: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``compact`` for a cache grown by concatenation: ``k = cat([cache_k[:, :start], k_new], 1)`` (and v) and the
    attention of ``q`` over it, served by the layer's store. Returns the output and the grown K and V the pipeline
    keeps as its next cache, released (their storage is 0 bytes: the store holds what the keep rule needs; the
    next call reads only their length)."""
    s, layer = state.resolve(session, site, layer_key)
    end = start + k_new.shape[1]
    if s.plan is None:  # calibrating: the pipeline's own concatenation, then dense attention over it
        k, v = (torch.cat([c[:, :start], new], 1) for c, new in ((cache_k, k_new), (cache_v, v_new)))
        if s.calibrating(layer, q, k.transpose(1, 2), scale):
            out = _dense(s, site, layer, q, k.transpose(1, 2), v.transpose(1, 2), scale)
            return _attention_out(q, v_new, out), k, v
    out = _serve(s, site, layer, s.compact.unwatched(layer, q.device), q, k_new, v_new, cache_k, cache_v, (start, end),
                 (0, end), scale)
    grown = _grown(k_new, v_new, start)
    s.compact.release_unwatched(layer, *grown)
    return _attention_out(q, v_new, out), *grown


@store_grown_attention.register_fake
def _(q, k_new, v_new, cache_k, cache_v, layer_key, start, session, site, scale=None):
    return _attention_out(q, v_new), *_grown(k_new, v_new, start)


def _grown(k_new: torch.Tensor, v_new: torch.Tensor, start: int) -> list[torch.Tensor]:
    """The grown K and V ``store_grown_attention`` returns, real (then released) and fake alike: ``start`` tokens of
    history and the new ones."""
    return [new.new_empty((new.shape[0], start + new.shape[1], *new.shape[2:])) for new in (k_new, v_new)]


for _op in (store_attention, staged_store_attention, store_grown_attention):
    _op.register_autograd(lambda ctx, *grads: None, setup_context=_no_autograd_in_compact)
select_cache_attention.register_autograd(lambda ctx, *grads: None, setup_context=_no_autograd_over_own_writes)

OPS["compact"] = torch.ops.fkv.store_attention.default
GROWN_OP = torch.ops.fkv.store_grown_attention.default
ROLL_OP = torch.ops.fkv.store_roll.default
STAGED_OP = torch.ops.fkv.staged_store_attention.default
REPLAY_WRITE_OP = torch.ops.fkv.replay_write.default
REPLAY_ROLL_OP = torch.ops.fkv.replay_roll.default
SELECT_CACHE_OP = torch.ops.fkv.select_cache_attention.default
