"""The ``fkv`` command: make, inspect, validate and convert head plans.

    fkv profile --model mini-windowed --out plan.json        profile a model, write a plan
    fkv plan show plan.json [--png plan.png]                  roles, kept tokens and bytes per layer
    fkv plan validate plan.json --model mini                  does the plan fit the model?
    fkv plan convert reference.json plan.json --frame-tokens 1560 --chunk-frames 3
    fkv check my_pkg.ci:forcing_kv_target --plan plan.json    equivalence of every mode, for CI
    fkv bench --geometry self-forcing-5s longlive-window      speed and memory, dense vs select vs compact

Every command takes ``--json`` for scripts; errors go to standard error with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .plan import PLAN_TYPE, HeadPlan, PlanError
from .profile import ProfileSettings, collect, tag
from .progress import Progress
from .semantics import kept_token_count

REFERENCE_FORMAT = "forcingkv_offline_head_custom2"


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


# -- models the CLI knows ------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_heads: int
    frame_tokens: int
    chunk_frames: int
    window_frames: int | None = None


@dataclass(frozen=True)
class ProfileTarget:
    """A model to profile: its geometry and ``run(compile_model, sample, on_chunk)``."""

    geometry: Geometry
    run: Callable[[Callable[[torch.nn.Module], torch.nn.Module], int, Callable[[int], None]], None]
    chunks: int


def _mini_target(windowed: bool, chunks: int | None) -> ProfileTarget:
    from .models import MiniConfig, build, make_inputs, rollout

    cfg = MiniConfig(num_layers=4, num_heads=4, dim=512, ffn_dim=1024,
                     **({"window_frames": 12, "sink_frames": 3} if windowed else {}))
    n = chunks or (10 if windowed else cfg.num_frames // cfg.chunk_frames)
    model = build(cfg)

    def run(compile_model, sample, on_chunk):
        inputs = make_inputs(cfg, chunks=n, seed=sample)
        rollout(compile_model(model), cfg, inputs, on_chunk=on_chunk)

    geometry = Geometry(cfg.num_layers, cfg.num_heads, cfg.frame_tokens, cfg.chunk_frames, cfg.cache_frames)
    return ProfileTarget(geometry, run, n)


def _planted_target(chunks: int | None) -> ProfileTarget:
    from .models.planted import PlantedAttentionStack, PlantedConfig, planted_rollout

    roles = tuple(tuple("static" if (layer + h) % 3 == 0 else "dynamic" for h in range(4)) for layer in range(3))
    cfg = PlantedConfig(roles=roles, num_frames=3 * (chunks or 5))
    torch.manual_seed(0)
    model = PlantedAttentionStack(cfg).eval()

    def run(compile_model, sample, on_chunk):
        planted_rollout(compile_model(model), cfg, seed=sample, steps=1, on_chunk=on_chunk)

    geometry = Geometry(cfg.num_layers, cfg.num_heads, cfg.frame_tokens, cfg.chunk_frames, cfg.num_frames)
    return ProfileTarget(geometry, run, cfg.num_frames // cfg.chunk_frames)


BUNDLED = {
    "mini": lambda chunks: _mini_target(False, chunks),
    "mini-windowed": lambda chunks: _mini_target(True, chunks),
    "planted": _planted_target,
}


def _load_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--model expected one of {sorted(BUNDLED)} or 'module:callable', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"--model {spec!r}: cannot load it ({exc})") from None
    if not callable(obj):
        raise CliError(f"--model {spec!r} is not callable")
    return obj


def _target(args: argparse.Namespace) -> ProfileTarget:
    if args.model in BUNDLED:
        return BUNDLED[args.model](args.chunks)
    fn = _load_callable(args.model)
    missing = [f"--{n.replace('_', '-')}" for n in ("layers", "heads", "frame_tokens", "chunk_frames") if getattr(args, n) is None]
    if missing:
        raise CliError(f"--model {args.model!r} (a callable) needs {', '.join(missing)}")
    geometry = Geometry(args.layers, args.heads, args.frame_tokens, args.chunk_frames)
    # a user callable: fn(compile_model, sample) builds or reuses its model, compiles it with
    # compile_model and runs a rollout; chunks are not known to us, so progress counts samples
    return ProfileTarget(geometry, lambda compile_model, sample, on_chunk: fn(compile_model, sample), 0)


# -- commands ------------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=1) if args.json else text)


def cmd_profile(args: argparse.Namespace) -> int:
    target = _target(args)
    g = target.geometry
    settings = ProfileSettings(alpha=args.alpha, sink_frames=args.sink_frames,
                               layer_static_budget=args.layer_static_budget, static_budget=args.static_budget,
                               forced=_parse_forced(args.force_layer))
    geometry_plan = HeadPlan.uniform("dense", num_layers=g.num_layers, num_heads=g.num_heads,
                                     frame_tokens=g.frame_tokens, chunk_frames=g.chunk_frames)
    options = {"plan": geometry_plan, "mode": "profile", "lowering": args.lowering}
    compiled: dict[int, torch.nn.Module] = {}

    def compile_model(model: torch.nn.Module) -> torch.nn.Module:
        if id(model) not in compiled:
            compiled[id(model)] = torch.compile(model, backend="forcing_kv", options=options)
        return compiled[id(model)]

    total = args.samples * max(target.chunks, 1)
    with Progress(total, "profiling", enabled=not (args.quiet or args.json)) as bar:
        for sample in range(args.samples):
            with tag(sample=sample):
                target.run(compile_model, sample, lambda chunk: bar.advance())
            if not target.chunks:
                bar.advance()
    if not compiled:
        raise CliError(f"--model {args.model!r} never called compile_model(model); nothing was profiled")
    profile = collect(next(iter(compiled.values())))
    plan = profile.plan(settings, selection=args.selection)
    plan.save(args.out)
    stability = profile.stability(settings)
    if args.png:
        from .plots import plot_plan

        plot_plan(plan, args.png)
    data = {"plan": str(args.out), "calls": len(profile.records), "static_heads": plan.count("static"),
            "dynamic_heads": plan.count("dynamic"), "heads": plan.num_layers * plan.num_heads,
            "scores": plan.provenance["scores"], "stability": stability.summary()}
    text = (f"profiled {len(profile.records)} attention calls; {plan.count('static')} of "
            f"{plan.num_layers * plan.num_heads} heads static (alpha {settings.alpha}); wrote {args.out}\n"
            f"{_roles_table(plan)}\nrole stability (agreement with the roles of the whole profile):\n{stability.table()}")
    _emit(args, data, text)
    return 0


def _parse_forced(items: Sequence[str]) -> dict[int, str]:
    forced = {}
    for item in items or ():
        layer, _, role = item.partition("=")
        if not layer.isdigit() or not role:
            raise CliError(f"--force-layer expected LAYER=ROLE (e.g. 0=static), got {item!r}")
        forced[int(layer)] = role
    return forced


def _roles_table(plan: HeadPlan) -> str:
    lines = [f"{'layer':>5}  roles (s static, d dynamic, . dense)"]
    symbol = {"static": "s", "dynamic": "d", "dense": "."}
    for layer, row in enumerate(plan.roles):
        lines.append(f"{layer:>5}  {''.join(symbol[r] for r in row)}")
    return "\n".join(lines)


def _show_rows(plan: HeadPlan, window_frames: int, video_frames: int, head_dim: int, dtype_bytes: int) -> list[dict[str, Any]]:
    """Per layer: heads per role, kept tokens at the full window, KV bytes attended per chunk and per video."""
    per_token = 2 * head_dim * dtype_bytes  # K and V of one head
    chunk_windows = [min(c + plan.chunk_frames, window_frames) for c in range(0, video_frames, plan.chunk_frames)]
    rows = []
    for layer, roles in enumerate(plan.roles):
        def tokens(frames: int, compressed: bool = True) -> float:
            return sum(kept_token_count(plan, r if compressed else "dense", frames) for r in roles)

        rows.append({
            "layer": layer,
            "static": roles.count("static"), "dynamic": roles.count("dynamic"), "dense": roles.count("dense"),
            "kept_tokens": tokens(window_frames) / len(roles),
            "dense_tokens": window_frames * plan.frame_tokens,
            "bytes_per_chunk": tokens(window_frames) * per_token,
            "dense_bytes_per_chunk": tokens(window_frames, False) * per_token,
            "bytes_per_video": sum(tokens(n) for n in chunk_windows) * per_token,
            "dense_bytes_per_video": sum(tokens(n, False) for n in chunk_windows) * per_token,
        })
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def cmd_plan_show(args: argparse.Namespace) -> int:
    plan = _load_plan(args.plan)
    rows = _show_rows(plan, args.window_frames, args.video_frames or args.window_frames, args.head_dim, args.dtype_bytes)
    totals = {k: sum(r[k] for r in rows) for k in ("bytes_per_chunk", "dense_bytes_per_chunk", "bytes_per_video", "dense_bytes_per_video")}
    if args.png:
        from .plots import plot_plan

        plot_plan(plan, args.png)
    lines = [
        f"plan: {plan.num_layers} layers x {plan.num_heads} heads, {plan.frame_tokens} tokens/frame, "
        f"{plan.chunk_frames}-frame chunks; window {args.window_frames} frames; KV attended in MiB "
        f"(head dim {args.head_dim}, {args.dtype_bytes} B/element)",
        f"{'layer':>5} {'static':>6} {'dyn':>4} {'dense':>5} {'kept/dense tokens':>20} {'MiB/chunk':>10} "
        f"{'dense':>9} {'MiB/video':>10} {'dense':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r['layer']:>5} {r['static']:>6} {r['dynamic']:>4} {r['dense']:>5} "
            f"{r['kept_tokens']:>10.1f}/{r['dense_tokens']:<9} {_mib(r['bytes_per_chunk']):>10} "
            f"{_mib(r['dense_bytes_per_chunk']):>9} {_mib(r['bytes_per_video']):>10} {_mib(r['dense_bytes_per_video']):>10}"
        )
    lines.append(
        f"total: {_mib(totals['bytes_per_chunk'])} of {_mib(totals['dense_bytes_per_chunk'])} MiB per chunk "
        f"({totals['bytes_per_chunk'] / totals['dense_bytes_per_chunk']:.3f}), {_mib(totals['bytes_per_video'])} of "
        f"{_mib(totals['dense_bytes_per_video'])} MiB per video"
    )
    _emit(args, {"plan": str(args.plan), "window_frames": args.window_frames, "layers": rows, "totals": totals},
          "\n".join(lines))
    return 0


def _geometry_of(args: argparse.Namespace) -> Geometry:
    if args.model and args.geometry:
        raise CliError("give either --model or --geometry, not both")
    if args.model:
        if args.model not in BUNDLED:
            raise CliError(f"--model expected one of {sorted(BUNDLED)} for validate, got {args.model!r}; "
                           "describe other models with --geometry")
        return BUNDLED[args.model](None).geometry
    if not args.geometry:
        raise CliError("validate needs --model NAME or --geometry layers=..,heads=..,frame_tokens=..,chunk_frames=..")
    fields = {}
    for item in args.geometry.split(","):
        key, _, value = item.partition("=")
        if key not in Geometry.__dataclass_fields__ or not value.strip().isdigit():
            raise CliError(f"--geometry expected KEY=INT with KEY in {sorted(Geometry.__dataclass_fields__)}, got {item!r}")
        fields[key] = int(value)
    missing = {"num_layers", "num_heads", "frame_tokens", "chunk_frames"} - fields.keys()
    if missing:
        raise CliError(f"--geometry is missing {sorted(missing)}")
    return Geometry(**fields)


def cmd_plan_validate(args: argparse.Namespace) -> int:
    plan = _load_plan(args.plan)
    g = _geometry_of(args)
    problems = []
    if plan.frame_tokens != g.frame_tokens:
        problems.append(f"frame_tokens: plan has {plan.frame_tokens}, model has {g.frame_tokens}")
    if plan.chunk_frames != g.chunk_frames:
        problems.append(f"chunk_frames: plan has {plan.chunk_frames}, model has {g.chunk_frames}")
    try:
        plan.validate_geometry(num_layers=g.num_layers, num_heads=g.num_heads, window_frames=g.window_frames)
    except PlanError as exc:
        problems.insert(0, str(exc).removeprefix("plan does not match the model: "))
    if problems:
        message = "plan does not match the model: " + "; ".join(problems)
        if args.json:
            print(json.dumps({"ok": False, "error": message}))
            return 1
        raise CliError(message)
    _emit(args, {"ok": True}, f"OK: {args.plan} fits {g}")
    return 0


def _load_plan(path: str) -> HeadPlan:
    try:
        return HeadPlan.load(path)
    except FileNotFoundError:
        raise CliError(f"plan file not found: {path}") from None


def _to_reference(plan: HeadPlan) -> dict[str, Any]:
    if plan.count("dense"):
        raise CliError("the reference format has no 'dense' role; this plan has dense heads")
    data = plan.to_dict()["data"]
    return {
        "format": REFERENCE_FORMAT,
        "num_layers": plan.num_layers,
        "num_heads": plan.num_heads,
        "description": "converted from an fkv-compile plan; role parameters kept under 'fkv_compile'",
        "fkv_compile": {k: v for k, v in data.items() if k != "roles"},
        "layers": [{"layer_idx": i, "static_head": list(plan.heads(i, "static")), "dynamic_head": list(plan.heads(i, "dynamic"))}
                   for i in range(plan.num_layers)],
    }


def cmd_plan_convert(args: argparse.Namespace) -> int:
    try:
        with open(args.src, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CliError(f"cannot read {args.src}: {exc}") from None
    if isinstance(doc, dict) and doc.get("type") == PLAN_TYPE:
        out, fmt = _to_reference(HeadPlan.from_dict(doc)), "reference"
    else:
        embedded = doc.get("fkv_compile", {}) if isinstance(doc, dict) else {}
        frame_tokens = args.frame_tokens or embedded.get("frame_tokens")
        chunk_frames = args.chunk_frames or embedded.get("chunk_frames")
        if frame_tokens is None or chunk_frames is None:
            raise CliError("converting a reference plan needs --frame-tokens and --chunk-frames")
        params = {**{f"static_{k}": v for k, v in embedded.get("static", {}).items()},
                  **{f"dynamic_{k}": v for k, v in embedded.get("dynamic", {}).items()}}
        params.update({key: embedded[key] for key in ("selection", "segment_choice") if key in embedded})
        plan = HeadPlan.from_reference_json(args.src, frame_tokens=frame_tokens, chunk_frames=chunk_frames, **params)
        if embedded.get("provenance"):
            plan = HeadPlan.from_dict({**plan.to_dict(), "data": {**plan.to_dict()["data"], "provenance": embedded["provenance"]}})
        out, fmt = plan.to_dict(), "fkv_compile"
    with open(args.dst, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    _emit(args, {"written": str(args.dst), "format": fmt}, f"wrote {args.dst} ({fmt} format)")
    return 0


def _check_target(args: argparse.Namespace) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], Any]]:
    """``(model_factory, rollout)`` of a bundled miniature, or what a user's ``module:callable`` returns."""
    if args.model in ("mini", "mini-windowed"):
        from .models import MiniConfig, build, make_inputs, rollout

        cfg = MiniConfig(**({"window_frames": 12, "sink_frames": 3} if args.model == "mini-windowed" else {}))
        inputs = make_inputs(cfg, chunks=args.chunks or 5, seed=0)
        return (lambda: build(cfg, seed=0)), (lambda model: rollout(model, cfg, inputs))
    target = _load_callable(args.model)()
    if not (isinstance(target, tuple) and len(target) == 2 and all(callable(t) for t in target)):
        raise CliError(f"--model {args.model!r} must return (model_factory, rollout): two callables, "
                       f"got {type(target).__name__}")
    return target


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_equivalence

    model_factory, rollout = _check_target(args)
    result = check_equivalence(model_factory, rollout, _load_plan(args.plan), args.modes, args.lowering)
    _emit(args, result.to_dict(), result.table())
    if not result.passed:
        print("fkv check: FAILED\n  " + "\n  ".join(result.failures()), file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import GEOMETRIES, BenchSettings, run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    side = args.side if args.side is not None else (1 if device == "cuda" else 2)
    results, lines = {}, []
    with Progress(len(args.geometry) * (1 + len(args.modes)), "benchmarking",
                  enabled=not (args.quiet or args.json)) as bar:
        for name in args.geometry:
            settings = BenchSettings(geometry=name, side=1 if name == "tiny" else side, layers=args.layers,
                                     heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                                     repeats=args.repeats, device=device, plan=args.plan)
            try:
                result = run_bench(settings, Path(args.out), tuple(args.modes), bar.advance, png=not args.no_png)
            except (ValueError, RuntimeError) as exc:
                raise CliError(str(exc)) from None
            results[name] = result
            g = result["geometry"]
            lines.append(f"{name}: {GEOMETRIES[name].note}; {g['frame_tokens']} tokens per frame here "
                         f"({g['real_frame_tokens']} at real size), {args.layers} layers x {args.heads} heads, {device}")
            for row in result["call"]:
                lines.append(f"  call, layer {row['layer']}: kept/dense tokens {row['kept_ratio']:.3f}; time vs dense: "
                             f"select {row['select_ratio']:.3f}, compact {row['compact_ratio']:.3f} "
                             f"(dense {row['dense_ms']:.1f} ms, {row['kernels']} kernels)")
            for mode, r in result["rollout"].items():
                ratio = result.get("ratios_vs_dense", {}).get(mode, {})
                lines.append(f"  rollout {mode:<8} video {r['video_s']:8.3f} s"
                             + (f" (x{ratio['video_time']:.3f})" if ratio else "")
                             + f"  attention {100 * r['attention_share']:4.1f}%  KV {r['kv_bytes'] / 2**20:8.1f} MiB"
                             + f"  peak RSS {r['peak_rss_bytes'] / 2**20:8.1f} MiB  compile {r['compile_s']:6.1f} s"
                             + f"  recompiles {r['graphs_after_warmup']}  FPS {r['fps']:.2f}")
    lines.append(f"wrote {args.out}/bench_<geometry>.json, .csv" + ("" if args.no_png else ", .png"))
    _emit(args, results, "\n".join(lines))
    return 0


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile a model's heads and write a plan")
    p.add_argument("--model", default="mini-windowed",
                   help=f"one of {sorted(BUNDLED)}, or module:callable called as fn(compile_model, sample)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--chunks", type=int, help="chunks per sample (bundled models)")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--sink-frames", type=int, default=3, help="key frames left out of the score's denominator")
    p.add_argument("--layer-static-budget", type=int)
    p.add_argument("--static-budget", type=int)
    p.add_argument("--force-layer", action="append", metavar="LAYER=ROLE")
    p.add_argument("--selection", choices=["layer", "head"], default="layer")
    p.add_argument("--lowering", choices=["inductor", "aot_eager", "eager"], default="aot_eager")
    for name in ("layers", "heads", "frame-tokens", "chunk-frames"):
        p.add_argument(f"--{name}", type=int, help="geometry of a module:callable model")
    p.add_argument("--png", help="also write a picture of the scores and mass curves")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="inspect, validate, convert plans").add_subparsers(dest="plan_command", required=True)
    s = plan.add_parser("show", help="per layer: heads per role, kept tokens, KV bytes vs dense")
    s.add_argument("plan")
    s.add_argument("--window-frames", type=int, default=21)
    s.add_argument("--video-frames", type=int, help="frames per video (default: the window)")
    s.add_argument("--head-dim", type=int, default=128)
    s.add_argument("--dtype-bytes", type=int, default=2)
    s.add_argument("--png")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan_show)

    v = plan.add_parser("validate", help="check a plan against a model or a geometry")
    v.add_argument("plan")
    v.add_argument("--model", help=f"one of {sorted(BUNDLED)}")
    v.add_argument("--geometry", help="num_layers=30,num_heads=12,frame_tokens=1560,chunk_frames=3[,window_frames=21]")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_plan_validate)

    c = plan.add_parser("convert", help="reference JSON <-> fkv-compile plan (direction from the input)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--frame-tokens", type=int)
    c.add_argument("--chunk-frames", type=int)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_plan_convert)

    k = sub.add_parser("check", help="equivalence of off/oracle/select/compact on a model's rollout (for CI)")
    k.add_argument("model", help="mini, mini-windowed, or module:callable returning (model_factory, rollout)")
    k.add_argument("--plan", required=True)
    k.add_argument("--modes", nargs="+", default=["off", "oracle", "select", "compact"],
                   choices=["off", "oracle", "select", "compact"])
    k.add_argument("--lowering", choices=["inductor", "aot_eager", "eager"], default="inductor")
    k.add_argument("--chunks", type=int, help="chunks of the bundled miniatures' rollout (default 5)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="time and memory, dense vs select vs compact, at named geometries")
    b.add_argument("--geometry", nargs="+", default=["self-forcing-5s", "longlive-window"],
                   choices=["self-forcing-5s", "longlive-window", "1080p", "tiny"])
    b.add_argument("--side", type=int, help="divide the latent height and width by this (default 2 on CPU, 1 on CUDA)")
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--heads", type=int, default=12)
    b.add_argument("--head-dim", type=int, default=128)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    b.add_argument("--repeats", type=int, default=2, help="timed videos per mode after a warm-up video")
    b.add_argument("--modes", nargs="+", default=["dense", "select", "compact"], choices=["dense", "select", "compact"])
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--plan", help="a plan (its first --layers layers); default: 37%% static heads, as the reference")
    b.add_argument("--out", default="bench_results")
    b.add_argument("--no-png", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # models' expected graph-break warnings
    try:
        return args.func(args)
    except (CliError, PlanError) as exc:
        print(f"fkv: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
