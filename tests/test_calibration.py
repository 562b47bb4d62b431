"""No options: a model compiled without a plan runs its first video dense, makes a plan, then compresses."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from rollouts import GLOBAL, WINDOWED, oracle_reference, setup
from torch import nn

import fkv_compile
from fkv_compile import HeadPlan, PlanError, is_released, plan_of
from fkv_compile.models import make_inputs, rollout
from fkv_compile.tools.testing import assert_within_budget, max_abs_error


def _off(model, cfg, inputs, lowering="aot_eager"):
    torch._dynamo.reset()
    off = torch.compile(model, backend="forcing_kv", options={"mode": "off", "lowering": lowering})
    return rollout(off, cfg, inputs)


def _calibrating(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="forcing_kv", options={"lowering": "aot_eager", **options})


@pytest.mark.parametrize("cfg", [pytest.param(GLOBAL, marks=pytest.mark.slow), WINDOWED], ids=["global", "windowed-sink"])
def test_no_options_first_video_is_dense_then_the_calibrated_plan_matches_its_oracle(cfg):
    model, first = setup(cfg, torch.float32)
    second = setup(cfg, torch.float32, seed=1)[1]
    dense = _off(model, cfg, first)
    compiled = _calibrating(model)

    calibrating = rollout(compiled, cfg, first)
    assert all(torch.equal(a, b) for a, b in zip(calibrating, dense)), "the calibration video must equal mode 'off'"
    assert plan_of(compiled) is None
    assert "running dense and recording" in fkv_compile.report(compiled, print_table=False).calibration

    graphs = fkv_compile.report(compiled, print_table=False).graphs
    with torch.compiler.set_stance("fail_on_recompile"):
        compressed = rollout(compiled, cfg, second)
    plan = plan_of(compiled)
    assert (plan.frame_tokens, plan.chunk_frames, plan.num_layers, plan.num_heads) == (
        cfg.frame_tokens, cfg.chunk_frames, cfg.num_layers, cfg.num_heads)
    assert plan.provenance["source"] == "fkv_compile.calibration"
    reference, budget = oracle_reference(model, cfg, second, plan)
    assert_within_budget(compressed, reference, budget, what="calibrated select vs the fp64 oracle of its plan")
    rep = fkv_compile.report(compiled, print_table=False)
    assert rep.graphs == graphs
    assert "plan made after" in rep.calibration and "a new video started" in rep.calibration
    assert all(r.mode == "select" and r.kept_ratio < 1 for r in rep.layers)


def test_compact_calibrates_then_releases_the_dense_cache_and_matches_the_oracle():
    """Under Inductor (the custom ops' outputs must match their fakes' layout in the calibrating path too)."""
    cfg = WINDOWED
    model, first = setup(cfg, torch.float32)
    second = setup(cfg, torch.float32, seed=1)[1]
    dense = _off(model, cfg, first, lowering="inductor")
    compiled = _calibrating(model, mode="compact", lowering="inductor", calibration={"alpha": 0.495})  # both roles
    assert all(torch.equal(a, b) for a, b in zip(rollout(compiled, cfg, first), dense))
    assert not fkv_compile.memory_report(compiled).rows  # no store while calibrating

    from fkv_compile.models import new_caches

    caches = new_caches(cfg, batch=1, dtype=torch.float32)
    compressed = rollout(compiled, cfg, second, caches=caches)
    plan = plan_of(compiled)
    assert plan.count("static") and plan.count("dynamic"), plan.roles
    reference, budget = oracle_reference(model, cfg, second, plan)
    assert_within_budget(compressed, reference, budget, what="calibrated compact vs the fp64 oracle of its plan")
    assert all(is_released(c["k"]) and is_released(c["v"]) for c in caches[0])
    assert 0 < fkv_compile.memory_report(compiled).compact_bytes < fkv_compile.memory_report(compiled).dense_bytes


def test_a_chunk_count_ends_calibration_within_the_video():
    """calibration={"chunks": 4}: chunks 0-3 dense (bit-identical to off), compressed from chunk 4 on (chunks 3 and 4
    have windows of the same length: the rolling window is full); compact adopts the dense window's history at the
    switch and then serves exactly what select keeps."""
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    dense = _off(model, cfg, inputs)
    options = {"calibration": {"chunks": 4, "alpha": 0.495}}
    outputs = {}
    for mode in ("select", "compact"):
        compiled = _calibrating(model, mode=mode, **options)
        outputs[mode] = rollout(compiled, cfg, inputs)
        assert all(torch.equal(a, b) for a, b in zip(outputs[mode][:4], dense[:4])), mode
        assert "after 4 chunks (4 chunks ran)" in fkv_compile.report(compiled, print_table=False).calibration
    effect = max_abs_error(outputs["select"][4:], dense[4:])
    err = max_abs_error(outputs["compact"], outputs["select"])
    assert effect > 1e-3 and err < effect / 1000, f"compact vs select {err:.2e}, compression changed {effect:.2e}"


class _FunctionalPatches(nn.Module):
    """A patch embedding that is not an nn.Conv3d module: nothing tells the geometry."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.weight, self.bias, self.stride = conv.weight, conv.bias, conv.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight, self.bias, self.stride)


