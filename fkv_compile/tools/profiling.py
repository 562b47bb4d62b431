"""``collect``: the :class:`~fkv_compile.classify.Profile` a model compiled with ``mode="profile"`` recorded.

The classification itself (scores, roles, plans, stability) lives in :mod:`fkv_compile.classify`,
where the self-calibrating backend uses it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..classify import MassRecord, Profile, ProfileSettings, StabilityReport
from ..report import session_of

__all__ = ["MassRecord", "ProfileSettings", "Profile", "StabilityReport", "collect"]


def collect(compiled: Any, options: Mapping[str, Any] | None = None) -> Profile:
    """The :class:`Profile` recorded by a model compiled with ``options={"mode": "profile", ...}``."""
    session = session_of(compiled, "collect", options)
    if session.config.mode != "profile":
        raise ValueError("collect expected a model compiled with backend='forcing_kv' and mode='profile'")
    if not session.profile_records:
        raise ValueError("the profiled model recorded no attention call that fits the plan's geometry; run it first")
    plan = session.config.plan
    return Profile(session.profile_records, frame_tokens=plan.frame_tokens, chunk_frames=plan.chunk_frames,
                   num_layers=plan.num_layers, num_heads=plan.num_heads)
