"""``fkv profile``: profile a model's heads (mode ``profile``) and write the plan made from it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ...modes.profile import tag
from ...plan import DENSE, DYNAMIC, STATIC, HeadPlan
from ..profiling import ProfileSettings, collect
from ..progress import Progress
from .common import CliError, emit
from .targets import profile_target

__all__ = ["cmd_profile", "roles_table"]


def cmd_profile(args: argparse.Namespace) -> int:
    target = profile_target(args)
    g = target.geometry
    settings = ProfileSettings(alpha=args.alpha, sink_frames=args.sink_frames,
                               layer_static_budget=args.layer_static_budget, static_budget=args.static_budget,
                               forced=_parse_forced(args.force_layer))
    geometry_plan = HeadPlan.uniform(DENSE, num_layers=g.num_layers, num_heads=g.num_heads,
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
        from ..plots import plot_plan

        plot_plan(plan, args.png)
    data = {"plan": str(args.out), "calls": len(profile.records), "static_heads": plan.count(STATIC),
            "dynamic_heads": plan.count(DYNAMIC), "heads": plan.num_layers * plan.num_heads,
            "scores": plan.provenance["scores"], "stability": stability.summary()}
    text = (f"profiled {len(profile.records)} attention calls; {plan.count(STATIC)} of "
            f"{plan.num_layers * plan.num_heads} heads static (alpha {settings.alpha}); wrote {args.out}\n"
            f"{roles_table(plan)}\nrole stability (agreement with the roles of the whole profile):\n{stability.table()}")
    emit(args, data, text)
    return 0


def _parse_forced(items: Sequence[str]) -> dict[int, str]:
    forced = {}
    for item in items or ():
        layer, _, role = item.partition("=")
        if not layer.isdigit() or not role:
            raise CliError(f"--force-layer expected LAYER=ROLE (e.g. 0=static), got {item!r}")
        forced[int(layer)] = role
    return forced


def roles_table(plan: HeadPlan) -> str:
    lines = [f"{'layer':>5}  roles (s static, d dynamic, . dense)"]
    symbol = {STATIC: "s", DYNAMIC: "d", DENSE: "."}
    for layer, row in enumerate(plan.roles):
        lines.append(f"{layer:>5}  {''.join(symbol[r] for r in row)}")
    return "\n".join(lines)


