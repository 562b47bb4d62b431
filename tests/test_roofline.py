"""The roofline model's arithmetic, its tables in docs/gpu_model.md, and its comparison with a GPU run's file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fkv_compile.plan import DENSE, HeadPlan
from fkv_compile.semantics import WindowLayout, kept_token_count
from fkv_compile.tools import roofline as rl

DOC = Path(__file__).resolve().parents[1] / "docs" / "gpu_model.md"


def test_dense_call_counts_every_query_key_pair():
    m = rl.MODELS["480p"]
    lq, lk = 3 * 1560, 21 * 1560
    call = rl.attention_call(m, [float(lk)] * 12)
    assert call.flops == 4 * lq * lk * 128 * 12
    assert call.bytes == (2 * lq + 2 * lk) * 128 * 2 * 12
    assert call.intensity == pytest.approx(lq * lk / (lq + lk))


@pytest.mark.parametrize("role", ["static", "dynamic"])
def test_visited_tokens_round_each_range_up_to_its_block(role):
    plan = rl.MODELS["480p"].plan()
    layout = WindowLayout(frame_tokens=1560, chunk_frames=3, frames=21)
    kept = kept_token_count(plan, role, 21)
    assert rl.range_tokens(plan, role, layout, None) == kept
    assert rl.range_tokens(plan, role, layout, 1) == kept  # segments of 260 tokens: no rounding at block 1
    visited = rl.range_tokens(plan, role, layout, 64)
    # sink 1560 -> 1600, recent + chunk 6240 -> 6272, each 260-token segment -> 320
    expected = 1600 + 6272 + (6 * 320 if role == "dynamic" else 0)
    assert visited == expected


def test_a_dense_plan_predicts_no_saving():
    m = rl.MODELS["480p"]
    dense_plan = HeadPlan.uniform(DENSE, num_layers=m.layers, num_heads=m.heads, frame_tokens=m.frame_tokens,
                                  chunk_frames=m.chunk_frames)
    assert rl.video_costs(m, dense_plan) == rl.video_costs(m, None)


def test_video_speed_ups_lie_between_one_and_the_attention_free_limit():
    p = rl.predictions()
    for key, g in p["geometries"].items():
        assert 0.3 < g["kept_fraction"] < g["visited_fraction"] < 1
        for row in g["gpus"].values():
            s = row["speedup"]
            assert 1 < s["triton_vs_flash"] < s["same_kernel_class"] < 1 / g["kept_fraction"]
            assert s["same_kernel_class"] < s["attention_free_limit"]
    # attention grows with the square of the frame's tokens, the rest linearly: 1080p gains more than 480p
    assert p["geometries"]["1080p"]["gpus"]["H100"]["attention_share_dense"] > \
        p["geometries"]["480p"]["gpus"]["H100"]["attention_share_dense"]


def test_first_chunks_keep_everything():
    """The kept fraction counts the video's first chunk in full (3 frames: nothing to drop)."""
    m = rl.MODELS["480p"]
    one_chunk = rl.VideoModel("one chunk", 1560, frames=3)
    assert rl.video_costs(one_chunk, m.plan())["self_attention"] == rl.video_costs(one_chunk, None)["self_attention"]


def test_docs_tables_are_the_models():
    text = DOC.read_text()
    found = re.search(r"<!-- roofline:begin[^\n]*-->\n(.*?)<!-- roofline:end -->", text, re.S)
    assert found, "docs/gpu_model.md lost its roofline markers"
    assert found.group(1) == rl.markdown(rl.predictions()), \
        "docs/gpu_model.md is stale: paste `python -m fkv_compile.tools.roofline --markdown` between its markers"


def test_compare_sets_a_gpu_runs_rows_beside_the_model(tmp_path, capsys):
    measured = {"device": "NVIDIA H200", "ceilings": {"copy_GBps": 4000.0, "matmul_TFLOPs": 700.0},
                "rows": [{"geometry": "sf480", "plan": "all static", "kept_ratio": 0.25, "kernel_ms": 0.6,
                          "dense_sdpa_ms": 1.7, "sdpa_on_kept_ms": 0.5}]}
    file = tmp_path / "kernels_bfloat16.json"
    file.write_text(json.dumps(measured))
    out = tmp_path / "model.json"
    rl.main(["--compare", str(file), "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["comparison"]["gpu"] == "H200"
    row = written["comparison"]["rows"][0]
    m = rl.MODELS["480p"]
    kept_call = rl.attention_call(m, [0.25 * 21 * 1560] * 12)
    assert row["kernel_ms"] == {"measured": 0.6, "model": pytest.approx(1e3 * kept_call.flops / 450e12)}
    assert row["dense_ms"]["model"] == pytest.approx(1e3 * 4 * 4680 * 21 * 1560 * 128 * 12 / 600e12)
    assert "all static" in capsys.readouterr().out


def test_the_kept_fraction_is_the_benchmarks():
    """The model and `fkv bench` set the same Amdahl limit: the kept share of a video's key tokens."""
    from fkv_compile.tools.bench import kept_fraction

    for key, g in rl.predictions()["geometries"].items():
        m = rl.MODELS[key]
        assert g["kept_fraction"] == pytest.approx(kept_fraction(m.plan(), None, m.chunks))
