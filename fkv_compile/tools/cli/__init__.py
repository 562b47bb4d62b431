"""The ``fkv`` command: make, inspect, validate and convert head plans; check and benchmark models.

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
import importlib.util
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from ...config import LOWERINGS
from ...plan import SELECTIONS, PlanError
from ..bench import GEOMETRIES
from ..bench import MODES as BENCH_MODES
from ..check import CHECKED_MODES, DEFAULT_MODES
from .bench import cmd_bench
from .check import cmd_check
from .common import CliError, non_negative_int, positive_int
from .plan import cmd_plan_convert, cmd_plan_list, cmd_plan_show, cmd_plan_validate
from .profile import cmd_profile
from .targets import BUNDLED, CHECKABLE

__all__ = ["build_parser", "main"]

JSON_HELP = "print the result as JSON (for scripts) instead of text"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (``fkv plan show: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fkv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile a model's heads and write a plan")
    p.add_argument("--model", default="mini-windowed",
                   help=f"one of {sorted(BUNDLED)}, or module:callable called as fn(compile_model, sample)")
    p.add_argument("--out", required=True, help="where to write the plan JSON")
    p.add_argument("--samples", type=positive_int, default=2, help="rollouts profiled, each with its own inputs "
                   "(default 2; the stability table compares them)")
    p.add_argument("--chunks", type=positive_int, help="chunks per sample (bundled models)")
    p.add_argument("--alpha", type=float, default=0.8,
                   help="a head is static when its score (mass on the chunk + transition frame) is at least this")
    p.add_argument("--sink-frames", type=non_negative_int, default=3, help="key frames left out of the score's denominator")
    p.add_argument("--layer-static-budget", type=non_negative_int,
                   help="at most this many static heads per layer (the highest scores)")
    p.add_argument("--static-budget", type=non_negative_int, help="at most this many static heads in the model")
    p.add_argument("--force-layer", action="append", metavar="LAYER=ROLE",
                   help="give every head of LAYER this role (static, dynamic or dense); repeatable")
    p.add_argument("--selection", choices=SELECTIONS, default="layer",
                   help="dynamic heads choose segments per layer (keys concatenated, the reference) or per head")
    p.add_argument("--lowering", choices=LOWERINGS, default="aot_eager",
                   help="how the profiled graphs are compiled (profiling is exact in every lowering)")
    for name in ("layers", "heads", "frame-tokens", "chunk-frames"):
        p.add_argument(f"--{name}", type=positive_int, help="geometry of a module:callable model")
    p.add_argument("--png", help="also write a picture of the scores and mass curves here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="inspect, validate, convert plans").add_subparsers(dest="plan_command", required=True)
    ls = plan.add_parser("list", help="the plans shipped by name (the Forcing-KV release's), native geometry")
    ls.add_argument("--json", action="store_true", help=JSON_HELP)
    ls.set_defaults(func=cmd_plan_list)

    s = plan.add_parser("show", help="per layer: heads per role, kept tokens, KV bytes vs dense")
    s.add_argument("plan", help="a plan file or a bundled plan's name (fkv plan list)")
    s.add_argument("--window-frames", type=positive_int, default=21,
                   help="the model's KV window in frames, current chunk included (default 21: Self Forcing's 5 s)")
    s.add_argument("--video-frames", type=positive_int, help="frames per video (default: the window)")
    s.add_argument("--head-dim", type=positive_int, default=128, help="for the bytes columns (default 128)")
    s.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per K/V element (default 2: bf16)")
    s.add_argument("--ranks", type=positive_int, help="also the kept tokens per rank when heads are split over this many ranks")
    s.add_argument("--png", help="also write a picture of the roles (or scores) here (needs matplotlib)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_plan_show)

    v = plan.add_parser("validate", help="check a plan against a model or a geometry")
    v.add_argument("plan", help="a plan file or a bundled plan's name (fkv plan list)")
    v.add_argument("--model", help=f"a bundled model: one of {sorted(BUNDLED)}")
    v.add_argument("--geometry", help="num_layers=30,num_heads=12,frame_tokens=1560,chunk_frames=3[,window_frames=21]")
    v.add_argument("--json", action="store_true", help=JSON_HELP)
    v.set_defaults(func=cmd_plan_validate)

    c = plan.add_parser("convert", help="reference JSON <-> fkv-compile plan (direction from the input)")
    c.add_argument("src", help="a plan in either format")
    c.add_argument("dst", help="where to write it in the other format")
    c.add_argument("--frame-tokens", type=positive_int,
                   help="tokens per latent frame (a reference file does not say; 1560 at Wan2.1 480p)")
    c.add_argument("--chunk-frames", type=positive_int, help="latent frames per chunk (a reference file does not "
                   "say; 3 for Wan2.1-1.3B models)")
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c.set_defaults(func=cmd_plan_convert)

    k = sub.add_parser("check", help="equivalence of off/oracle/select/compact on a model's rollout (for CI)")
    k.add_argument("model", help=f"{' or '.join(CHECKABLE)}, or module:callable returning (model_factory, rollout)")
    k.add_argument("--plan", required=True, help="a plan file or a bundled plan's name (fkv plan list)")
    k.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=CHECKED_MODES,
                   help=f"the modes checked (default: {' '.join(DEFAULT_MODES)})")
    k.add_argument("--lowering", choices=LOWERINGS, default="inductor",
                   help="the plain compile the modes are compared with, and their own lowering (default inductor)")
    k.add_argument("--chunks", type=positive_int, help="chunks per video of the bundled miniatures' two-video rollout (default 5)")
    k.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the bundled miniatures' dtype (bf16/fp16 are compared in a float32 twin)")
    k.add_argument("--quiet", action="store_true", help="no progress lines")
    k.add_argument("--json", action="store_true", help=JSON_HELP)
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="time and memory, dense vs select vs compact, at named geometries")
    b.add_argument("--geometry", nargs="+", default=["self-forcing-5s", "longlive-window"],
                   choices=list(GEOMETRIES), help="; ".join(f"{name}: {g.note}" for name, g in GEOMETRIES.items()))
    b.add_argument("--side", type=positive_int, help="divide the latent height and width by this (default 2 on CPU, 1 on CUDA)")
    b.add_argument("--layers", type=positive_int, help="transformer layers (default 4, a miniature's own; 30 at real "
                   "size)")
    b.add_argument("--heads", type=positive_int, help="attention heads (default 12 as Wan2.1-1.3B, a miniature's own)")
    b.add_argument("--head-dim", type=positive_int, help="head dim (default 128 as Wan2.1, a miniature's own)")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and KV (default float32; bfloat16 on a GPU)")
    b.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds of timed videos (one per mode, taking turns) after a warm-up video per mode")
    b.add_argument("--modes", nargs="+", default=list(BENCH_MODES), choices=BENCH_MODES,
                   help="the modes timed side by side (default: all)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    b.add_argument("--plan", help="a plan (its first --layers layers); default: 37%% static heads, as the reference")
    b.add_argument("--lowering", choices=LOWERINGS, default="inductor",
                   help="dense is backend=<this>, select and compact lower with it (aot_eager: no Inductor compile)")
    b.add_argument("--out", default="bench_results", help="folder of the JSON, CSV and PNG (default bench_results)")
    b.add_argument("--no-png", action="store_true", help="no picture (then matplotlib is not needed)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help=JSON_HELP)
    b.set_defaults(func=cmd_bench)
    return parser


def _needs_matplotlib(args: argparse.Namespace) -> bool:
    """Whether the command will draw a picture: ``--png PATH``, or ``fkv bench`` without ``--no-png``."""
    return bool(getattr(args, "png", None)) or (args.command == "bench" and not args.no_png)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # models' expected graph-break warnings
    # Inductor warns once per complex op (the models' RoPE) that it falls back to eager: expected, not actionable
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")
    if _needs_matplotlib(args) and importlib.util.find_spec("matplotlib") is None:
        print("fkv: error: pictures need matplotlib, which is not installed: pip install 'fkv-compile[plot]'"
              + (", or pass --no-png" if args.command == "bench" else ", or leave out --png"), file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except (CliError, PlanError, OSError) as exc:  # OSError: a file or folder named on the command line
        print(f"fkv: error: {exc}", file=sys.stderr)
        return 1
