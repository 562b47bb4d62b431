"""KV bytes and peak process memory, dense vs ``compact``, at CPU-scaled Self Forcing and LongLive geometries.

LongLive runs its own cache pattern (v1's per-layer clone, ``cat(sink, window)``, the write after all
layers) with its reference plan, in ``compact`` twice: with the KV-recache reserve (the default,
exact after a prompt switch) and without it (``kv_recache=False``).

Each configuration runs in its own process so that peak RSS (``VmHWM``) is its own. ``compact`` runs with
``release="trust"`` (the dense buffers go at the first call), since each process runs one video: with the default
``release="watch"`` the first video keeps them beside the store. Both use
``aot_eager`` lowering (same compile overhead). Real size is 1560 tokens per frame, 30 layers,
bf16; the scale used here is printed and KV bytes scale linearly in tokens, layers and bytes per
element, so the real-size numbers follow by arithmetic (printed too).

    python benchmarks/memory.py              # Self Forcing 5 s and LongLive window, dense vs compact
    python benchmarks/memory.py --long 1000  # plus a 1000-chunk compact rollout of the windowed miniature
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from common import write_results

from fkv_compile.tools.bench import GEOMETRIES as ALL_GEOMETRIES
from fkv_compile.tools.bench import in_fresh_process, peak_rss

PLANS = Path(__file__).resolve().parents[1] / "fkv_compile" / "plans"
GEOMETRIES = {name: ALL_GEOMETRIES[name] for name in ("self-forcing-5s", "longlive-window")}
REFERENCE_PLANS = {"self-forcing-5s": PLANS / "forcingkv_heads_selfforcing.json",
                   "longlive-window": PLANS / "forcingkv_heads_longlive.json"}
MODES = {"self-forcing-5s": ("dense", "compact"), "longlive-window": ("dense", "compact", "compact-no-recache")}


def run_one(geometry: str, mode: str, layers: int, latent: tuple[int, int]) -> dict:
    """One rollout in this process; returns KV bytes and peak RSS."""
    import torch

    import fkv_compile
    from fkv_compile import HeadPlan
    from fkv_compile.models import MiniConfig, build, make_inputs, new_caches, rollout

    g = GEOMETRIES[geometry]
    cfg = MiniConfig(dim=1536, num_heads=12, num_layers=layers, ffn_dim=1536, latent_height=latent[0],
                     latent_width=latent[1], num_frames=21, window_frames=g.window_frames, sink_frames=g.sink_frames,
                     cache_style=g.cache_style)
    model = build(cfg)
    inputs = make_inputs(cfg, chunks=g.chunks)
    reference = HeadPlan.from_reference_json(REFERENCE_PLANS[geometry], frame_tokens=cfg.frame_tokens, chunk_frames=3)
    plan = HeadPlan.from_roles(reference.roles[:layers], frame_tokens=cfg.frame_tokens, chunk_frames=3)
    kv, cross = new_caches(cfg, batch=1, dtype=torch.float32)
    dense_bytes = sum(c[n].nbytes for c in kv for n in ("k", "v"))
    if mode == "dense":
        compiled = torch.compile(model, backend="aot_eager")
    else:
        compiled = torch.compile(model, backend="forcing_kv", options={
            "plan": plan, "mode": "compact", "lowering": "aot_eager", "kv_recache": mode != "compact-no-recache",
            "release": "trust"})  # one video per process: the store's memory from the first call on
    with torch._dynamo.config.patch(recompile_limit=16):  # LongLive's first call adds a variant (docs/longlive.md)
        rollout(compiled, cfg, inputs, caches=(kv, cross))
    kv_bytes = dense_bytes if mode == "dense" else fkv_compile.memory_report(compiled).compact_bytes
    return {"geometry": geometry, "mode": mode, "kv_bytes": kv_bytes, "dense_kv_bytes": dense_bytes,
            "peak_rss_bytes": peak_rss(),
            "frame_tokens": cfg.frame_tokens, "layers": layers, "static_heads": plan.count("static"),
            "heads": plan.num_layers * plan.num_heads}


def run_long(chunks: int) -> dict:
    """A ``chunks``-long compact rollout of the windowed miniature: store bytes and RSS every 10%."""
    import torch

    import fkv_compile
    from fkv_compile import HeadPlan
    from fkv_compile.models import MiniConfig, build, make_inputs, rollout

    # rotary tables long enough for the video's absolute frame positions
    cfg = MiniConfig(num_layers=2, window_frames=12, sink_frames=3, rope_positions=3 * chunks + 16)
    model = build(cfg)
    inputs = make_inputs(cfg, chunks=chunks)
    plan = HeadPlan.from_roles([["static", "dynamic"]] * 2, frame_tokens=cfg.frame_tokens, chunk_frames=3)
    compiled = torch.compile(model, backend="forcing_kv", options={"plan": plan, "mode": "compact", "lowering": "aot_eager"})
    samples = []

    def on_chunk(chunk: int) -> None:
        if chunk % max(1, chunks // 10) == 0 or chunk == chunks - 1:
            samples.append({"chunk": chunk, "kv_bytes": fkv_compile.memory_report(compiled).compact_bytes,
                            "rss_bytes": _current_rss()})

    rollout(compiled, cfg, inputs, on_chunk=on_chunk)
    return {"chunks": chunks, "samples": samples}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--latent", type=int, nargs=2, default=(26, 60), metavar=("H", "W"))
    parser.add_argument("--long", type=int, default=0, help="also run a compact rollout of this many chunks")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_long(int(args.child[1])) if args.child[0] == "long" else run_one(args.child[0], args.child[1], args.layers, tuple(args.latent))
        print(json.dumps(result))
        return
    rows = []
    for geometry in GEOMETRIES:
        for mode in MODES[geometry]:
            argv = [__file__, "--layers", str(args.layers), "--latent", *map(str, args.latent), "--child", geometry, mode]
            rows.append(in_fresh_process(argv, f"the {geometry} {mode} rollout"))
            r = rows[-1]
            print(f"{geometry:<16} {mode:<18} KV {r['kv_bytes'] / 2**20:8.1f} MiB   peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB",
                  flush=True)
    summary = {}
    for geometry in GEOMETRIES:
        dense = next(r for r in rows if r["geometry"] == geometry and r["mode"] == "dense")
        real_dense = dense["kv_bytes"] / (dense["frame_tokens"] * dense["layers"] * 4) * 1560 * 30 * 2  # bf16
        for mode in MODES[geometry][1:]:
            compact = next(r for r in rows if r["geometry"] == geometry and r["mode"] == mode)
            kv_cut = 1 - compact["kv_bytes"] / dense["kv_bytes"]
            summary[f"{geometry} {mode}"] = {
                "kv_reduction": kv_cut, "rss_saved_bytes": dense["peak_rss_bytes"] - compact["peak_rss_bytes"],
                "real_size_dense_kv_gib": real_dense / 2**30, "real_size_compact_kv_gib": real_dense * (1 - kv_cut) / 2**30}
            print(f"{geometry} {mode}: {100 * kv_cut:.1f}% fewer KV bytes; peak RSS {dense['peak_rss_bytes'] / 2**20:.0f} "
                  f"-> {compact['peak_rss_bytes'] / 2**20:.0f} MiB; at real size (1560 tokens/frame, 30 layers, bf16) "
                  f"{real_dense / 2**30:.2f} GiB -> {real_dense * (1 - kv_cut) / 2**30:.2f} GiB of KV")
    payload = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows, "summary": summary}
    if args.long:
        long = in_fresh_process([__file__, "--child", "long", str(args.long)], "the long rollout")
        payload["long_rollout"] = long
        for s in long["samples"]:
            print(f"chunk {s['chunk']:>5}: store {s['kv_bytes']:,} bytes, RSS {s['rss_bytes'] / 2**20:.1f} MiB")
    print(f"wrote {write_results('memory_cpu', payload)}")


if __name__ == "__main__":
    main()
