"""The reference head plans shipped with the package, by model name, with each model's native geometry.

The five JSON files under ``fkv_compile/plans/`` are the Forcing-KV release's (Apache-2.0, see its
``NOTICE.md``), unchanged. They list static and dynamic heads only; the geometry (tokens per frame,
frames per chunk) is the model's native one at its release resolution, which options override
(``torch.compile(..., options={"plan": "self-forcing", "frame_tokens": 390})``).

``options={"plan": "longlive"}`` resolves here; ``fkv plan list`` prints :data:`PLANS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from .plan import HeadPlan, PlanError

__all__ = ["BundledPlan", "PLANS", "bundled_plan", "is_bundled_name"]

# Wan2.1 at 480x832: a 60 x 104 latent, 2 x 2 patches -> 30 x 52 = 1560 tokens per frame; 3-frame chunks
_WAN_480P_FRAME_TOKENS = 1560


@dataclass(frozen=True)
class BundledPlan:
    """A shipped plan and the model it was profiled on."""

    name: str
    file: str  # under fkv_compile/plans/
    model: str
    num_layers: int
    num_heads: int
    frame_tokens: int
    chunk_frames: int
    window_frames: int  # the longest KV window the model attends to (frames, current chunk included)


PLANS: dict[str, BundledPlan] = {p.name: p for p in (
    BundledPlan("self-forcing", "forcingkv_heads_selfforcing.json", "Self Forcing (Wan2.1-T2V-1.3B)",
                30, 12, _WAN_480P_FRAME_TOKENS, 3, 21),
    BundledPlan("longlive", "forcingkv_heads_longlive.json", "LongLive v1 (Wan2.1-T2V-1.3B, 12-frame window)",
                30, 12, _WAN_480P_FRAME_TOKENS, 3, 12),
    BundledPlan("causal-forcing", "forcingkv_heads_causalforcing.json", "Causal Forcing (Wan2.1-T2V-1.3B)",
                30, 12, _WAN_480P_FRAME_TOKENS, 3, 21),
    BundledPlan("raven", "forcingkv_heads_raven.json", "Raven (Wan2.1-T2V-1.3B)",
                30, 12, _WAN_480P_FRAME_TOKENS, 3, 21),
    BundledPlan("krea-realtime-14b", "forcingkv_heads_realtime_14b.json", "Krea Realtime 14B (Wan2.1-T2V-14B)",
                40, 40, _WAN_480P_FRAME_TOKENS, 3, 21),
)}


def is_bundled_name(value: object) -> bool:
    """Whether ``value`` names a plan (a string without a path separator or a file suffix)."""
    return isinstance(value, str) and "/" not in value and "\\" not in value and not value.endswith(".json")


def bundled_plan(name: str, *, frame_tokens: int | None = None, chunk_frames: int | None = None) -> HeadPlan:
    """The shipped plan ``name`` at its model's native geometry, or at the geometry given."""
    entry = PLANS.get(name)
    if entry is None:
        raise PlanError(f"unknown plan name {name!r}; the bundled plans are {sorted(PLANS)} "
                        "(or pass a HeadPlan or the path of a plan file)")
    path = resources.files(__package__).joinpath("plans", entry.file)
    with resources.as_file(path) as file:
        return HeadPlan.from_reference_json(
            file,
            frame_tokens=entry.frame_tokens if frame_tokens is None else frame_tokens,
            chunk_frames=entry.chunk_frames if chunk_frames is None else chunk_frames,
        )
