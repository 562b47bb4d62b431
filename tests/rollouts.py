"""Shared miniature setups and rollout runners for the backend tests."""

from __future__ import annotations

import torch

from fkv_compile import HeadPlan
from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout
from fkv_compile.tools.testing import OracleAttentionMode

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


def run_eager_oracle(model, cfg, inputs, plan):
    caches = new_caches(cfg, batch=inputs.context.shape[0], dtype=inputs.context.dtype)
    with OracleAttentionMode(plan, caches[0]):
        return rollout(model, cfg, inputs, caches=caches)


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
