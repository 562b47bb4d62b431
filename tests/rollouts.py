"""Shared miniature setups, rollout runners and conclusive comparisons for the backend tests."""

from __future__ import annotations

import os

import torch

import fkv_compile.modes.calls
from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.modes.store import LayerStore
from fkv_compile.semantics import keep_mask, oracle_attention
from fkv_compile.tools.check import CONCLUSIVE, wrong_kept_sets
from fkv_compile.tools.testing import OracleAttentionMode, error_budget, max_abs_error

SEEN: list[tuple[str, str, float, float]] = []
"""What each conclusive comparison of this run could see: (test, dtype, budget, smallest effect); conftest prints it."""


def _seen(dtype: torch.dtype, budget: float, effect: float) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    SEEN.append((test, str(dtype).removeprefix("torch."), budget, effect))


WINDOWED = MiniConfig(num_layers=2, window_frames=12, sink_frames=3)
GLOBAL = MiniConfig(num_layers=2, window_frames=None, num_frames=21)
CHUNKS = {WINDOWED: 6, GLOBAL: 7}


def mixed_plan(cfg: MiniConfig, **params) -> HeadPlan:
    """Every role in every layer, different per layer (heads cycle through roles with the layer index)."""
    roles = ["static", "dynamic", "dense"]
    return HeadPlan.from_roles(
        [[roles[(layer + h) % 3] if cfg.num_heads > 2 else roles[(layer + h) % 2] for h in range(cfg.num_heads)]
         for layer in range(cfg.num_layers)],
        frame_tokens=cfg.frame_tokens, chunk_frames=cfg.chunk_frames, **params,
    )


def run_compiled(model, cfg, inputs, plan, mode, lowering="aot_eager", **compile_kw):
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": mode, "lowering": lowering},
                             **compile_kw)
    return compiled, rollout(compiled, cfg, inputs)


def run_eager_oracle(model, cfg, inputs, plan, run=rollout):
    caches = new_caches(cfg, batch=inputs.context.shape[0], dtype=inputs.context.dtype)
    with OracleAttentionMode(plan, caches[0]):
        return run(model, cfg, inputs, caches=caches)


def oracle_reference(model, cfg, inputs, plan, run=rollout) -> tuple[list[torch.Tensor], float]:
    """The float64 oracle rollout of ``plan`` and the error budget of ``model``'s dtype (twice the eager oracle's
    error in that dtype), asserted CONCLUSIVE times below every effect it must see: dense attention and each wrong
    kept set (one recent frame off, one segment fewer), all in float64. ``run``: the pipeline (a rollout function)."""
    m64, in64 = to64(model, inputs)
    reference = run_eager_oracle(m64, cfg, in64, plan, run)
    budget = error_budget(run_eager_oracle(model, cfg, inputs, plan, run), reference, floor=1e-6)
    effects = {"dense": max_abs_error(run(m64, cfg, in64), reference)}
    effects.update({name: max_abs_error(run_eager_oracle(m64, cfg, in64, wrong, run), reference)
                    for name, wrong in wrong_kept_sets(plan).items()})
    assert min(effects.values()) > CONCLUSIVE * budget, f"inconclusive: budget {budget:.3e}, effects {effects}"
    _seen(inputs.context.dtype, budget, min(effects.values()))
    return reference, budget


# one compressed attention call of a rollout: q, the dense window's k and v [B, H, L, D], layer, scale, output
Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None", torch.Tensor]


def record_select_calls(monkeypatch) -> list[Call]:
    """Record every ``select`` call the compiled model makes (its op body's inputs and output)."""
    calls, real = [], fkv_compile.modes.calls.compressed_attention

    def recording(q, k, v, plan, layer, scale=None, *args):
        out, kept = real(q, k, v, plan, layer, scale, *args)
        calls.append((q.clone(), k.clone(), v.clone(), layer, scale, out.clone()))
        return out, kept

    monkeypatch.setattr(fkv_compile.modes.calls, "compressed_attention", recording)
    return calls