def test_geometry_that_cannot_be_inferred_is_a_clear_error_naming_the_two_options():
    cfg = WINDOWED
    model, inputs = setup(cfg, torch.float32)
    model.patch_embedding = _FunctionalPatches(model.patch_embedding)
    with pytest.raises(Exception, match="pass options frame_tokens .* and chunk_frames"):
        rollout(_calibrating(model), cfg, inputs)
    options = {"frame_tokens": cfg.frame_tokens, "chunk_frames": cfg.chunk_frames, "calibration": {"chunks": 3}}
    compiled = _calibrating(model, **options)
    inputs.noise = inputs.noise[:4]  # the plan is made as the fourth chunk starts
    rollout(compiled, cfg, inputs)
    assert plan_of(compiled).frame_tokens == cfg.frame_tokens and "the options" in plan_of(compiled).provenance["geometry"]


def test_the_patch_embedding_hook_reads_the_true_geometry_and_removes_itself():
    cfg = GLOBAL.__class__(num_layers=2, window_frames=None, num_frames=12, chunk_frames=2, latent_height=8,
                           latent_width=16)
    model, inputs = setup(cfg, torch.float32)
    compiled = _calibrating(model)
    rollout(compiled, cfg, inputs)
    g = fkv_compile.modes.state.session_of_compiled(compiled).calibrator.geometry
    assert (g.frame_tokens, g.chunk_frames) == (cfg.frame_tokens, cfg.chunk_frames) == (32, 2)
    assert "patch_embedding (Conv3d)" in g.source
    assert not model.patch_embedding._forward_hooks


class TracedPatches(nn.Module):
    """A one-layer AR model traced whole by dynamo: Conv3d patches -> tokens -> attention over a slot cache."""

    def __init__(self, heads: int, dim: int = 48):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv3d(4, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)  # [B, L, C]
        b, n = h.shape[:2]
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, -1).unbind(2)
        cache_k[:, start:start + n] = k
        cache_v[:, start:start + n] = v
        window = (t[:, : start + n].transpose(1, 2) for t in (cache_k, cache_v))
        return F.scaled_dot_product_attention(q.transpose(1, 2), *window)


