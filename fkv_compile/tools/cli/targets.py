"""The models ``fkv`` verbs run: the bundled miniatures by name, or a user's ``module:callable``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...plan import DYNAMIC, STATIC
from ..check import Target
from .common import CliError, load_callable

__all__ = ["Geometry", "ProfileTarget", "BUNDLED", "CHECKABLE", "profile_target", "check_target", "bundled_check_target",
           "geometry_of"]


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


def _mini_config(windowed: bool, **sizes: int):
    from ...models import MiniConfig

    return MiniConfig(**sizes, **({"window_frames": 12, "sink_frames": 3} if windowed else {}))


def _mini_target(windowed: bool, chunks: int | None) -> ProfileTarget:
    from ...models import build, make_inputs, rollout

    cfg = _mini_config(windowed, num_layers=4, num_heads=4, dim=512, ffn_dim=1024)
    n = chunks or (10 if windowed else cfg.num_frames // cfg.chunk_frames)
    model = build(cfg)

    def run(compile_model, sample, on_chunk):
        inputs = make_inputs(cfg, chunks=n, seed=sample)
        rollout(compile_model(model), cfg, inputs, on_chunk=on_chunk)

    geometry = Geometry(cfg.num_layers, cfg.num_heads, cfg.frame_tokens, cfg.chunk_frames, cfg.cache_frames)
    return ProfileTarget(geometry, run, n)


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
    "mini": lambda chunks: _mini_target(False, chunks),
    "mini-windowed": lambda chunks: _mini_target(True, chunks),
    "planted": _planted_target,
}
CHECKABLE = ("mini", "mini-windowed")  # the bundled models `fkv check` runs


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


def bundled_check_target(name: str, chunks: int, dtype: torch.dtype = torch.float32) -> Target:
    """A bundled miniature's check target in ``dtype``: seeded weights, and a rollout of two videos of ``chunks``
    chunks each (state carried from one video into the next shows in the second)."""
    from ...models import build, make_inputs, rollout

    cfg = _mini_config(name == "mini-windowed")
    videos = [make_inputs(cfg, chunks=chunks, seed=seed, dtype=dtype) for seed in (0, 1)]
    return Target(lambda: build(cfg, seed=0, dtype=dtype),
                  lambda model: [out for inputs in videos for out in rollout(model, cfg, inputs)])


def check_target(args: argparse.Namespace) -> tuple[Target, Target | None]:
    """The model ``fkv check`` checks, and its float32 twin where the model is in a lower precision: a bundled
    miniature, or what a user's ``module:callable`` returns, ``(model_factory, rollout)`` or
    ``(model_factory, rollout, (twin_model_factory, twin_rollout))``."""
    if args.model in CHECKABLE:
        dtype = getattr(torch, args.dtype)
        twin = bundled_check_target(args.model, args.chunks or 5) if dtype != torch.float32 else None
        return bundled_check_target(args.model, args.chunks or 5, dtype), twin
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
