"""The Triton kernels compiled for real GPUs on a machine without one: registers, spills, shared memory, the SASS.

Triton's compiler and NVIDIA's ``ptxas`` / ``cuobjdump`` ship in the triton wheel, so
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` builds the very sm_90a code a launch on an
H100 would build, here. Each kernel is compiled as Triton's JIT specialises a real launch at Self Forcing's 480p
geometry (bf16 ``[B, L, H, D]`` buffers seen as ``[B, H, L, D]``, 12 heads, 1560 tokens per frame, 3-frame chunks):
the unit strides become constants, the pointers and the integers that are multiples of 16 are marked so (what
lets Triton vectorise loads and pipeline them). ``ptxas -v`` then reports registers and spills, the kernel's
metadata its shared memory, and ``cuobjdump -sass`` the instructions: the tensor-core MMA used and the widths of
the global loads.

    python -m fkv_compile.tools.gpu_static [--kernels range_attention,...] [--targets sm_90a,sm_80] [--out DIR]

writes one JSON per kernel (every config of its autotune list, per target, dtype and head dim) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Target", "TARGETS", "Build", "KERNELS", "build", "kernel_configs", "default_config", "fits", "fits_table",
           "merge", "sweep", "tuning_form"]

FRAME_TOKENS, HEADS, CHUNK_FRAMES, WINDOW_FRAMES = 1560, 12, 3, 21  # Self Forcing 480p: [B, L, 12, D] buffers


@dataclass(frozen=True)
class Target:
    """A GPU architecture: Triton's target and the shared memory one block may use there (opt-in maximum)."""

    name: str
    capability: int
    shared_limit: int  # bytes
    mma: tuple[str, ...]  # the SASS opcodes of its tensor-core matrix multiply, best first


TARGETS = {
    "sm_90a": Target("sm_90a", 90, 227 * 1024, ("HGMMA", "HMMA")),  # H100 / H200
    "sm_80": Target("sm_80", 80, 163 * 1024, ("HMMA",)),  # A100
    "sm_100a": Target("sm_100a", 100, 227 * 1024, ("UTCHMMA", "UTCQMMA", "HMMA")),  # B200
}

DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Build:
    """One kernel compiled in one config for one target, dtype and head dim."""

    kernel: str
    target: str
    dtype: str
    head_dim: int
    config: dict[str, Any]  # the autotune config: block sizes, num_warps, num_stages
    seconds: float
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads, per thread
    shared_bytes: int | None = None
    mma: dict[str, int] = dataclasses.field(default_factory=dict)  # tensor-core opcodes -> count in the SASS
    loads: dict[str, int] = dataclasses.field(default_factory=dict)  # global load opcode with its width -> count
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fits(b: Build) -> bool:
    """Whether the build can win an autotune: it compiled, spills no register and its shared memory fits a block."""
    return b.ok and b.spill_bytes == 0 and b.shared_bytes is not None and b.shared_bytes <= TARGETS[b.target].shared_limit


@dataclass(frozen=True)
class _Kernel:
    """How a real launch specialises a kernel: argument types, constants and the arguments marked divisible by 16."""

    name: str
    function: str
    module: str  # of fkv_compile.kernels: its jit function and CUDA_CONFIGS (imported late: Triton is optional)
    specialise: Callable[[str, int], tuple[dict[str, str], dict[str, Any], set[str]]]  # (dtype, head dim) ->


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _attention_launch(dtype: str, head_dim: int) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """``range_attention`` over a chunk's queries (a transposed view of the projection) and a window of the
    ``[B, L, H, D]`` cache; the output contiguous ``[B, H, Lq, D]``."""
    elem = DTYPES[dtype]
    lq, lc = CHUNK_FRAMES * FRAME_TOKENS, WINDOW_FRAMES * FRAME_TOKENS
    row = HEADS * head_dim  # a token's stride in a [B, L, H, D] buffer
    ints = {"Lq": lq, "H": HEADS, "G": HEADS, "R": 4,
            "s_qb": lq * row, "s_qh": head_dim, "s_ql": row,
            "s_kb": lc * row, "s_kh": head_dim, "s_kl": row, "s_vb": lc * row, "s_vh": head_dim, "s_vl": row,
            "s_ob": HEADS * lq * head_dim, "s_oh": lq * head_dim, "s_ol": head_dim}
    signature = {**{p: f"*{elem}" for p in "QKVO"}, "LSE": "*fp32", "STARTS": "*i32", "ENDS": "*i32",
                 "Q_HEADS": "*i32", "qk_scale": "fp32", **{n: "i32" for n in ints}}
    upcast = dtype == "float32"
    constants = {"s_qd": 1, "s_kd": 1, "s_vd": 1, "s_od": 1, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim),
                 "UPCAST": upcast, "PRECISION": "ieee" if upcast else "tf32", "MAP_HEADS": False, "STORE_LSE": False}
    aligned = {"Q", "K", "V", "O", "LSE", "STARTS", "ENDS", "Q_HEADS"} | {n for n, v in ints.items() if v % 16 == 0}
    return signature, constants, aligned


