"""Pictures of plans: a layer x head heat map of profiling scores (alpha marked) and frame-mass curves.

Needs matplotlib (``pip install 'fkv-compile[plot]'``); imported lazily so the package does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..plan import DENSE, DYNAMIC, STATIC, HeadPlan

__all__ = ["plot_plan", "plot_rollouts", "pyplot"]

_ROLE_VALUE = {STATIC: 1.0, DYNAMIC: 0.0, DENSE: 0.5}


def pyplot():
    """matplotlib's pyplot on the file-only backend, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("pictures need matplotlib: pip install 'fkv-compile[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _chosen_heads(scores: Sequence[Sequence[float]], curves: Sequence[Sequence[Sequence[float]]],
                  count: int) -> list[tuple[int, int]]:
    """Up to ``count`` of the most static and ``count`` of the most dynamic heads by score, leaving out a head whose
    curve would hide under one already chosen (a line drawn on top of another only adds a legend entry)."""
    flat = sorted((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row))
    order = [x for pair in zip(reversed(flat), flat) for x in pair]  # most static, most dynamic, in turns
    picks: list[tuple[int, int]] = []
    for _, layer, head in order:
        curve = curves[layer][head]
        hidden = any(len(curve) == len(curves[a][b]) and max(abs(x - y) for x, y in zip(curve, curves[a][b])) < 0.02
                     for a, b in picks)
        if (layer, head) not in picks and not hidden:
            picks.append((layer, head))
        if len(picks) == 2 * count:
            break
    return picks


def plot_plan(plan: HeadPlan, path: str | os.PathLike[str], *, curves: int = 3) -> None:
    """Write a PNG: profiling scores per (layer, head) with the static heads outlined, or the roles when the plan
    carries no scores; plus the frame-mass curves of the most static and dynamic heads."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    prov = plan.provenance
    scores = prov.get("scores")
    mass = prov.get("mass_by_age")
    panels = 2 if scores and mass else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.25 * plan.num_layers + 3), squeeze=False)
    ax = axes[0][0]
    if scores:
        alpha = prov.get("settings", {}).get("alpha", 0.8)
        image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
        fig.colorbar(image, ax=ax, label=f"score (static when >= alpha = {alpha})")
        ax.set_title("head scores: mass on the chunk + transition frame")
    else:
        values = [[_ROLE_VALUE[r] for r in row] for row in plan.roles]
        ax.imshow(values, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=1.0, origin="upper")
        ax.set_title("roles: red static, blue dynamic, grey dense")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, plan.num_heads, max(1, plan.num_heads // 12)))
    ax.set_yticks(range(0, plan.num_layers, max(1, plan.num_layers // 15)))
    # static heads outlined cell by cell (a contour line through a coarse grid cuts cells diagonally) and marked,
    # the mark sized to the cell
    mark = max(6.0, min(16.0, 300.0 / max(plan.num_heads, plan.num_layers)))
    for layer, row in enumerate(plan.roles):
        for head, role in enumerate(row):
            if role == STATIC:
                ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2))
                ax.text(head, layer, "s", ha="center", va="center", color="white", fontsize=mark, weight="bold")
    if panels == 2:
        ax = axes[0][1]
        for layer, head in _chosen_heads(scores, mass, curves):
            curve = mass[layer][head]
            static = plan.roles[layer][head] == STATIC
            ax.plot(range(-len(curve) + 1, 1), curve, marker="o", markersize=3, linestyle="-" if static else "--",
                    label=f"L{layer} H{head} ({plan.roles[layer][head]}, {scores[layer][head]:.2f})")
        ax.set_xlabel("key frame relative to the newest (0 = last frame of the chunk)")
        ax.set_ylabel("attention mass")
        ax.set_title("frame-level attention mass (solid static, dashed dynamic)")
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rollouts(rollouts: dict[str, dict[str, Any]], geometry: str, path: str | os.PathLike[str]) -> None:
    """Write a PNG of ``fkv bench``'s rollouts: time, KV bytes and process RSS per chunk, one line per mode."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("chunk_s", 1e3, "time per chunk", "ms"), ("kv_bytes_per_chunk", 2**-20, "KV bytes", "MiB"),
              ("rss_bytes_per_chunk", 2**-20, "process RSS", "MiB"))
    for ax, (key, unit, title, ylabel) in zip(axes, panels):
        for mode, r in rollouts.items():
            ax.plot(range(len(r[key])), [unit * x for x in r[key]], marker="o", label=mode)
        ax.set(title=f"{geometry}: {title}" if key == "chunk_s" else title, xlabel="chunk", ylabel=ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