def _run_traced(compiled, heads: int, chunks: int) -> None:
    x = torch.randn(1, 4, 2, 8, 12)  # [B, C_in, F=2, H, W]: 2 frames of 4 x 6 = 24 tokens per chunk
    cache = [torch.zeros(1, chunks * 48, heads, 48 // heads) for _ in range(2)]
    for chunk in range(chunks):
        compiled(x + chunk, *cache, chunk * 48)


def test_a_traced_patch_embedding_gives_the_geometry_and_adapts_a_bundled_plan():
    torch.manual_seed(0)
    compiled = _calibrating(TracedPatches(heads=2))
    _run_traced(compiled, heads=2, chunks=2)
    g = fkv_compile.modes.state.session_of_compiled(compiled).calibrator.geometry
    assert (g.frame_tokens, g.chunk_frames) == (24, 2) and "(traced)" in g.source

    compiled = _calibrating(TracedPatches(heads=12, dim=96), plan="self-forcing")  # native: 1560 tokens per frame
    x = torch.randn(1, 4, 2, 8, 12)
    compiled(x, *(torch.zeros(1, 288, 12, 8) for _ in range(2)), 0)
    assert (plan_of(compiled).frame_tokens, plan_of(compiled).chunk_frames) == (24, 2)
    with pytest.raises(Exception, match="frame_tokens: plan has 1560"):  # explicit geometry wins and is checked
        explicit = _calibrating(TracedPatches(heads=12, dim=96), plan="self-forcing", frame_tokens=1560)
        explicit(x, *(torch.zeros(1, 288, 12, 8) for _ in range(2)), 0)


def test_a_saved_calibrated_plan_compiles_the_model_again_without_calibration(tmp_path):
    cfg = WINDOWED
    model, first = setup(cfg, torch.float32)
    second = setup(cfg, torch.float32, seed=1)[1]
    compiled = _calibrating(model)
    rollout(compiled, cfg, first)
    calibrated = rollout(compiled, cfg, second)
    plan_of(compiled).save(tmp_path / "plan.json")
    again = _calibrating(model, plan=str(tmp_path / "plan.json"))
    assert HeadPlan.load(tmp_path / "plan.json").roles == plan_of(compiled).roles
    assert max_abs_error(rollout(again, cfg, second), calibrated) == 0.0
    assert fkv_compile.report(again, print_table=False).calibration == ""



def test_calibration_recovers_planted_roles_as_fkv_profile_does():
    from fkv_compile.models.planted import PlantedAttentionStack, PlantedConfig, planted_rollout

    roles = tuple(tuple("static" if (layer + h) % 3 == 0 else "dynamic" for h in range(4)) for layer in range(3))
    cfg = PlantedConfig(roles=roles, num_frames=15)
    torch.manual_seed(0)
    model = PlantedAttentionStack(cfg).eval()  # no patch embedding: the geometry comes from the options
    compiled = _calibrating(model, frame_tokens=cfg.frame_tokens, chunk_frames=cfg.chunk_frames)
    planted_rollout(compiled, cfg, seed=0, steps=1)
    assert plan_of(compiled) is None
    planted_rollout(compiled, cfg, seed=1, steps=1)  # a new video: the plan is made at its first call
    assert plan_of(compiled).roles == roles


def test_a_bundled_plan_takes_the_geometry_its_patch_embedding_hook_reads():
    """Self Forcing's plan (30 layers x 12 heads, native 1560 tokens per frame) on a miniature of that shape at 24
    tokens per frame: the outer forward runs eagerly, so the hook tells the geometry; the result equals the same plan
    given with explicit geometry."""
    cfg = GLOBAL.__class__(dim=96, num_heads=12, num_layers=30, ffn_dim=96, text_dim=16, num_frames=6)
    model = fkv_compile.models.build(cfg)
    inputs = make_inputs(cfg, chunks=2)
    compiled = _calibrating(model, plan="self-forcing")
    deferred = rollout(compiled, cfg, inputs)
    plan = plan_of(compiled)
    assert (plan.frame_tokens, plan.chunk_frames) == (cfg.frame_tokens, cfg.chunk_frames)
    assert "in use since the geometry was read from the patch embedding" in \
        fkv_compile.report(compiled, print_table=False).calibration
    explicit = rollout(_calibrating(model, plan="self-forcing", frame_tokens=cfg.frame_tokens), cfg, inputs)
    assert max_abs_error(deferred, explicit) < 1e-5 < max_abs_error(explicit, _off(model, cfg, inputs))
    shallow = dataclasses.replace(cfg, num_layers=2)  # the plan's heads, not its layers: checked when it is installed
    with pytest.raises(PlanError, match="num_layers: plan has 30, the model runs 2"):
        rollout(_calibrating(fkv_compile.models.build(shallow), plan="self-forcing"), shallow, inputs)
