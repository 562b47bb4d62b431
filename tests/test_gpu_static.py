"""The Triton kernels compiled for a real GPU on this CPU (fkv_compile.tools.gpu_static), and the autotune lists cut
to what can win per architecture (fkv_compile.kernels.tuning.fitting)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from fkv_compile.kernels import tuning  # noqa: E402
from fkv_compile.tools.gpu_static import KERNELS, kernel_configs, tuning_form  # noqa: E402

# what each kernel must become on a Hopper at Self Forcing's geometry: its tensor-core MMA and its widest global load
EXPECTED = {"range_attention": ("HGMMA", "LDGSTS.128"), "segment_similarity": (None, "LDG.128"),
            "gather_tokens": (None, "LDG.128")}


def test_each_kernels_default_compiles_for_hopper_without_spills_on_tensor_cores_with_wide_loads(tmp_path):
    # a process of its own: the suite runs Triton's interpreter, whose kernels are not compiled for a GPU
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, "-m", "fkv_compile.tools.gpu_static", "--defaults-only", "--targets", "sm_90a",
                    "--dtypes", "bfloat16", "--head-dims", "128", "--out", str(tmp_path)], env=env, check=True,
                   capture_output=True, text=True)
    for kernel, (mma, load) in EXPECTED.items():
        (b,) = json.loads((tmp_path / f"{kernel}.json").read_text())["builds"]
        assert b["error"] is None, b["error"]
        assert b["fits"], f"{kernel} on sm_90a: {b['spill_bytes']} bytes spilled, {b['shared_bytes']} B shared memory"
        assert mma is None or mma in b["mma"], f"{kernel}: no {mma} in its SASS ({b['mma']})"
        assert load in b["loads"], f"{kernel}: no {load} global load in its SASS ({b['loads']})"


def test_the_fits_table_is_measured_for_every_config_of_every_kernel():
    # a kernel whose autotune list changed needs the table measured anew: python -m fkv_compile.tools.gpu_static
    # --write-fits (configs are looked up by value: a stale table would keep none of a new config)
    table = json.loads(tuning.FITS_PATH.read_text())["kernels"]
    for kernel in KERNELS:
        configs = [tuning_form(c) for c in kernel_configs(kernel)]
        for target in ("sm_90a", "sm_80"):
            variants = dict(table[kernel][target])
            spilling = variants.pop("spilling", [])
            assert set(variants) == {f"{d}/{h}" for d in ("bfloat16", "float16", "float32") for h in (64, 128)}
            assert not {v for v in spilling if not v.startswith("float32")}, "bf16/fp16 must have a config that fits"
            for variant, kept in variants.items():
                assert kept, f"{kernel} {target} {variant}: no config runs"
                assert all(c in configs for c in kept), f"{kernel} {target} {variant}: configs not in its list"
                order = [configs.index(c) for c in kept]
                if variant not in spilling:
                    assert order == sorted(order), "the table keeps the kernel's order (its first is the default)"


def test_fitting_keeps_what_can_win_in_order_and_all_where_nothing_was_measured(monkeypatch):
    import triton

    configs = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=s) for m, s in ((128, 3), (64, 2), (32, 1))]
    kept = [tuning._config_to_json(configs[1]), tuning._config_to_json(configs[2])]
    monkeypatch.setattr(tuning, "_FITS", {"kernels": {"k": {"sm_80": {"bfloat16/128": kept, "float32/128": []}}}})
    assert tuning.fitting("k", configs, "sm_80", torch.bfloat16, 128) == configs[1:], "the default moves to the next"
    assert tuning.fitting("k", configs, "sm_90a", torch.bfloat16, 128) == configs, "not measured there: all"
    assert tuning.fitting("k", configs, None, torch.bfloat16, 128) == configs, "the interpreter: all"
    with pytest.raises(RuntimeError, match="none of its 3 configs compiles for sm_80"):
        tuning.fitting("k", configs, "sm_80", torch.float32, 128)
    spilling = [tuning._config_to_json(configs[2]), tuning._config_to_json(configs[0])]  # the least spilling first
    monkeypatch.setattr(tuning, "_FITS", {"kernels": {"k": {"sm_80": {"float32/64": spilling,
                                                                      "spilling": ["float32/64"]}}}})
    assert tuning.fitting("k", configs, "sm_80", torch.float32, 64) == [configs[2], configs[0]], "the table's order"


def test_where_every_config_spills_the_table_keeps_the_least_spilling_that_run():
    from fkv_compile.tools.gpu_static import LEAST_SPILLING, Build, fits_table

    def build(m: int, spill: int, shared_kib: int = 64) -> Build:
        return Build("range_attention", "sm_90a", "float32", 64, {"BLOCK_M": m, "BLOCK_N": 64, "num_warps": 4,
                                                                   "num_stages": 2}, 1.0, registers=255,
                     spill_bytes=spill, shared_bytes=shared_kib * 1024)

    builds = [build(16, 900), build(32, 40), build(64, 8, shared_kib=300), build(128, 500), build(256, 120)]
    table = fits_table(builds)["kernels"]["range_attention"]["sm_90a"]
    assert table["spilling"] == ["float32/64"]
    assert [c["kwargs"]["BLOCK_M"] for c in table["float32/64"]] == [32, 256, 128][:LEAST_SPILLING]  # 64 cannot launch


def test_a_build_that_spills_or_overflows_shared_memory_cannot_win():
    from fkv_compile.tools.gpu_static import Build, fits

    base = Build("range_attention", "sm_80", "bfloat16", 128, {}, 1.0, registers=255, spill_bytes=0,
                 shared_bytes=160 * 1024)
    assert fits(base)
    assert not fits(Build(**{**base.__dict__, "spill_bytes": 8}))
    assert not fits(Build(**{**base.__dict__, "shared_bytes": 164 * 1024})), "sm_80 blocks get 163 KiB"
    assert not fits(Build(**{**base.__dict__, "error": "CompilationError: out of resources"}))
