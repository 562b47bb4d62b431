"""A roofline model of attention at real size: what a GPU should show before one has been measured.

One attention call and one whole video of Self Forcing (Wan2.1-T2V-1.3B: 30 layers, 12 heads x 128, model dim
1536, FFN 8960, 3-frame chunks, 5 forwards per chunk, 21 frames with global attention) at 480p (1560 tokens per
frame) and 1080p (8160), for dense attention and for ``select``/``compact`` with the reference Self Forcing plan
(the two attend to the same kept tokens; they differ in memory, not in the attention's work). Counted:

- attention FLOPs ``4 Lq Lk D`` per head (QK^T and PV), bytes Q + O + the K/V tokens read (each once: the
  compulsory traffic; re-reads by other query blocks are assumed to hit L2);
- the kept tokens per head from the plan (:func:`fkv_compile.semantics.kept_token_count`) and the tokens the
  range kernel visits (each range rounded up to its key block);
- the linear layers (self-attention QKV/O, cross-attention Q/O, FFN: ``2 Lq P`` FLOPs per forward and layer,
  ``P`` their parameters), cross-attention over 512 text tokens, and the element-wise work between them (norms,
  modulation, RoPE) as passes over the activations, memory-bound.

Time of a piece = max(FLOPs / throughput, bytes / bandwidth). The end-to-end speed-up is Amdahl's: only the
self-attention over the cache changes. Every throughput is an assumption, listed in :data:`ASSUMPTIONS` with how
the first GPU run (``benchmarks/gpu.sh``) checks it; :func:`compare_kernels` sets the model beside that run.

    python -m fkv_compile.tools.roofline [--json out.json] [--markdown] [--compare benchmarks/results/gpu/...]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..bundled import bundled_plan
from ..plan import DYNAMIC, STATIC, HeadPlan
from ..semantics import WindowLayout, kept_token_count, selected_count

__all__ = ["Gpu", "GPUS", "VideoModel", "MODELS", "Throughputs", "ASSUMPTIONS", "PAPER_SPEEDUPS", "CallCost",
           "attention_call", "range_tokens", "video_costs", "predictions", "markdown", "compare_kernels"]

BYTES = 2  # bf16


@dataclass(frozen=True)
class Gpu:
    """Datasheet limits (SXM, bf16 dense tensor cores, HBM)."""

    name: str
    bf16_tflops: float
    bandwidth_tbps: float

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel at peak is compute-bound."""
        return self.bf16_tflops / self.bandwidth_tbps


GPUS = {"H100": Gpu("H100 SXM", 989.0, 3.35), "H200": Gpu("H200", 989.0, 4.8)}


@dataclass(frozen=True)
class VideoModel:
    """The Wan2.1-T2V-1.3B shapes a Self Forcing video runs through."""

    name: str
    frame_tokens: int
    layers: int = 30
    heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    text_tokens: int = 512
    chunk_frames: int = 3
    frames: int = 21
    forwards_per_chunk: int = 5  # 4 denoising steps + the clean pass that writes the cache

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def query_tokens(self) -> int:
        return self.chunk_frames * self.frame_tokens

    @property
    def chunks(self) -> int:
        return self.frames // self.chunk_frames

    def plan(self) -> HeadPlan:
        """The reference Self Forcing plan at this geometry."""
        return bundled_plan("self-forcing", frame_tokens=self.frame_tokens, chunk_frames=self.chunk_frames)


MODELS = {"480p": VideoModel("Self Forcing 480p", 1560), "1080p": VideoModel("Self Forcing 1080p", 8160)}
PAPER_SPEEDUPS = {"480p": 1.50, "1080p": 2.82}  # Forcing-KV (arXiv 2605.09681), Self Forcing, one H200


@dataclass(frozen=True)
class Throughputs:
    """What each piece is assumed to reach (TFLOP/s, or passes over the activations)."""

    dense_attention: float = 600.0  # FlashAttention-3 class at head dim 128
    kept_attention: float = 450.0  # a good Triton kernel (this project's range attention)
    linear: float = 660.0  # cuBLAS bf16 GEMMs with thousands of rows: two thirds of peak
    elementwise_passes: float = 24.0  # reads + writes of [tokens, dim] bf16 per layer between the GEMMs


