"""Autograd through the compressed attention: select and oracle differentiate attention over the kept tokens
(the kept set a constant, as top-k's indices are), profile the dense attention; compact refuses clearly."""

import pytest
import torch
import torch.nn.functional as F
from rollouts import WINDOWED, mixed_plan, setup, to64

from fkv_compile import HeadPlan
from fkv_compile.config import Config
from fkv_compile.models import new_caches, rollout
from fkv_compile.modes.state import open_session
from fkv_compile.semantics import keep_mask, oracle_attention
from fkv_compile.tools.check import CONCLUSIVE, wrong_kept_sets
from fkv_compile.tools.testing import OracleAttentionMode, error_budget, max_abs_error

PLAN = HeadPlan.from_roles([["static", "dynamic", "dense"]], frame_tokens=6, chunk_frames=2, segments_per_frame=3)


def _grads(attention, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v)
    out.backward(grad_out)
    return out.detach(), (q.grad, k.grad, v.grad)


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (12, 60, 60))
    return q, k, v, torch.randn(2, 3, 12, 8, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["select_attention", "oracle_attention", "profile_attention"])
def test_op_gradients_equal_the_float64_masked_oracle(op, dtype):
    options = {"plan": PLAN, "lowering": "eager"}
    s = open_session(options, None, Config.from_options)
    s.new_site(graph=0, node="sdpa", pattern="cache-window", action="rewritten", layer_key="param")
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    q, k, v, grad_out = _inputs(dtype)
    plan = PLAN if op != "profile_attention" else HeadPlan.uniform("dense", num_layers=1, num_heads=3,
                                                                   frame_tokens=6, chunk_frames=2)

    def oracle(q, k, v):
        return oracle_attention(q, k, v, plan, 0)

    _, reference = _grads(oracle, q, k, v, grad_out)
    low = [x.to(dtype) for x in (q, k, v, grad_out)]
    _, independent = _grads(oracle, *low)  # masked SDPA's own autograd in the dtype
    budget = error_budget(independent, reference, floor=4 * torch.finfo(dtype).eps)
    out, got = _grads(lambda q, k, v: getattr(torch.ops.fkv, op)(q, k, v, key, s.id, 0, None), *low)
    for name, g, r in zip("qkv", got, reference):
        err = max_abs_error(g, r)
        assert err <= budget, f"d{name}: max abs error {err:.3e} exceeds the budget {budget:.3e}"
    if op == "profile_attention":  # dense attention, its forward bit-identical to SDPA's
        assert torch.equal(out, F.scaled_dot_product_attention(*low[:3]))
        return
    assert not bool(keep_mask(k, PLAN, 0, 12).all())
    effects = [max_abs_error(_grads(F.scaled_dot_product_attention, q, k, v, grad_out)[1], reference)]
    effects += [max_abs_error(_grads(lambda q, k, v: oracle_attention(q, k, v, wrong, 0), q, k, v, grad_out)[1],
                              reference) for wrong in wrong_kept_sets(PLAN).values()]
    assert min(effects) > CONCLUSIVE * budget, (effects, budget)


def _training_step(model, cfg, inputs, *, oracle_plan=None):
    """Self Forcing's generator step: the history chunks under no_grad, then the exit denoising step of the last
    chunk with autograd on; returns the output and the parameters' gradients."""
    history = type(inputs)(context=inputs.context, noise=inputs.noise[:-1], switches={})
    caches = new_caches(cfg, batch=inputs.context.shape[0], dtype=inputs.context.dtype)
    mode = OracleAttentionMode(oracle_plan, caches[0]) if oracle_plan is not None else None
    if mode is not None:
        mode.__enter__()
    try:
        rollout(model, cfg, history, caches=caches)
        x = inputs.noise[-1][0]
        t = torch.full((x.shape[0], cfg.chunk_frames), 750.0, dtype=x.dtype)
        flow = model(x, t, inputs.context, *caches, len(history.noise) * cfg.chunk_frames * cfg.frame_tokens)
        weights = torch.linspace(-1, 1, flow.numel(), dtype=x.dtype).reshape(flow.shape)  # a loss, never zeros
        (flow * weights).sum().backward()
    finally:
        if mode is not None:
            mode.__exit__(None, None, None)
    return flow.detach(), {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("mode,lowering", [("select", "aot_eager"), ("oracle", "aot_eager"), ("select", "inductor")])
def test_a_training_step_through_the_pass_equals_the_float64_oracle(mode, lowering):
    # under Inductor the backward op's outputs must have the strides its fake says: q, k and v are transposed views
    # of [B, L, H, D] buffers, as in the real models
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:5]  # 4 history chunks: the window rolls
    plan = mixed_plan(cfg)
    m64, in64 = to64(model, inputs)
    _, reference = _training_step(m64, cfg, in64, oracle_plan=plan)
    _, independent = _training_step(build_like(model), cfg, inputs, oracle_plan=plan)
    budget = error_budget(list(independent.values()), [reference[n] for n in independent], floor=1e-6)
    _, dense = _training_step(to64(model, inputs)[0], cfg, in64)
    effect = max_abs_error([dense[n] for n in reference], list(reference.values()))
    assert effect > CONCLUSIVE * budget, (effect, budget)
    compiled = torch.compile(build_like(model), backend="forcing_kv",
                             options={"plan": plan, "mode": mode, "lowering": lowering})
    _, got = _training_step(compiled, cfg, inputs)
    assert got.keys() == reference.keys()
    err = max_abs_error([got[n] for n in reference], list(reference.values()))
    assert err <= budget, f"{mode}: parameter gradients off by {err:.3e}, budget {budget:.3e} (dense: {effect:.3e})"


def test_compact_under_autograd_fails_at_the_first_call_naming_the_fix():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]
    compiled = torch.compile(model, backend="forcing_kv",
                             options={"plan": mixed_plan(cfg), "mode": "compact", "lowering": "aot_eager"})
    with pytest.raises(Exception, match="compact mode is inference-only.*torch.no_grad.*mode='select' for training"):
        _training_step(compiled, cfg, inputs)


def build_like(model):
    """A fresh copy of ``model`` (same weights, no gradients yet)."""
    from fkv_compile.models import build

    copy = build(model.cfg, dtype=next(model.parameters()).dtype)
    copy.load_state_dict(model.state_dict())
    return copy
