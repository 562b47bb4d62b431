"""Range attention raced per shape between the Triton kernel and SDPA over the gathered kept tokens.

On CPU the kernel runs in the interpreter and the torch path (the same gather + SDPA that on a GPU reaches
FlashAttention/cuDNN) stands in for the library; a scripted clock decides the races, so every outcome is
forced both ways.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from fkv_compile import HeadPlan, kernels  # noqa: E402
from fkv_compile.modes.dispatch import contested, kernels_for  # noqa: E402

if not kernels.interpreting():
    pytest.skip("the contest's kernel runs the Triton interpreter: TRITON_INTERPRET=1 before Triton's import",
                allow_module_level=True)

from fkv_compile.kernels.tuning import TuningCache  # noqa: E402
from fkv_compile.modes.contest import CONTEST_KERNEL  # noqa: E402
from fkv_compile.modes.select import compressed_attention  # noqa: E402
from fkv_compile.semantics import oracle_attention  # noqa: E402
from fkv_compile.tools.testing import assert_within_budget, error_budget, selection_margin  # noqa: E402

TRITON = kernels_for("triton", "cpu")


class ScriptedClock:
    """A bench that runs each call once and says it took what the script gives its contender."""

    def __init__(self, ms: dict[str, float]):
        self.ms, self.timed = ms, []

    def __call__(self, call) -> float:
        call()
        name = ("triton", "sdpa")[len(self.timed) % 2]  # contenders are timed in their order
        self.timed.append(name)
        return self.ms[name]


def _inputs(frames: int = 7, f: int = 12, heads: int = 2, d: int = 16, dtype=torch.float32):
    q = torch.randn(1, 3 * f, heads, d, dtype=dtype).transpose(1, 2)  # the models' [B, L, H, D] layout
    k = torch.randn(1, frames * f, heads, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(1, frames * f, heads, d, dtype=dtype).transpose(1, 2)
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=f, chunk_frames=3, dynamic_segments_per_frame=3)
    return q, k, v, plan


def _counting(kernels):
    """``kernels`` whose range attention counts its calls, by contender."""
    calls = {"triton": 0, "sdpa": 0}
    race = kernels.range_attention

    def spy(name):
        fn = race.contenders[name]

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted
    race.contenders = {name: spy(name) for name in race.contenders}
    return calls


@pytest.mark.parametrize("faster", ["triton", "sdpa"])
def test_the_faster_contender_runs_and_matches_the_oracle(tmp_path, faster):
    clock = ScriptedClock({"triton": 2.0, "sdpa": 1.0} if faster == "sdpa" else {"triton": 1.0, "sdpa": 3.0})
    raced = contested(TRITON, bench=clock, cache=TuningCache(tmp_path / "tuning.json"))
    calls = _counting(raced)
    q, k, v, plan = _inputs()
    out, _ = compressed_attention(q, k, v, plan, 0, kernels=raced)
    assert clock.timed == ["triton", "sdpa"] and raced.range_attention.raced == 1
    assert calls[faster] == 2  # once timed, once run
    assert selection_margin(k, plan, 0, q.shape[2]) > 1e-4  # no near tie: fp32 and fp64 keep the same segments
    ref = oracle_attention(q.double(), k.double(), v.double(), plan, 0)
    assert_within_budget(out, ref, error_budget(oracle_attention(q, k, v, plan, 0), ref, floor=16 * 2**-23))
    again, _ = compressed_attention(q, k, v, plan, 0, kernels=raced)
    assert raced.range_attention.raced == 1 and calls[faster] == 3  # the same shape is not raced again
    torch.testing.assert_close(again, out)


def test_winners_persist_across_processes_and_a_new_shape_races(tmp_path):
    path = tmp_path / "tuning.json"
    q, k, v, plan = _inputs()
    first = contested(TRITON, bench=ScriptedClock({"triton": 5.0, "sdpa": 1.0}), cache=TuningCache(path))
    compressed_attention(q, k, v, plan, 0, kernels=first)
    (entry,) = json.loads(path.read_text())["entries"]
    assert entry["kernel"] == CONTEST_KERNEL and entry["config"]["contender"] == "sdpa"
    assert entry["key"] == ["float32", 16, 36, 84, 2, 2, 2 + 3, 1, False]  # sink, recent + chunk, 3 segments

    clock = ScriptedClock({"triton": 1.0, "sdpa": 9.0})
    second = contested(TRITON, bench=clock, cache=TuningCache(path))  # a new process: nothing in memory
    calls = _counting(second)
    compressed_attention(q, k, v, plan, 0, kernels=second)
    assert clock.timed == [] and calls == {"triton": 0, "sdpa": 1}  # the persisted winner, not a race
    q2, k2, v2, _ = _inputs(frames=8)
    compressed_attention(q2, k2, v2, plan, 0, kernels=second)  # a longer window: a new shape
    assert clock.timed == ["triton", "sdpa"] and calls["triton"] == 2
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_the_log_sum_exp_and_disabled_tuning_take_the_kernel(tmp_path, monkeypatch):
    clock = ScriptedClock({"triton": 9.0, "sdpa": 1.0})
    raced = contested(TRITON, bench=clock, cache=TuningCache(tmp_path / "t.json"))
    calls = _counting(raced)
    q, k, v, _ = _inputs()
    starts, ends = torch.tensor([[[0], [12]]]), torch.tensor([[[84], [60]]])
    out, lse = raced.range_attention(q, k, v, starts, ends, return_lse=True)
    assert lse.shape == (1, 2, 36) and calls == {"triton": 1, "sdpa": 0} and clock.timed == []
    monkeypatch.setenv("FKV_AUTOTUNE", "0")
    raced.range_attention(q, k, v, starts, ends)
    assert calls == {"triton": 2, "sdpa": 0} and clock.timed == [] and not (tmp_path / "t.json").exists()


def test_auto_races_on_cuda_only_and_triton_forces_the_kernel():
    assert kernels_for("auto", "cpu").name == "torch"
    assert kernels_for("triton", "cpu").range_attention.__module__ == "fkv_compile.kernels.attention"
    with pytest.raises(ValueError, match="two contenders"):
        from fkv_compile.modes.contest import RangeAttentionContest

        RangeAttentionContest({"triton": TRITON.range_attention})