ASSUMPTIONS = {
    "dense_attention": "FlashAttention-3-class dense attention reaches ~600 TFLOP/s at head dim 128 on these shapes "
                       "(gpu.sh step 2: dense_sdpa_ms of benchmarks/kernels.py)",
    "kept_attention": "the range-attention kernel reaches ~450 TFLOP/s over the tokens it visits "
                      "(gpu.sh step 2: TFLOPs of each plan row)",
    "visited_tokens": "each kept range costs whole key blocks (BLOCK_N of the default config); selected segments "
                      "are never adjacent (the worst case) (step 2: kernel_ms against the model's per-row time)",
    "l2_reuse": "K/V re-reads by the query blocks of one head hit L2, so HBM traffic is the compulsory bytes "
                "(step 2: GBps stays far below the copy ceiling)",
    "linear": "the linear layers run at ~660 TFLOP/s and the element-wise work costs ~24 activation passes per "
              "layer (step 3: attention_share of the dense rollout against the model's dense attention share)",
    "overheads": "selection (segment similarity, once per chunk) and the compact commit are memory-bound and "
                 "small next to attention (step 2: similarity_ms, commit_gather_5_frames_ms)",
}


@dataclass(frozen=True)
class CallCost:
    """FLOPs and HBM bytes of one piece of work."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def seconds(self, gpu: Gpu, tflops: float) -> float:
        """The roofline: the slower of compute at ``tflops`` and memory at the GPU's bandwidth."""
        return max(self.flops / (tflops * 1e12), self.bytes / (gpu.bandwidth_tbps * 1e12))

    def __add__(self, other: CallCost) -> CallCost:
        return CallCost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, factor: float) -> CallCost:
        return CallCost(self.flops * factor, self.bytes * factor)


def attention_call(m: VideoModel, key_tokens_per_head: list[float]) -> CallCost:
    """One attention call of a chunk's queries, each head over its own number of key tokens."""
    lq, d = m.query_tokens, m.head_dim
    flops = sum(4 * lq * t * d for t in key_tokens_per_head)
    data = sum((2 * lq + 2 * t) * d * BYTES for t in key_tokens_per_head)
    return CallCost(flops, data)


def range_tokens(plan: HeadPlan, role: str, layout: WindowLayout, block: int | None) -> float:
    """Key tokens a head of ``role`` attends to in ``layout`` (``block=None``), or that a kernel walking its ranges
    in blocks of ``block`` tokens visits: sink, selected segments (apart) and recent frames + chunk, each rounded up."""
    if block is None or role not in (STATIC, DYNAMIC) or layout.frames < plan.chunk_frames:
        return kept_token_count(plan, role, layout.frames)
    p = plan.params(role)
    f = layout.frame_tokens
    ranges = [len(layout.tokens(layout.sink(p))), (layout.frames - min(layout.recent(p).start, layout.history)) * f]
    if role == DYNAMIC:
        cands = layout.candidates(p)
        ranges += [f / p.segments_per_frame] * selected_count(p, len(cands) * p.segments_per_frame)
    return float(sum(math.ceil(r / block) * block for r in ranges if r))


def _layer_keys(m: VideoModel, plan: HeadPlan | None, layer: int, frames: int, block: int | None) -> list[float]:
    layout = WindowLayout(frame_tokens=m.frame_tokens, chunk_frames=m.chunk_frames, frames=frames)
    if plan is None:
        return [float(frames * m.frame_tokens)] * m.heads
    return [range_tokens(plan, role, layout, block) for role in plan.roles[layer]]


def _mean_call(m: VideoModel, plan: HeadPlan | None, frames: int, block: int | None) -> CallCost:
    """One attention call at ``frames`` frames, averaged over the layers (their plans differ)."""
    total = CallCost(0.0, 0.0)
    for layer in range(m.layers):
        total += attention_call(m, _layer_keys(m, plan, layer, frames, block))
    return total.scaled(1 / m.layers)


def video_costs(m: VideoModel, plan: HeadPlan | None, block: int | None = None) -> dict[str, CallCost]:
    """Per piece, the FLOPs and bytes of one video (``plan=None``: dense attention)."""
    lq, d = m.query_tokens, m.dim
    forwards = m.forwards_per_chunk
    attention = CallCost(0.0, 0.0)
    for chunk in range(m.chunks):
        frames = (chunk + 1) * m.chunk_frames  # global attention: every frame so far
        for layer in range(m.layers):
            attention += attention_call(m, _layer_keys(m, plan, layer, frames, block)).scaled(forwards)
    calls = m.chunks * forwards * m.layers
    params = 6 * d * d + 2 * d * m.ffn_dim  # self QKV/O, cross Q/O, FFN up/down
    linear = CallCost(2 * lq * params, (params + 10 * lq * d) * BYTES).scaled(calls)
    cross = CallCost(4 * lq * m.text_tokens * d, (2 * lq + 2 * m.text_tokens) * d * BYTES).scaled(calls)
    return {"self_attention": attention, "linear": linear, "cross_attention": cross,
            "elementwise": CallCost(0.0, lq * d * BYTES).scaled(calls)}


