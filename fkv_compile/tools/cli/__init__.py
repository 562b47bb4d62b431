"""The ``fkv`` command: make, inspect, validate and convert head plans; check and benchmark models.

    fkv profile --model mini-windowed --out plan.json        profile a model, write a plan
    fkv plan show plan.json [--png plan.png]                  roles, kept tokens and bytes per layer
    fkv plan validate plan.json --model mini                  does the plan fit the model?
    fkv plan convert reference.json plan.json --frame-tokens 1560 --chunk-frames 3
    fkv check my_pkg.ci:forcing_kv_target --plan plan.json    equivalence of every mode, for CI
    fkv bench --geometry self-forcing-5s longlive-window      speed and memory, dense vs select vs compact

Every command takes ``--json`` for scripts; errors go to standard error with exit status 1. One
module per verb; this one builds the parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
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
    p.add_argument("--samples", type=positive_int, default=2)
    p.add_argument("--chunks", type=positive_int, help="chunks per sample (bundled models)")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--sink-frames", type=non_negative_int, default=3, help="key frames left out of the score's denominator")
    p.add_argument("--layer-static-budget", type=non_negative_int)
    p.add_argument("--static-budget", type=non_negative_int)
    p.add_argument("--force-layer", action="append", metavar="LAYER=ROLE")
    p.add_argument("--selection", choices=SELECTIONS, default="layer")
    p.add_argument("--lowering", choices=LOWERINGS, default="aot_eager")
    for name in ("layers", "heads", "frame-tokens", "chunk-frames"):
        p.add_argument(f"--{name}", type=positive_int, help="geometry of a module:callable model")
    p.add_argument("--png", help="also write a picture of the scores and mass curves")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)

    plan = sub.add_parser("plan", help="inspect, validate, convert plans").add_subparsers(dest="plan_command", required=True)
    ls = plan.add_parser("list", help="the plans shipped by name (the Forcing-KV release's), native geometry")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_plan_list)

    s = plan.add_parser("show", help="per layer: heads per role, kept tokens, KV bytes vs dense")
    s.add_argument("plan", help="a plan file or a bundled plan's name (fkv plan list)")
    s.add_argument("--window-frames", type=positive_int, default=21)
    s.add_argument("--video-frames", type=positive_int, help="frames per video (default: the window)")
    s.add_argument("--head-dim", type=positive_int, default=128)
    s.add_argument("--dtype-bytes", type=positive_int, default=2)
    s.add_argument("--ranks", type=positive_int, help="also the kept tokens per rank when heads are split over this many ranks")
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
    c.add_argument("--frame-tokens", type=positive_int)
    c.add_argument("--chunk-frames", type=positive_int)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_plan_convert)

    k = sub.add_parser("check", help="equivalence of off/oracle/select/compact on a model's rollout (for CI)")
    k.add_argument("model", help=f"{' or '.join(CHECKABLE)}, or module:callable returning (model_factory, rollout)")
    k.add_argument("--plan", required=True)
    k.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=CHECKED_MODES)
    k.add_argument("--lowering", choices=LOWERINGS, default="inductor")
    k.add_argument("--chunks", type=positive_int, help="chunks per video of the bundled miniatures' two-video rollout (default 5)")
    k.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the bundled miniatures' dtype (bf16/fp16 are compared in a float32 twin)")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="time and memory, dense vs select vs compact, at named geometries")
    b.add_argument("--geometry", nargs="+", default=["self-forcing-5s", "longlive-window"],
                   choices=list(GEOMETRIES))
    b.add_argument("--side", type=positive_int, help="divide the latent height and width by this (default 2 on CPU, 1 on CUDA)")
    b.add_argument("--layers", type=positive_int, default=4)
    b.add_argument("--heads", type=positive_int, default=12)
    b.add_argument("--head-dim", type=positive_int, default=128)
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    b.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds of timed videos (one per mode, taking turns) after a warm-up video per mode")
    b.add_argument("--modes", nargs="+", default=list(BENCH_MODES), choices=BENCH_MODES)
    b.add_argument("--device", choices=["cpu", "cuda"])
    b.add_argument("--plan", help="a plan (its first --layers layers); default: 37%% static heads, as the reference")
    b.add_argument("--lowering", choices=LOWERINGS, default="inductor",
                   help="dense is backend=<this>, select and compact lower with it (aot_eager: no Inductor compile)")
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
    except (CliError, PlanError, OSError) as exc:  # OSError: a file or folder named on the command line
        print(f"fkv: error: {exc}", file=sys.stderr)
        return 1