def record_store_calls(monkeypatch) -> list[Call]:
    """Record every ``compact`` attention with the dense window it stands for, rebuilt from the writes and rolls
    the pass hands each store (a shadow of the released dense cache: the pipeline's own bookkeeping, in float64)."""
    calls, shadows = [], {}
    write, roll, attention = LayerStore.write, LayerStore.roll, LayerStore.attention

    def shadow_of(store, like, end):
        k = shadows.get(id(store))
        if k is None or k[0].shape[1] < end:
            grown = [like.new_zeros((like.shape[0], end, *like.shape[2:]), dtype=torch.float64) for _ in range(2)]
            if k is not None:
                for old, new in zip(k, grown):
                    new[:, :old.shape[1]] = old
            k = shadows[id(store)] = grown
        return k

    def recording_write(store, k, v, start, end, window, protected=0):
        for buffer, new in zip(shadow_of(store, k, end), (k, v)):
            buffer[:, start:end] = new.double()
        return write(store, k, v, start, end, window, protected)

    def recording_roll(store, dst, src, length):
        for buffer in shadows[id(store)]:
            buffer[:, dst:dst + length] = buffer[:, src:src + length].clone()
        return roll(store, dst, src, length)

    def recording_attention(store, q, window, scale):
        out = attention(store, q, window, scale)
        (a, e), (k, v) = window, shadows[id(store)]
        calls.append((q.clone(), k[:, a:e].transpose(1, 2).to(q.dtype), v[:, a:e].transpose(1, 2).to(q.dtype),
                      store.layer, scale, out.clone()))
        return out

    monkeypatch.setattr(LayerStore, "write", recording_write)
    monkeypatch.setattr(LayerStore, "roll", recording_roll)
    monkeypatch.setattr(LayerStore, "attention", recording_attention)
    return calls


def assert_calls_match_the_oracle_conclusively(calls: list[Call], plan: HeadPlan) -> None:
    """Each call against the float64 oracle on its own inputs, within the budget of an independent implementation in
    the call's dtype (masked SDPA); in every call that drops tokens, each effect the budget must see (dense; each
    wrong kept set) is CONCLUSIVE budgets or more. At least half the calls must drop tokens.

    Used where a whole rollout cannot tell compression from rounding (bf16, fp16: what compression changes in the
    outputs is below what the dtype rounds away over a rollout)."""
    seen = []  # (budget, smallest effect) of every compressing call
    for i, (q, k, v, layer, scale, out) in enumerate(calls):
        q64, k64, v64 = q.double(), k.double(), v.double()
        reference = oracle_attention(q64, k64, v64, plan, layer, scale)
        budget = error_budget(oracle_attention(q, k, v, plan, layer, scale), reference, floor=torch.finfo(q.dtype).eps)
        err = max_abs_error(out, reference)
        assert err <= budget, f"call {i} (layer {layer}): max abs error {err:.3e} exceeds the budget {budget:.3e}"
        if bool(keep_mask(k64, plan, layer, q.shape[2]).all()):
            continue  # a window too short to drop anything
        effects = {"dense": max_abs_error(torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, scale=scale),
                                          reference)}
        effects.update({name: max_abs_error(oracle_attention(q64, k64, v64, wrong, layer, scale), reference)
                        for name, wrong in wrong_kept_sets(plan).items()})
        assert min(effects.values()) > CONCLUSIVE * budget, f"call {i}: budget {budget:.3e}, effects {effects}"
        seen.append((budget, min(effects.values())))
    assert len(seen) >= len(calls) // 2 > 0, f"only {len(seen)} of {len(calls)} calls compress"
    _seen(calls[0][0].dtype, *min(seen, key=lambda pair: pair[1] / pair[0]))


def setup(cfg, dtype, *, batch=1, seed=0):
    model = build(cfg, seed=seed, dtype=dtype)
    inputs = make_inputs(cfg, batch=batch, chunks=CHUNKS.get(cfg, 6), seed=seed, dtype=dtype)
    return model, inputs


def to64(model, inputs):
    """The same weights and random inputs in float64 (the reference run)."""
    m64 = build(model.cfg, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    inputs64 = type(inputs)(context=inputs.context.double(), noise=[[n.double() for n in c] for c in inputs.noise],
                            switches={c: x.double() for c, x in inputs.switches.items()})
    return m64, inputs64


def cases(default: list[tuple[str, ...]], **axes: dict[str, object]) -> list:
    """pytest params over every combination of ``axes`` (name -> {id: value}). Combinations whose ids
    are not in ``default`` run only with ``--runslow``; ``default`` covers every value at least once."""
    import itertools

    import pytest

    params = []
    for combo in itertools.product(*(list(values.items()) for values in axes.values())):
        ids = tuple(i for i, _ in combo)
        marks = () if ids in default else (pytest.mark.slow,)
        params.append(pytest.param(*(v for _, v in combo), id="-".join(ids), marks=marks))
    return params


# the rollouts a low-precision test runs call by call (every config and dtype at least once by default)
LOW_PRECISION = cases([("windowed-sink", "bfloat16"), ("global", "float16")],
                      cfg={"windowed-sink": WINDOWED, "global": GLOBAL},
                      dtype={"bfloat16": torch.bfloat16, "float16": torch.float16})