def _video_seconds(costs: dict[str, CallCost], gpu: Gpu, t: Throughputs, attention_tflops: float) -> dict[str, float]:
    return {"self_attention": costs["self_attention"].seconds(gpu, attention_tflops),
            "linear": costs["linear"].seconds(gpu, t.linear),
            "cross_attention": costs["cross_attention"].seconds(gpu, t.dense_attention),
            "elementwise": costs["elementwise"].bytes * t.elementwise_passes / (gpu.bandwidth_tbps * 1e12)}


def predictions(t: Throughputs = Throughputs(), block: int = 64) -> dict[str, Any]:
    """The model's numbers for every geometry and GPU: the last chunk's call and the whole video."""
    out: dict[str, Any] = {"throughputs": asdict(t), "key_block": block, "assumptions": ASSUMPTIONS,
                           "gpus": {k: {**asdict(g), "ridge": g.ridge} for k, g in GPUS.items()}, "geometries": {}}
    for key, m in MODELS.items():
        plan = m.plan()
        last = m.frames
        calls = {"dense": _mean_call(m, None, last, None), "kept": _mean_call(m, plan, last, None),
                 "visited": _mean_call(m, plan, last, block)}
        dense, kept, visited = video_costs(m, None), video_costs(m, plan), video_costs(m, plan, block)
        geometry: dict[str, Any] = {
            "model": asdict(m), "paper_speedup": PAPER_SPEEDUPS[key],
            "last_call": {name: {"flops": c.flops, "bytes": c.bytes, "intensity": c.intensity}
                          for name, c in calls.items()},
            "video_flops": {"dense": {k: c.flops for k, c in dense.items()},
                            "select": {k: c.flops for k, c in visited.items()}},
            "kept_fraction": kept["self_attention"].flops / dense["self_attention"].flops,
            "visited_fraction": visited["self_attention"].flops / dense["self_attention"].flops, "gpus": {}}
        for gname, gpu in GPUS.items():
            row: dict[str, Any] = {"last_call_ms": {
                "dense_at_dense_tflops": 1e3 * calls["dense"].seconds(gpu, t.dense_attention),
                "select_at_dense_tflops": 1e3 * calls["kept"].seconds(gpu, t.dense_attention),
                "select_at_kept_tflops": 1e3 * calls["visited"].seconds(gpu, t.kept_attention)}}
            base = _video_seconds(dense, gpu, t, t.dense_attention)
            same = _video_seconds(kept, gpu, t, t.dense_attention)
            ours = _video_seconds(visited, gpu, t, t.kept_attention)
            row["video_s"] = {"dense": base, "select_at_dense_tflops": same, "select_at_kept_tflops": ours}
            row["attention_share_dense"] = base["self_attention"] / sum(base.values())
            row["speedup"] = {"same_kernel_class": sum(base.values()) / sum(same.values()),
                              "triton_vs_flash": sum(base.values()) / sum(ours.values()),
                              "attention_free_limit": sum(base.values()) / (sum(base.values()) - base["self_attention"])}
            geometry["gpus"][gname] = row
        out["geometries"][key] = geometry
    return out


