"""The backend's one config type: every bad value is a clear error naming the option; exact JSON round trip."""

import copy
import json

import pytest

from fkv_compile import Config, HeadPlan, OptionsError
from fkv_compile.bundled import PLANS, bundled_plan
from fkv_compile.config import KERNELS, LOWERINGS, MODES

PLAN = HeadPlan.from_roles([["static", "dynamic", "dense"]], frame_tokens=6, chunk_frames=2, segments_per_frame=3,
                           dynamic_recent_frames=2, provenance={"source": "test"})

BAD = [
    ("mode", "fast", "option mode expected one of"),
    ("mode", None, "option mode expected one of"),
    ("lowering", "cudagraphs", "option lowering expected one of"),
    ("strict", 1, "option strict expected a bool"),
    ("strict", "yes", "option strict expected a bool"),
    ("kv_recache", "no", "option kv_recache expected a bool"),
    ("kernels", "cuda", "option kernels expected one of"),
    ("plan", 3, "option plan expected a HeadPlan or a path, got int"),
    ("plan", "/nonexistent/plan.json", "option plan: cannot load"),
    ("plans", PLAN, "unknown options \\['plans'\\]"),
    ("plan", "selfforcing", "unknown plan name 'selfforcing'; the bundled plans are \\['causal-forcing', "
     "'krea-realtime-14b', 'longlive', 'raven', 'self-forcing'\\]"),
    ("frame_tokens", 0, "option frame_tokens expected a positive int, got 0"),
    ("chunk_frames", "3", "option chunk_frames expected a positive int, got '3'"),
    ("calibration", 5, "option calibration expected a mapping, got int"),
    ("calibration", {"chunks": 0}, "option calibration: chunks expected a positive int or None, got 0"),
    ("calibration", {"alpha": 1.5}, "option calibration: alpha expected a float in \\[0, 1\\]"),
    ("calibration", {"frames": 3}, "option calibration: unknown keys \\['frames'\\]"),
    ("calibration", {"roles": {"retention": 2}}, "option calibration: roles: retention expected a float"),
    ("calibration", {"roles": {"recency": 2}}, "option calibration: roles: unknown plan parameter 'recency'"),
    ("process_group", "world", "option process_group expected a torch.distributed ProcessGroup, got str"),
    ("head_range", (3, 3), "option head_range expected \\(start, stop\\) ints with 0 <= start < stop"),
    ("head_range", (0, 2.0), "option head_range expected"),
    ("head_range", 4, "option head_range expected"),
]


@pytest.mark.parametrize("option,value,message", BAD, ids=[f"{o}={v!r}" for o, v, _ in BAD])
def test_a_bad_option_is_a_clear_error_and_changes_nothing(option, value, message):
    options = {"plan": PLAN, "mode": "select", option: value}
    before = copy.copy(options)
    with pytest.raises(OptionsError, match=message):
        Config.from_options(options)
    assert options == before


def test_no_options_or_plan_auto_mean_no_plan_and_a_non_mapping_is_an_error():
    for options in (None, {}, {"mode": "select"}, {"plan": "auto"}):
        assert Config.from_options(options).plan is None
    assert Config.from_json(Config.from_options(None).to_json()) == Config.from_options(None)
    with pytest.raises(OptionsError, match="options expected a mapping"):
        Config.from_options([("plan", PLAN)])


def test_every_valid_value_is_accepted_and_defaults_are_documented():
    for mode in MODES:
        assert Config(PLAN, mode=mode).mode == mode
    for lowering in LOWERINGS:
        assert Config(PLAN, lowering=lowering).lowering == lowering
    for kernels in KERNELS:
        assert Config(PLAN, kernels=kernels).kernels == kernels
    config = Config.from_options({"plan": PLAN})
    assert (config.mode, config.lowering, config.strict) == ("select", "inductor", False)


def test_the_config_is_frozen():
    with pytest.raises(AttributeError):
        Config(PLAN).mode = "off"


@pytest.mark.parametrize("fields", [{}, {"mode": "compact", "lowering": "aot_eager", "strict": True, "kv_recache": False,
                                         "kernels": "torch", "head_range": (2, 4)},
                                    {"mode": "profile", "kernels": "triton"}])
def test_json_round_trip_is_exact(fields):
    config = Config(PLAN, **fields)
    text = config.to_json()
    again = Config.from_json(text)
    assert again == config and again.plan == PLAN and again.to_json() == text
    assert json.loads(text)["type"] == "fkv_compile.Config"


def test_a_plan_path_is_loaded(tmp_path):
    path = tmp_path / "plan.json"
    PLAN.save(path)
    assert Config.from_options({"plan": str(path)}).plan == PLAN


@pytest.mark.parametrize("text,message", [
    ("{", "not valid JSON"), ('{"type": "other"}', "expected a document of type"),
])
def test_bad_json_is_a_clear_error(text, message):
    with pytest.raises(OptionsError, match=message):
        Config.from_json(text)


def test_the_cli_offers_the_configs_choices():
    from fkv_compile.tools.cli import build_parser

    parser = build_parser()
    check = parser._subparsers._group_actions[0].choices["check"]
    lowering = next(a for a in check._actions if a.dest == "lowering")
    assert tuple(lowering.choices) == LOWERINGS


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_bundled_plan_loads_by_name_at_its_models_geometry(name):
    entry = PLANS[name]
    plan = Config.from_options({"plan": name}).plan
    assert (plan.num_layers, plan.num_heads) == (entry.num_layers, entry.num_heads)
    assert (plan.frame_tokens, plan.chunk_frames) == (entry.frame_tokens, entry.chunk_frames)
    assert plan.count("static") and plan.count("dynamic") and not plan.count("dense")
    plan.validate_geometry(num_layers=entry.num_layers, num_heads=entry.num_heads, window_frames=entry.window_frames)
    assert plan == bundled_plan(name)  # the same plan through the options and the API
    resized = Config.from_options({"plan": name, "frame_tokens": 390, "chunk_frames": 2}).plan
    assert (resized.frame_tokens, resized.chunk_frames, resized.roles) == (390, 2, plan.roles)


def test_geometry_options_apply_to_any_plan_and_are_checked_by_the_plan():
    assert Config.from_options({"plan": PLAN, "frame_tokens": 12}).plan.frame_tokens == 12
    with pytest.raises(OptionsError, match="segments_per_frame"):  # 3 segments cannot split 2-token frames
        Config.from_options({"plan": PLAN, "frame_tokens": 2})


@pytest.mark.parametrize("options", [{"calibration": {"chunks": 4, "alpha": 0.7, "roles": {"retention": 0.5}}},
                                     {"plan": "self-forcing", "frame_tokens": 24}, {"frame_tokens": 24, "chunk_frames": 3}])
def test_calibration_geometry_and_a_bundled_name_round_trip_through_json(options):
    config = Config.from_options(options)
    assert Config.from_json(config.to_json()) == config


def test_a_config_with_a_process_group_refuses_to_serialize(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        config = Config.from_options({"plan": PLAN, "process_group": dist.group.WORLD, "head_range": [0, 2]})
        assert config.head_range == (0, 2)
        with pytest.raises(OptionsError, match="option process_group cannot be serialized"):
            config.to_json()
    finally:
        dist.destroy_process_group()
