"""Pictures of plans: a layer x head heat map of profiling scores (alpha marked) and frame-mass curves.

Needs matplotlib (``pip install 'fkv-compile[plot]'``); imported lazily so the package does not.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..plan import DENSE, DYNAMIC, STATIC, HeadPlan

__all__ = ["plot_plan"]

_ROLE_VALUE = {STATIC: 1.0, DYNAMIC: 0.0, DENSE: 0.5}


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("pictures need matplotlib: pip install 'fkv-compile[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _chosen_heads(scores: Sequence[Sequence[float]], count: int) -> list[tuple[int, int]]:
    """The ``count`` most static and ``count`` most dynamic heads by score."""
    flat = sorted((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row))
    picks = flat[:count] + flat[-count:]
    return [(layer, head) for _, layer, head in picks]


def plot_plan(plan: HeadPlan, path: str | os.PathLike[str], *, curves: int = 3) -> None:
    """Write a PNG: profiling scores per (layer, head) with the alpha contour, or the roles when the
    plan carries no scores; plus the frame-mass curves of the most static and dynamic heads."""
    plt = _pyplot()
    prov = plan.provenance
    scores = prov.get("scores")
    mass = prov.get("mass_by_age")
    panels = 2 if scores and mass else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 0.25 * plan.num_layers + 3), squeeze=False)
    ax = axes[0][0]
    if scores:
        alpha = prov.get("settings", {}).get("alpha", 0.8)
        image = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
        ax.contour(scores, levels=[alpha], colors="white", linewidths=1.5)
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
    for layer, row in enumerate(plan.roles):
        for head, role in enumerate(row):
            if role == STATIC:
                ax.text(head, layer, "s", ha="center", va="center", color="black", fontsize=7)
    if panels == 2:
        ax = axes[0][1]
        for layer, head in _chosen_heads(scores, curves):
            curve = mass[layer][head]
            ax.plot(range(-len(curve) + 1, 1), curve, marker="o", markersize=3,
                    label=f"L{layer} H{head} ({plan.roles[layer][head]}, {scores[layer][head]:.2f})")
        ax.set_xlabel("key frame relative to the newest (0 = last frame of the chunk)")
        ax.set_ylabel("attention mass")
        ax.set_title("frame-level attention mass")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