def markdown(p: dict[str, Any]) -> str:
    """The tables of docs/gpu_model.md."""
    t = p["throughputs"]
    lines = ["| geometry | piece | GFLOPs | MB | FLOPs/byte | H100 ridge | H200 ridge |", "|---|---|---|---|---|---|---|"]
    ridges = [p["gpus"][g]["ridge"] for g in ("H100", "H200")]
    for key, g in p["geometries"].items():
        for name, c in g["last_call"].items():
            label = {"dense": "dense call", "kept": "select/compact call (kept)",
                     "visited": f"select/compact call (visited, {p['key_block']}-token blocks)"}[name]
            lines.append(f"| {key} | {label} | {c['flops'] / 1e9:,.0f} | {c['bytes'] / 1e6:,.1f} | "
                         f"{c['intensity']:,.0f} | {ridges[0]:.0f} | {ridges[1]:.0f} |")
    lines += ["", f"| geometry | GPU | last call dense @{t['dense_attention']:.0f} | select @{t['dense_attention']:.0f} "
              f"| select @{t['kept_attention']:.0f} | dense attention share | speed-up, same kernel class | "
              f"speed-up, Triton @{t['kept_attention']:.0f} vs Flash @{t['dense_attention']:.0f} | "
              "no-attention limit | paper |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, g in p["geometries"].items():
        for gname, row in g["gpus"].items():
            ms, s = row["last_call_ms"], row["speedup"]
            lines.append(f"| {key} | {gname} | {ms['dense_at_dense_tflops']:.1f} ms | "
                         f"{ms['select_at_dense_tflops']:.1f} ms | {ms['select_at_kept_tflops']:.1f} ms | "
                         f"{100 * row['attention_share_dense']:.0f}% | {s['same_kernel_class']:.2f}x | "
                         f"{s['triton_vs_flash']:.2f}x | {s['attention_free_limit']:.2f}x | {g['paper_speedup']:.2f}x |")
    lines += ["", "| geometry | video TFLOPs dense: self-attention / linear / cross | select: self-attention | "
              "kept fraction | visited fraction | bound: 1 / kept fraction |", "|---|---|---|---|---|---|"]
    for key, g in p["geometries"].items():
        dense, sel = g["video_flops"]["dense"], g["video_flops"]["select"]
        lines.append(f"| {key} | {dense['self_attention'] / 1e12:,.0f} / {dense['linear'] / 1e12:,.0f} / "
                     f"{dense['cross_attention'] / 1e12:,.0f} | {sel['self_attention'] / 1e12:,.0f} | "
                     f"{g['kept_fraction']:.3f} | {g['visited_fraction']:.3f} | {1 / g['kept_fraction']:.2f}x |")
    return "\n".join(lines) + "\n"


def compare_kernels(p: dict[str, Any], measured: dict[str, Any], gpu: str) -> list[dict[str, Any]]:
    """Each row of ``benchmarks/kernels.py``'s JSON beside the model's time for it (at the measured ceilings):
    what the first GPU run reads to see which assumption broke."""
    geometry_of = {"sf480": "480p", "sf1080": "1080p"}
    limits = measured.get("ceilings", {})
    device = Gpu(gpu, limits.get("matmul_TFLOPs", GPUS[gpu].bf16_tflops),
                 limits.get("copy_GBps", GPUS[gpu].bandwidth_tbps * 1e3) / 1e3)
    t = Throughputs(**p["throughputs"])
    rows = []
    for r in measured.get("rows", []):
        m = MODELS[geometry_of[r["geometry"]]]
        kept = r["kept_ratio"] * m.heads * m.frames * m.frame_tokens
        dense = attention_call(m, [float(m.frames * m.frame_tokens)] * m.heads)
        call = attention_call(m, [kept / m.heads] * m.heads)
        rows.append({"geometry": r["geometry"], "plan": r["plan"],
                     "dense_ms": {"measured": r["dense_sdpa_ms"],
                                  "model": 1e3 * dense.seconds(device, t.dense_attention)},
                     "kernel_ms": {"measured": r["kernel_ms"], "model": 1e3 * call.seconds(device, t.kept_attention)},
                     "sdpa_on_kept_ms": {"measured": r["sdpa_on_kept_ms"],
                                         "model": 1e3 * call.seconds(device, t.dense_attention)}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fkv_compile.tools.roofline", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the predictions (and a comparison) to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/gpu_model.md")
    parser.add_argument("--compare", type=Path, help="a kernels_<dtype>.json written by benchmarks/kernels.py on a GPU")
    parser.add_argument("--gpu", choices=sorted(GPUS), help="the GPU the compared file was measured on (default: "
                        "read from its device name)")
    args = parser.parse_args(argv)
    p = predictions()
    if args.compare:
        measured = json.loads(args.compare.read_text())
        gpu = args.gpu or ("H200" if "H200" in measured.get("device", "") else "H100")
        p["comparison"] = {"file": str(args.compare), "gpu": gpu, "rows": compare_kernels(p, measured, gpu)}
        for r in p["comparison"]["rows"]:
            print(f"{r['geometry']:<7} {r['plan']:<24} " + "  ".join(
                f"{k} {v['measured']:.3f} ms (model {v['model']:.3f})" for k, v in r.items() if isinstance(v, dict)))
    if args.markdown or not (args.json or args.compare):
        print(markdown(p), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(p, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
