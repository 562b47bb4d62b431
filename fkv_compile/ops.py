"""Registration of the custom ops the pass rewrites graphs into: schemas, fakes, autograd; the bodies are
:mod:`fkv_compile.modes.calls`'s.

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

from collections.abc import Callable

import torch

from .modes import calls, state
from .modes.grad import attention_grads

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
    mask = calls.kept_mask(*state.resolve(session, site, layer_key), q, k) if masked else None
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
    layer resolved from ``layer_key``. While the session calibrates (no plan yet) the call runs
    :func:`fkv_compile.modes.calls.dense` instead."""

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
            return _attention_out(q, v, calls.dense(s, site, layer, q, k, v, scale))
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


select_attention = _attention_op(
    "select_attention", calls.select, "Each head attends only to the tokens its role keeps in the dense window k/v.",
    masked=True)
oracle_attention = _attention_op(
    "oracle_attention", calls.oracle, "Dense attention masked by the keep rule (fkv_compile.semantics.oracle_attention).",
    masked=True)
profile_attention = _attention_op(
    "profile_attention", calls.profile, "Dense attention, unchanged, plus the frame-level attention mass recorded.",
    masked=False)


OPS = {
    "select": torch.ops.fkv.select_attention.default,
    "oracle": torch.ops.fkv.oracle_attention.default,
    "profile": torch.ops.fkv.profile_attention.default,
}


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
    return _attention_out(q, v_new, calls.select_over_cache(s, site, layer, q, k_new, v_new, cache_k, cache_v,
                                                            (write_start, write_end), (window_start, window_end),
                                                            protected, scale))


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
    return _attention_out(q, v_new, calls.store_attention(s, site, layer, q, k_new, v_new, cache_k, cache_v,
                                                          (write_start, write_end), (window_start, window_end),
                                                          protected, scale))


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
    return _attention_out(q, v_new, calls.staged_store_attention(s, site, layer, q, k_new, v_new, cache_k, cache_v,
                                                                 rolls, (write_start, write_end),
                                                                 (window_start, window_end), protected, scale))


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
    calls.replay_write(state.running_session(session), buffer, value, start, end)
    return _token(buffer)


@torch.library.custom_op("fkv::replay_roll", mutates_args=())
def replay_roll(buffer: torch.Tensor, dst: int, src: int, src_end: int, after: list[torch.Tensor],
                session: int) -> torch.Tensor:
    """The pipeline's ``buffer[:, dst:dst + n] = buffer[:, src:src_end].clone()`` in a graph without attention, as
    :func:`replay_write`."""
    calls.replay_roll(state.running_session(session), buffer, dst, src, src_end - src)
    return _token(buffer)


@replay_write.register_fake
def _(buffer, value, start, end, after, session):
    return _token(buffer)


@replay_roll.register_fake
def _(buffer, dst, src, src_end, after, session):
    return _token(buffer)


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
    calls.store_roll(s, layer, cache_k, cache_v, dst, src, src_end - src)
    return _token(layer_key)


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
    grown = _grown(k_new, v_new, start)
    out, grown = calls.store_grown_attention(s, site, layer, q, k_new, v_new, cache_k, cache_v, start, scale, grown)
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
