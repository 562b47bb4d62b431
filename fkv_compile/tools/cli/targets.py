"""The models ``fkv`` verbs run: the bundled miniatures by name, or a user's ``module:callable``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...models.miniatures import MINIATURES
from ...plan import DYNAMIC, STATIC, HeadPlan, PlanError
from ..check import Target
from .common import CliError, load_callable

__all__ = ["Geometry", "ProfileTarget", "BUNDLED", "CHECKABLE", "profile_target", "check_target",
           "bundled_check_target", "geometry_of", "miniature_geometry"]


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_heads: int
    frame_tokens: int
    chunk_frames: int
    window_frames: int | None = None

    def misfits(self, plan: HeadPlan) -> list[str]:
        """Every way ``plan`` does not fit a model of this geometry (empty: it fits)."""
        problems = []
        try:
            plan.validate_geometry(num_layers=self.num_layers, num_heads=self.num_heads,
                                   window_frames=self.window_frames)
        except PlanError as exc:
            problems.append(str(exc).removeprefix("plan does not match the model: "))
        if plan.frame_tokens != self.frame_tokens:
            problems.append(f"frame_tokens: plan has {plan.frame_tokens}, model has {self.frame_tokens}")
        if plan.chunk_frames != self.chunk_frames:
            problems.append(f"chunk_frames: plan has {plan.chunk_frames}, model has {self.chunk_frames}")
        return problems


@dataclass(frozen=True)
class ProfileTarget:
    """A model to profile: its geometry and ``run(compile_model, sample, on_chunk)``."""

    geometry: Geometry
    run: Callable[[Callable[[torch.nn.Module], torch.nn.Module], int, Callable[[int], None]], None]
    chunks: int


def miniature_geometry(name: str) -> Geometry:
    """The geometry of the bundled miniature ``name`` (:data:`fkv_compile.models.MINIATURES`)."""
    cfg = MINIATURES[name].config
    return Geometry(cfg.num_layers, cfg.num_heads, cfg.frame_tokens, cfg.chunk_frames, cfg.cache_frames)


def _mini_target(name: str, chunks: int | None) -> ProfileTarget:
    from ...models import build, make_inputs, rollout

    cfg = MINIATURES[name].config
    n = chunks or MINIATURES[name].chunks
    model = build(cfg)

    def run(compile_model, sample, on_chunk):
        inputs = make_inputs(cfg, chunks=n, seed=sample)
        rollout(compile_model(model), cfg, inputs, on_chunk=on_chunk)

    return ProfileTarget(miniature_geometry(name), run, n)


def _planted_target(chunks: int | None) -> ProfileTarget:
    from ...models.planted import PlantedAttentionStack, PlantedConfig, planted_rollout

    roles = tuple(tuple(STATIC if (layer + h) % 3 == 0 else DYNAMIC for h in range(4)) for layer in range(3))
    cfg = PlantedConfig(roles=roles, num_frames=3 * (chunks or 5))
    torch.manual_seed(0)
    model = PlantedAttentionStack(cfg).eval()

    def run(compile_model, sample, on_chunk):
        planted_rollout(compile_model(model), cfg, seed=sample, steps=1, on_chunk=on_chunk)

    geometry = Geometry(cfg.num_layers, cfg.num_heads, cfg.frame_tokens, cfg.chunk_frames, cfg.num_frames)
    return ProfileTarget(geometry, run, cfg.num_frames // cfg.chunk_frames)


BUNDLED: dict[str, Callable[[int | None], ProfileTarget]] = {
    **{name: (lambda chunks, name=name: _mini_target(name, chunks)) for name in MINIATURES},
    "planted": _planted_target,
}
CHECKABLE = tuple(MINIATURES)  # the bundled models `fkv check` runs


def profile_target(args: argparse.Namespace) -> ProfileTarget:
    if args.model in BUNDLED:
        return BUNDLED[args.model](args.chunks)
    fn = load_callable(args.model, "--model", f"one of {sorted(BUNDLED)}")
    missing = [f"--{n.replace('_', '-')}" for n in ("layers", "heads", "frame_tokens", "chunk_frames") if getattr(args, n) is None]
    if missing:
        raise CliError(f"--model {args.model!r} (a callable) needs {', '.join(missing)}")
    geometry = Geometry(args.layers, args.heads, args.frame_tokens, args.chunk_frames)
    # a user callable: fn(compile_model, sample) builds or reuses its model, compiles it with
    # compile_model and runs a rollout; chunks are not known to us, so progress counts samples
    return ProfileTarget(geometry, lambda compile_model, sample, on_chunk: fn(compile_model, sample), 0)


def bundled_check_target(name: str, chunks: int | None = None, dtype: torch.dtype = torch.float32) -> Target:
    """A bundled miniature's check target in ``dtype``: seeded weights, and a rollout of two videos of ``chunks``
    chunks each (state carried from one video into the next shows in the second)."""
    from ...models import build, make_inputs, rollout

    cfg, chunks = MINIATURES[name].config, chunks or MINIATURES[name].chunks
    videos = [make_inputs(cfg, chunks=chunks, seed=seed, dtype=dtype) for seed in (0, 1)]
    return Target(lambda: build(cfg, seed=0, dtype=dtype),
                  lambda model: [out for inputs in videos for out in rollout(model, cfg, inputs)])


def check_target(args: argparse.Namespace) -> tuple[Target, Target | None]:
    """The model ``fkv check`` checks, and its float32 twin where the model is in a lower precision: a bundled
    miniature, or what a user's ``module:callable`` returns, ``(model_factory, rollout)`` or
    ``(model_factory, rollout, (twin_model_factory, twin_rollout))``."""
    if args.model in CHECKABLE:
        dtype = getattr(torch, args.dtype)
        twin = bundled_check_target(args.model, args.chunks) if dtype != torch.float32 else None
        return bundled_check_target(args.model, args.chunks, dtype), twin
    if args.dtype != "float32":
        raise CliError("--dtype applies to the bundled models; a module:callable target builds its model itself")
    target = load_callable(args.model, "--model", f"one of {list(CHECKABLE)}")()
    if not (isinstance(target, tuple) and len(target) in (2, 3) and all(callable(t) for t in target[:2])):
        raise CliError(f"--model {args.model!r} must return (model_factory, rollout) or (model_factory, rollout, "
                       f"(twin_factory, twin_rollout)), got {type(target).__name__}")
    twin = target[2] if len(target) == 3 else None
    if twin is not None and not (isinstance(twin, tuple) and len(twin) == 2 and all(callable(t) for t in twin)):
        raise CliError(f"--model {args.model!r}: the third element must be (twin_factory, twin_rollout)")
    return Target(*target[:2]), Target(*twin) if twin is not None else None


def geometry_of(args: argparse.Namespace) -> Geometry:
    """A bundled model's geometry (``--model``) or one given as ``--geometry key=int,...``."""
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