def _similarity_launch(dtype: str, head_dim: int) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """``segment_similarity`` over the candidate frames of a ``[B, L, H, D]`` window (a transposed view)."""
    lc, row = WINDOW_FRAMES * FRAME_TOKENS, HEADS * head_dim
    ints = {"first_token": FRAME_TOKENS, "F": FRAME_TOKENS, "S": 16, "G": HEADS, "HG": 1,
            "s_kb": lc * row, "s_kh": head_dim, "s_kl": row}
    signature = {"K": f"*{DTYPES[dtype]}", "SIM": "*fp32", "HEADS": "*i32", "SEG_START": "*i32", "SEG_END": "*i32",
                 **{n: "i32" for n in ints}, "eps": "fp32"}
    constants = {"s_kd": 1, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim)}
    aligned = {"K", "SIM", "HEADS", "SEG_START", "SEG_END"} | {n for n, v in ints.items() if v % 16 == 0}
    return signature, constants, aligned


def _gather_launch(dtype: str, head_dim: int) -> tuple[dict[str, str], dict[str, Any], set[str]]:
    """``gather_tokens``: the compact store's commit, from the ``[B, L, H, D]`` cache (a transposed view)."""
    lc, row = WINDOW_FRAMES * FRAME_TOKENS, HEADS * head_dim
    ints = {"T": FRAME_TOKENS, "G": HEADS, "s_kb": lc * row, "s_kh": head_dim, "s_kl": row,
            "s_vb": lc * row, "s_vh": head_dim, "s_vl": row, "s_ib": FRAME_TOKENS}
    elem = DTYPES[dtype]
    signature = {"SRC_K": f"*{elem}", "SRC_V": f"*{elem}", "DST_K": f"*{elem}", "DST_V": f"*{elem}", "INDEX": "*i64",
                 **{n: "i32" for n in ints}}
    constants = {"s_kd": 1, "s_vd": 1, "HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim)}
    aligned = {"SRC_K", "SRC_V", "DST_K", "DST_V", "INDEX"} | {n for n, v in ints.items() if v % 16 == 0}
    return signature, constants, aligned


KERNELS = {
    "range_attention": _Kernel("range_attention", "_range_attention_kernel", "attention", _attention_launch),
    "segment_similarity": _Kernel("segment_similarity", "_segment_similarity_kernel", "similarity",
                                  _similarity_launch),
    "gather_tokens": _Kernel("gather_tokens", "_gather_tokens_kernel", "gather", _gather_launch),
}


def _module(kernel: str) -> Any:
    import importlib

    return importlib.import_module(f"fkv_compile.kernels.{KERNELS[kernel].module}")


def _plain(config: Any) -> dict[str, Any]:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _blocks(config: dict[str, Any]) -> dict[str, Any]:
    """A plain config's block sizes (its constexpr arguments), without ``num_warps`` and ``num_stages``."""
    return {n: v for n, v in config.items() if n not in ("num_warps", "num_stages")}


def tuning_form(config: dict[str, Any]) -> dict[str, Any]:
    """A plain config as the tuning table and cache hold it (``fkv_compile.kernels.tuning``)."""
    return {"kwargs": _blocks(config), "num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def kernel_configs(kernel: str) -> list[dict[str, Any]]:
    """The kernel's autotune list on a GPU, as plain dicts (block sizes, ``num_warps``, ``num_stages``)."""
    return [_plain(c) for c in _module(kernel).CUDA_CONFIGS]


def default_config(kernel: str, target: str, dtype: str, head_dim: int) -> dict[str, Any]:
    """The config the kernel starts from on ``target``: the first of its list that can win there."""
    import torch

    from ..kernels.tuning import fitting

    return _plain(fitting(kernel, _module(kernel).CUDA_CONFIGS, target, getattr(torch, dtype), head_dim)[0])


def _tool(name: str, capability: int) -> str:
    import triton.backends.nvidia as nvidia

    if name == "ptxas" and capability >= 100:
        name = "ptxas-blackwell"
    return str(Path(nvidia.__file__).parent / "bin" / name)


def _ptxas_usage(ptx: str, target: Target) -> tuple[int, int]:
    """Registers and spill bytes (stores + loads) per thread, from ``ptxas -v`` on the PTX Triton made."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([_tool("ptxas", target.capability), "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={target.name}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


_LOAD = re.compile(r"\b(LDGSTS|LDG|UTMALDG|UBLKCP)((?:\.[A-Z0-9_]+)*)")


def _sass(cubin: bytes, target: Target) -> tuple[dict[str, int], dict[str, int]]:
    """The tensor-core MMA opcodes and the global loads (opcode and width) in the kernel's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_tool("cuobjdump", target.capability), "-sass", str(path)], capture_output=True,
                              text=True, check=True).stdout
    ops = Counter(m.group(1) for m in re.finditer(r"\b([A-Z][A-Z0-9]*MMA)\b", sass))
    loads: Counter[str] = Counter()
    for m in _LOAD.finditer(sass):
        width = next((w for w in ("128", "64", "U16", "16", "U8", "8") if f".{w}" in m.group(2)), "32")
        loads[f"{m.group(1)}.{width}"] += 1
    return dict(ops), dict(loads)


def build(kernel: str, target: str, dtype: str, head_dim: int, config: dict[str, Any]) -> Build:
    """Compile ``kernel`` in ``config`` for ``target`` as a real launch at ``dtype`` and ``head_dim`` specialises it,
    and read what it became (a compile error is recorded, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k, tgt = KERNELS[kernel], TARGETS[target]
    fn = getattr(_module(kernel), k.function)
    if not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("fkv gpu_static: Triton runs in its interpreter here (TRITON_INTERPRET=1): its kernels "
                           "are not compiled for a GPU; run without it")
    signature, constants, aligned = k.specialise(dtype, head_dim)
    constants = {**constants, **_blocks(config)}
    full = {name: ("constexpr" if name in constants else signature[name]) for name in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    start = time.perf_counter()
    result = Build(kernel, target, dtype, head_dim, dict(config), 0.0)
    try:
        compiled = triton.compile(ASTSource(fn, full, constants, attrs), target=GPUTarget("cuda", tgt.capability, 32),
                                  options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
        registers, spills = _ptxas_usage(compiled.asm["ptx"], tgt)
        mma, loads = _sass(compiled.asm["cubin"], tgt)
        result = dataclasses.replace(result, registers=registers, spill_bytes=spills,
                                     shared_bytes=int(compiled.metadata.shared), mma=mma, loads=loads)
    except Exception as exc:  # recorded per build: a config that does not compile cannot win an autotune
        result = dataclasses.replace(result, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    return dataclasses.replace(result, seconds=round(time.perf_counter() - start, 2))


LEAST_SPILLING = 3
"""Where no config of a variant can win (fp32 at head dim 64 spills in every config), the table keeps this many of
those that compile within shared memory, the fewest spilled bytes first: slow, but they run."""


def _runs(b: Build) -> bool:
    """Whether the build launches at all: it compiled and its shared memory fits a block (spills only cost time)."""
    return b.ok and b.shared_bytes is not None and b.shared_bytes <= TARGETS[b.target].shared_limit


def fits_table(builds: Iterable[Build]) -> dict[str, Any]:
    """What :func:`fkv_compile.kernels.tuning.fitting` reads: per kernel, target and ``dtype/head_dim``, the configs
    that can win an autotune, in the kernel's order; where none can, the :data:`LEAST_SPILLING` that spill least, in
    that order, the variant named under ``spilling``."""
    import triton

    grouped: dict[tuple[str, str, str], list[Build]] = {}
    for b in builds:
        grouped.setdefault((b.kernel, b.target, f"{b.dtype}/{b.head_dim}"), []).append(b)
    kernels: dict[str, Any] = {}
    for (kernel, target, variant), group in grouped.items():
        table = kernels.setdefault(kernel, {}).setdefault(target, {})
        winners = [b for b in group if fits(b)]
        if not winners:
            winners = sorted(filter(_runs, group), key=lambda b: b.spill_bytes)[:LEAST_SPILLING]
            table.setdefault("spilling", []).append(variant)
        table[variant] = [tuning_form(b.config) for b in winners]
    return {"triton": triton.__version__, "geometry": {"frame_tokens": FRAME_TOKENS, "heads": HEADS}, "kernels": kernels}


def _row(b: Build) -> str:
    cfg = " ".join(f"{k}={v}" for k, v in b.config.items())
    if not b.ok:
        return f"{b.kernel:<19} {b.target:<8} {b.dtype:<9} {b.head_dim:>3}  {cfg:<52} ERROR {b.error}"
    mma = ",".join(f"{k}x{v}" for k, v in sorted(b.mma.items())) or "-"
    loads = ",".join(f"{k}x{v}" for k, v in sorted(b.loads.items())) or "-"
    verdict = "ok" if fits(b) else "NO (spills)" if b.spill_bytes else "NO (shared)"
    return (f"{b.kernel:<19} {b.target:<8} {b.dtype:<9} {b.head_dim:>3}  {cfg:<52} {b.registers:>4} {b.spill_bytes:>6} "
            f"{b.shared_bytes / 1024:>7.1f}  {verdict:<11} {mma:<14} {loads}")


def _earlier(path: Path) -> list[Build]:
    """The builds a former run wrote to ``path`` (none when it is missing or from another Triton)."""
    import triton

    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    if doc.get("triton") != triton.__version__:
        return []
    return [Build(**{k: v for k, v in b.items() if k != "fits"}) for b in doc["builds"]]


def merge(earlier: Iterable[Build], measured: list[Build]) -> list[Build]:
    """``measured`` and the ``earlier`` builds of the (target, dtype, head dim) it did not measure: a run of one dtype
    or target replaces its own rows of the results and the fits table and keeps the rest."""
    done = {(b.kernel, b.target, b.dtype, b.head_dim) for b in measured}
    return [b for b in earlier if (b.kernel, b.target, b.dtype, b.head_dim) not in done] + measured


def sweep(kernels: Iterable[str], targets: Iterable[str], dtypes: Iterable[str], head_dims: Iterable[int],
          defaults_only: bool = False) -> list[Build]:
    """Every build of the product, the kernels' whole autotune lists (or their first, default, config)."""
    builds = []
    for kernel in kernels:
        for target in targets:
            for dtype in dtypes:
                for head_dim in head_dims:
                    configs = ([default_config(kernel, target, dtype, head_dim)] if defaults_only
                               else kernel_configs(kernel))
                    for config in configs:
                        builds.append(build(kernel, target, dtype, head_dim, config))
                        print(_row(builds[-1]), flush=True)
    return builds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--targets", default="sm_90a,sm_80")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--defaults-only", action="store_true",
                        help="each kernel's default config per target, dtype and head dim only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_static"))
    parser.add_argument("--write-fits", action="store_true",
                        help="also write the table of configs that can win per architecture, dtype and head dim that "
                             "the kernels' autotuning reads (fkv_compile/kernels/gpu_fits.json)")
    args = parser.parse_args(argv)
    if args.write_fits and args.defaults_only:
        parser.error("--write-fits needs every config measured: drop --defaults-only")
    for name, allowed in (("kernels", KERNELS), ("targets", TARGETS), ("dtypes", DTYPES)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)}; expected some of {sorted(allowed)}")
    print(f"{'kernel':<19} {'target':<8} {'dtype':<9} {'D':>3}  {'config':<52} {'regs':>4} {'spill':>6} "
          f"{'smem KiB':>8}  {'can win':<11} {'MMA':<14} global loads")
    builds = sweep(args.kernels.split(","), args.targets.split(","), args.dtypes.split(","),
                   [int(d) for d in args.head_dims.split(",")], args.defaults_only)
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    kept = []
    for kernel in args.kernels.split(","):
        merged = merge(_earlier(args.out / f"{kernel}.json"), [b for b in builds if b.kernel == kernel])
        kept += merged
        doc = {"kernel": kernel, "triton": triton.__version__, "geometry": {
                   "frame_tokens": FRAME_TOKENS, "heads": HEADS, "chunk_frames": CHUNK_FRAMES,
                   "window_frames": WINDOW_FRAMES},
               "builds": [dataclasses.asdict(b) | {"fits": fits(b)} for b in merged]}
        (args.out / f"{kernel}.json").write_text(json.dumps(doc, indent=1))
    if args.write_fits:
        from ..kernels.tuning import FITS_PATH

        FITS_PATH.write_text(json.dumps(fits_table(kept), indent=1) + "\n")
        print(f"wrote {FITS_PATH}")
    failed = [b for b in builds if not b.ok]
    print(f"{len(builds)} builds, {sum(map(fits, builds))} can win an autotune, {len(failed)} failed to compile; "
          f"JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
