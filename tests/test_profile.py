"""The profiler: frame mass, profile mode, classification of planted roles, stability."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rollouts import WINDOWED, run_compiled, setup

from fkv_compile import HeadPlan, PlanError
from fkv_compile.models import rollout
from fkv_compile.models.planted import PlantedAttentionStack, PlantedConfig, planted_rollout
from fkv_compile.modes.profile import MassRecord, frame_mass, tag
from fkv_compile.tools.profiling import Profile, ProfileSettings, collect


@given(b=st.integers(1, 2), h=st.integers(1, 3), f=st.integers(1, 6), n=st.integers(1, 6), lq=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_frame_mass_equals_the_full_softmax(b, h, f, n, lq, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(b, h, n * f, 8, generator=gen, dtype=torch.float64)
    full = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # [B, H, Lq, Lk]
    expected = full.sum(2).view(b, h, n, f).sum(-1)
    torch.testing.assert_close(frame_mass(q, k, f), expected, rtol=1e-12, atol=1e-12)
    # query blocks of two rows: streaming must not change the result
    torch.testing.assert_close(frame_mass(q, k, f, max_block_elements=2 * b * h * n * f), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_profile_mode_leaves_outputs_bit_identical_to_dense(lowering):
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    plan = HeadPlan.uniform("dense", num_layers=2, num_heads=2, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    _, dense = run_compiled(model, cfg, inputs, plan, "off", lowering=lowering)
    torch._dynamo.reset()
    compiled, profiled = run_compiled(model, cfg, inputs, plan, "profile", lowering=lowering)
    for a, b in zip(profiled, dense):
        assert torch.equal(a, b)
    profile = collect(compiled)
    # 6 chunks x 5 forwards x 2 layers, every call labelled with its chunk and step
    assert len(profile.records) == 60
    assert {r.labels["step"] for r in profile.records} == set(range(5))
    for r in profile.records:
        torch.testing.assert_close(r.mass.sum(-1), torch.ones(2, dtype=torch.float64))


def _planted(seed: int, layers: int = 3, heads: int = 4):
    rng = random.Random(seed)
    roles = tuple(tuple(rng.choice(["static", "dynamic"]) for _ in range(heads)) for _ in range(layers))
    return PlantedConfig(roles=roles)


@pytest.mark.parametrize("seed", [0, 1])
def test_profiler_recovers_planted_roles(seed):
    cfg = _planted(seed)
    torch.manual_seed(seed)
    model = PlantedAttentionStack(cfg).eval()
    geometry = HeadPlan.uniform("dense", num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                frame_tokens=cfg.frame_tokens, chunk_frames=cfg.chunk_frames)
    compiled = torch.compile(model, backend="forcing_kv",
                             options={"plan": geometry, "mode": "profile", "lowering": "aot_eager"})
    for sample in range(2):
        with tag(sample=sample):
            planted_rollout(compiled, cfg, seed=sample)
    profile = collect(compiled)
    plan = profile.plan(ProfileSettings(alpha=0.8))
    assert plan.roles == cfg.roles
    assert plan.provenance["settings"]["alpha"] == 0.8 and len(plan.provenance["scores"]) == cfg.num_layers
    summary = profile.stability().summary()
    assert set(summary) == {"sample", "chunk", "step", "alpha"}
    assert all(s["min_agreement"] == 1.0 for s in summary.values())


def _synthetic_profile(scores):
    """Records whose mass puts ``score`` of the non-sink mass on the last chunk + 1 frames."""
    layers, heads = len(scores), len(scores[0])
    records = []
    for layer in range(layers):
        mass = torch.zeros(heads, 10, dtype=torch.float64)
        for h, s in enumerate(scores[layer]):
            mass[h, 3:6] = (1 - s) / 3  # older frames
            mass[h, 6:] = s / 4  # transition frame + chunk of 3
        records.append(MassRecord(layer=layer, labels={}, mass=mass))
    return Profile(records, frame_tokens=4, chunk_frames=3, num_layers=layers, num_heads=heads)


def test_scores_budgets_and_forced_layers():
    profile = _synthetic_profile([[0.9, 0.85, 0.2], [0.95, 0.5, 0.81]])
    torch.testing.assert_close(profile.scores(), torch.tensor([[0.9, 0.85, 0.2], [0.95, 0.5, 0.81]], dtype=torch.float64))
    assert profile.roles() == [["static", "static", "dynamic"], ["static", "dynamic", "static"]]
    assert profile.roles(ProfileSettings(layer_static_budget=1)) == [["static", "dynamic", "dynamic"],
                                                                       ["static", "dynamic", "dynamic"]]
    assert profile.roles(ProfileSettings(static_budget=2)) == [["static", "dynamic", "dynamic"],
                                                                ["static", "dynamic", "dynamic"]]
    assert profile.roles(ProfileSettings(forced={0: "dense"}))[0] == ["dense"] * 3
    with pytest.raises(PlanError, match="forced layer 5"):
        profile.roles(ProfileSettings(forced={5: "static"}))


def test_windows_too_short_to_classify_are_a_clear_error():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    inputs.noise = inputs.noise[:2]  # 6 frames: nothing outside sink + chunk + transition
    plan = HeadPlan.uniform("dense", num_layers=2, num_heads=2, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "profile", "lowering": "aot_eager"})
    rollout(compiled, cfg, inputs)
    with pytest.raises(PlanError, match="run more chunks"):
        collect(compiled).plan()
