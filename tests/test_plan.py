import json
from pathlib import Path

import pytest

from fkv_compile import HeadPlan, PlanError, RoleParams

REFERENCE = Path(__file__).resolve().parents[1] / "fkv_compile" / "plans"


def _plan(**kw):
    return HeadPlan.from_roles([["static", "dynamic", "dense"], ["dynamic", "dynamic", "static"]],
                               frame_tokens=24, chunk_frames=3, **kw)


def test_save_load_round_trip_is_exact(tmp_path):
    plan = _plan(dynamic_recent_frames=2, retention=0.5, selection="head", provenance={"alpha": 0.8})
    plan.save(tmp_path / "p.json")
    loaded = HeadPlan.load(tmp_path / "p.json")
    assert loaded == plan
    assert loaded.to_dict() == plan.to_dict()
    assert loaded.dynamic.recent_frames == 2 and loaded.static.recent_frames == 1


def test_defaults_and_counts():
    plan = _plan()
    assert (plan.num_layers, plan.num_heads) == (2, 3)
    assert plan.static == RoleParams(sink_frames=1, recent_frames=1, candidate_frames=3, segments_per_frame=6, retention=0.33)
    assert plan.heads(1, "dynamic") == (0, 1)
    assert plan.count("static") == 2
    assert plan.dynamic.selected_segments == 6  # round(3 * 6 * 0.33)
    assert plan.frames_kept("static") == 5 and plan.frames_kept("dynamic") == 6


@pytest.mark.parametrize("name", sorted(p.name for p in REFERENCE.glob("*.json")))
def test_every_reference_plan_loads(name):
    plan = HeadPlan.from_reference_json(REFERENCE / name, frame_tokens=1560, chunk_frames=3)
    doc = json.loads((REFERENCE / name).read_text())
    layers = doc["layers"] if isinstance(doc, dict) else doc
    assert plan.num_layers == len(layers)
    for entry in layers:
        row = plan.roles[entry["layer_idx"]]
        assert sorted(entry["static_head"]) == [h for h, r in enumerate(row) if r == "static"]
        assert sorted(entry["dynamic_head"]) == [h for h, r in enumerate(row) if r == "dynamic"]
    assert plan.count("dense") == 0


def test_reference_counts_match_the_paper():
    plan = HeadPlan.from_reference_json(REFERENCE / "forcingkv_heads_selfforcing.json", frame_tokens=1560, chunk_frames=3)
    assert (plan.num_layers, plan.num_heads) == (30, 12)
    assert plan.count("static") == 134  # "Self Forcing 134 of 360 heads static"
    big = HeadPlan.from_reference_json(REFERENCE / "forcingkv_heads_realtime_14b.json", frame_tokens=1560, chunk_frames=3)
    assert (big.num_layers, big.num_heads) == (40, 40)


def test_reference_key_aliases(tmp_path):
    doc = {"num_heads": 3, "layers": [{"layer": 1, "static_heads": [0], "dynamic_heads": [1, 2]},
                                       {"layer": 0, "static": [2, 1], "dynamic": [0]}]}
    path = tmp_path / "alias.json"
    path.write_text(json.dumps(doc))
    plan = HeadPlan.from_reference_json(path, frame_tokens=8, chunk_frames=2, sink_frames=2)
    assert plan.roles == (("dynamic", "static", "static"), ("static", "dynamic", "dynamic"))
    assert plan.static.sink_frames == 2


@pytest.mark.parametrize(
    "layers, match",
    [
        ([{"layer_idx": 0, "static_head": [0, 1], "dynamic_head": [1, 2]}], "both static and dynamic"),
        ([{"layer_idx": 0, "static_head": [0], "dynamic_head": [2]}], "neither"),
        ([{"layer_idx": 0, "static_head": [0, 5], "dynamic_head": [1, 2]}], r"expected an int in \[0, 3\)"),
        ([{"layer_idx": 1, "static_head": [0], "dynamic_head": [1, 2]}], "layer indices"),
        ([{"layer_idx": 0, "static_head": [0], "static_heads": [1], "dynamic_head": [2]}], "ambiguous"),
    ],
)
def test_reference_errors(tmp_path, layers, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_heads": 3, "layers": layers}))
    with pytest.raises(PlanError, match=match):
        HeadPlan.from_reference_json(path, frame_tokens=8, chunk_frames=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"roles": [["static", "sparse"]]}, r"roles\[0\]\[1\] expected one of"),
        ({"roles": [["static"], ["static", "dense"]]}, "same non-zero number of heads"),
        ({"roles": []}, "at least one layer"),
        ({"frame_tokens": 0}, "frame_tokens expected an int >= 1, got 0"),
        ({"chunk_frames": -3}, "chunk_frames expected an int >= 1"),
        ({"retention": 1.5}, r"retention expected a float in \[0, 1\]"),
        ({"segments_per_frame": 0}, "segments_per_frame expected an int >= 1"),
        ({"segments_per_frame": 30}, "segments_per_frame expected <= frame_tokens"),
        ({"selection": "batch"}, "selection expected one of"),
        ({"sink_frame": 1}, "unknown plan parameter 'sink_frame'"),
    ],
)
def test_validation_errors(kwargs, match):
    args = {"roles": [["static", "dynamic"]], "frame_tokens": 24, "chunk_frames": 3}
    args.update(kwargs)
    roles = args.pop("roles")
    with pytest.raises(PlanError, match=match):
        HeadPlan.from_roles(roles, **args)


def test_validate_geometry_names_every_mismatch():
    plan = _plan()
    plan.validate_geometry(num_layers=2, num_heads=3, window_frames=21)
    with pytest.raises(PlanError, match="num_layers: plan has 2, model has 4; num_heads: plan has 3, model has 2"):
        plan.validate_geometry(num_layers=4, num_heads=2)
    with pytest.raises(PlanError, match="dynamic budget: keeps 6 frames, more than the model's window of 5"):
        plan.validate_geometry(window_frames=5)


def test_load_rejects_foreign_documents(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"layers": []}))
    with pytest.raises(PlanError, match="from_reference_json"):
        HeadPlan.load(path)
    newer = _plan().to_dict()
    newer["version"] = 99
    path.write_text(json.dumps(newer))
    with pytest.raises(PlanError, match="upgrade fkv-compile"):
        HeadPlan.load(path)


def test_shards_are_the_contiguous_head_slices_of_every_layer_and_bad_splits_are_clear_errors():
    plan = HeadPlan.from_roles([["static", "dynamic", "dense", "dynamic"], ["dynamic", "static", "static", "dense"]],
                               frame_tokens=24, chunk_frames=3, retention=0.5)
    halves = [plan.shard(r, 2) for r in range(2)]
    assert [h.roles for h in halves] == [(("static", "dynamic"), ("dynamic", "static")),
                                         (("dense", "dynamic"), ("static", "dense"))]
    assert all(h.dynamic == plan.dynamic and h.frame_tokens == 24 for h in halves)
    assert plan.shard(0, 1) == plan
    for rank, world, match in ((0, 3, "4 heads do not split evenly over 3 ranks"), (2, 2, "rank expected in"),
                               (0, 0, "rank expected in"), (0, True, "world_size expected an int")):
        with pytest.raises(PlanError, match=match):
            plan.shard(rank, world)
