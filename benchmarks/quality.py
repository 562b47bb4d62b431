"""The quality harness: attention-output error vs dense of every KV policy at equal budget, per content kind.

Several seeds, pooled (the per-seed spread is printed too: single seeds can disagree on moving content).

    python benchmarks/quality.py [--seeds 8] [--videos 4]
"""

from __future__ import annotations

import argparse
import statistics

from common import write_results

from fkv_compile.tools.policies import POLICIES
from fkv_compile.tools.quality import CONTENTS, QualityConfig, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--videos", type=int, default=4)
    args = parser.parse_args()
    runs = [evaluate(QualityConfig(seed=seed, videos=args.videos)) for seed in range(args.seeds)]
    pooled = {c: {p: statistics.mean(r.errors[c][p] for r in runs) for p in POLICIES} for c in CONTENTS}
    wins = {other: {c: sum(r.errors[c]["forcing-kv"] < r.errors[c][other] for r in runs) for c in CONTENTS}
            for other in ("random", "even")}
    print(f"relative attention-output error vs dense, mean of {args.seeds} seeds x {args.videos} videos "
          f"(kept/window tokens: " + ", ".join(f"{p} {runs[0].kept[p]:.3f}" for p in POLICIES) + ")")
    print(f"{'content':<8} " + " ".join(f"{p:>13}" for p in POLICIES) + "   seeds where forcing-kv < random, < even")
    for c in CONTENTS:
        print(f"{c:<8} " + " ".join(f"{pooled[c][p]:>13.4f}" for p in POLICIES) + f"   {wins['random'][c]}/{args.seeds}, {wins['even'][c]}/{args.seeds}")
    path = write_results("quality_cpu", {"args": vars(args), "pooled": pooled, "seeds_won": wins,
                                         "kept": runs[0].kept, "runs": [r.to_dict() for r in runs]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
