"""Head plans: which role every attention head of every layer plays, and the geometry they assume.

A plan is data: it is saved as versioned JSON (``{"type": "fkv_compile.HeadPlan", "version": 2,
"data": {...}}``), validated on construction, and imported from the reference Forcing-KV head-plan
JSON (arXiv 2605.09681, ``head_plans/*.json``), whose layers list ``static_head``/``dynamic_head``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Role", "ROLES", "COMPRESSED_ROLES", "DENSE", "STATIC", "DYNAMIC", "PlanError", "RoleParams", "HeadPlan"]

Role = Literal["dense", "static", "dynamic"]
DENSE: Role = "dense"  # keeps the whole window
STATIC: Role = "static"  # sink + recent frames + the current chunk
DYNAMIC: Role = "dynamic"  # the same, plus the candidate segments least similar to the next frame
ROLES: tuple[Role, ...] = (DENSE, STATIC, DYNAMIC)
COMPRESSED_ROLES: tuple[Role, ...] = (STATIC, DYNAMIC)
SELECTIONS: tuple[str, ...] = ("layer", "head")
# how dynamic heads choose candidate segments: Forcing-KV, or a data-independent baseline at the same budget
SEGMENT_CHOICES: tuple[str, ...] = ("similarity", "random", "even", "recent")

PLAN_TYPE = "fkv_compile.HeadPlan"
REFERENCE_FORMAT = "forcingkv_offline_head_custom2"
REFERENCE_EMBEDDED = "fkv_compile"  # where a reference file written by us keeps the role parameters
PLAN_VERSION = 2  # 2: segment_choice

# Key names seen (or reasonably expected) in reference-format files, per meaning.
_REF_LAYER_KEYS = ("layer_idx", "layer", "layer_id", "layer_index", "idx")
_REF_STATIC_KEYS = ("static_head", "static_heads", "static")
_REF_DYNAMIC_KEYS = ("dynamic_head", "dynamic_heads", "dynamic")


class PlanError(ValueError):
    """A plan is malformed or does not fit the model it is applied to."""


def _check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        bound = ">= 0" if allow_zero else ">= 1"
        raise PlanError(f"{name} expected an int {bound}, got {value!r}")


@dataclass(frozen=True)
class RoleParams:
    """What one compressed role keeps, in frames and segments (see :mod:`fkv_compile.semantics`).

    ``candidate_frames``, ``segments_per_frame`` and ``retention`` only matter for ``dynamic``.
    """

    sink_frames: int = 1
    recent_frames: int = 1
    candidate_frames: int = 3
    segments_per_frame: int = 6
    retention: float = 0.33

    def __post_init__(self) -> None:
        _check_positive_int("sink_frames", self.sink_frames, allow_zero=True)
        _check_positive_int("recent_frames", self.recent_frames, allow_zero=True)
        _check_positive_int("candidate_frames", self.candidate_frames, allow_zero=True)
        _check_positive_int("segments_per_frame", self.segments_per_frame)
        if isinstance(self.retention, bool) or not isinstance(self.retention, (int, float)):
            raise PlanError(f"retention expected a float in [0, 1], got {self.retention!r}")
        if not (0.0 <= float(self.retention) <= 1.0) or math.isnan(self.retention):
            raise PlanError(f"retention expected a float in [0, 1], got {self.retention!r}")

    @property
    def selected_segments(self) -> int:
        """k before clamping to the candidates that exist: round-half-up(N_c * P * r)."""
        return math.floor(self.candidate_frames * self.segments_per_frame * self.retention + 0.5)


_ROLE_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(RoleParams))
_PLAN_WIDE = ("selection", "segment_choice")


def _role_prefixed(key: str) -> bool:
    """``static_recent_frames``: a role parameter for one role only."""
    role, _, name = key.partition("_")
    return role in COMPRESSED_ROLES and name in _ROLE_PARAM_NAMES


def _split_role_params(params: Mapping[str, Any]) -> tuple[RoleParams, RoleParams, dict[str, Any]]:
    """``sink_frames=1`` sets both roles, ``static_sink_frames=1`` only one; ``selection`` and
    ``segment_choice`` are global (returned as plan fields)."""
    shared: dict[str, Any] = {}
    per_role: dict[str, dict[str, Any]] = {role: {} for role in COMPRESSED_ROLES}
    plan_fields: dict[str, Any] = {}
    for key, value in params.items():
        if key in _PLAN_WIDE:
            plan_fields[key] = value
        elif key in _ROLE_PARAM_NAMES:
            shared[key] = value
        elif _role_prefixed(key):
            role, name = key.split("_", 1)
            per_role[role][name] = value
        else:
            allowed = ", ".join(_ROLE_PARAM_NAMES + _PLAN_WIDE)
            raise PlanError(
                f"unknown plan parameter {key!r}; expected one of {allowed}, optionally prefixed with "
                "'static_' or 'dynamic_'"
            )
    static = RoleParams(**{**shared, **per_role[STATIC]})
    dynamic = RoleParams(**{**shared, **per_role[DYNAMIC]})
    return static, dynamic, plan_fields


@dataclass(frozen=True)
class HeadPlan:
    """Per layer and head a role (``dense``, ``static`` or ``dynamic``) plus the geometry.

    Parameters
    ----------
    roles:
        ``roles[layer][head]``, every row of the same length.
    frame_tokens:
        Tokens per latent frame (1560 for Wan2.1 at 480p).
    chunk_frames:
        Latent frames generated per AR step (3 for Wan2.1-1.3B models).
    static, dynamic:
        What each compressed role keeps.
    selection:
        ``"layer"``: one segment selection per layer and batch item over the layer's dynamic heads'
        keys concatenated; ``"head"``: one selection per head.
    segment_choice:
        How dynamic heads choose their candidate segments: ``"similarity"`` (Forcing-KV: least similar
        to the next frame), or a baseline at the same budget: ``"random"`` (a seeded random set per
        window size), ``"even"`` (evenly spaced), ``"recent"`` (the latest ones: with the sink and
        recent frames this is a sink + sliding window, StreamingLLM / LongLive style).
    provenance:
        Free-form, JSON-serializable notes on where the plan came from (profiling settings, source).
    """

    roles: tuple[tuple[str, ...], ...]
    frame_tokens: int
    chunk_frames: int
    static: RoleParams = field(default_factory=RoleParams)
    dynamic: RoleParams = field(default_factory=RoleParams)
    selection: str = "layer"
    segment_choice: str = "similarity"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roles", tuple(tuple(layer) for layer in self.roles))
        object.__setattr__(self, "provenance", dict(self.provenance))
        _check_positive_int("frame_tokens", self.frame_tokens)
        _check_positive_int("chunk_frames", self.chunk_frames)
        if not self.roles:
            raise PlanError("roles expected at least one layer, got none")
        num_heads = len(self.roles[0])
        for layer, row in enumerate(self.roles):
            if len(row) != num_heads or num_heads == 0:
                raise PlanError(
                    f"roles expected the same non-zero number of heads in every layer, got "
                    f"{num_heads} in layer 0 and {len(row)} in layer {layer}"
                )
            for head, role in enumerate(row):
                if role not in ROLES:
                    raise PlanError(f"roles[{layer}][{head}] expected one of {ROLES}, got {role!r}")
        if self.selection not in SELECTIONS:
            raise PlanError(f"selection expected one of {SELECTIONS}, got {self.selection!r}")
        if self.segment_choice not in SEGMENT_CHOICES:
            raise PlanError(f"segment_choice expected one of {SEGMENT_CHOICES}, got {self.segment_choice!r}")
        for name, params in zip(COMPRESSED_ROLES, (self.static, self.dynamic)):
            if not isinstance(params, RoleParams):
                raise PlanError(f"{name} expected RoleParams, got {type(params).__name__}")
        if self.count(DYNAMIC) and self.dynamic.segments_per_frame > self.frame_tokens:
            raise PlanError(
                f"dynamic.segments_per_frame expected <= frame_tokens, got segments_per_frame="
                f"{self.dynamic.segments_per_frame}, frame_tokens={self.frame_tokens}; every segment "
                "must hold at least one token"
            )
        try:
            json.dumps(self.provenance)
        except TypeError as exc:
            raise PlanError(f"provenance expected JSON-serializable values: {exc}") from None

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.roles)

    @property
    def num_heads(self) -> int:
        return len(self.roles[0])

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.frame_tokens

    def params(self, role: str) -> RoleParams:
        """The parameters of ``role`` (``dense`` has none: it keeps everything)."""
        if role == STATIC:
            return self.static
        if role == DYNAMIC:
            return self.dynamic
        raise PlanError(f"role expected one of {COMPRESSED_ROLES}, got {role!r}")

    def heads(self, layer: int, role: str) -> tuple[int, ...]:
        """Indices of the heads of ``layer`` that play ``role``."""
        return tuple(h for h, r in enumerate(self.roles[layer]) if r == role)

    def count(self, role: str) -> int:
        return sum(row.count(role) for row in self.roles)

    def shard_heads(self, world_size: int) -> tuple[range, ...]:
        """Every rank's heads under head parallelism (Ulysses): contiguous ``num_heads / world_size`` slices, by
        rank."""
        if isinstance(world_size, bool) or not isinstance(world_size, int):
            raise PlanError(f"world_size expected an int, got {world_size!r}")
        if world_size < 1:
            raise PlanError(f"world_size expected >= 1, got {world_size}")
        if self.num_heads % world_size:
            raise PlanError(f"the plan's {self.num_heads} heads do not split evenly over {world_size} ranks")
        n = self.num_heads // world_size
        return tuple(range(r * n, (r + 1) * n) for r in range(world_size))

    def shard(self, rank: int, world_size: int) -> HeadPlan:
        """The plan of one rank under head parallelism (Ulysses): its slice of :meth:`shard_heads` in every layer,
        the rest unchanged. Layer-level selection still spans every rank's dynamic heads."""
        for name, value in (("world_size", world_size), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise PlanError(f"{name} expected an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise PlanError(f"rank expected in [0, world_size), world_size >= 1; got rank {rank}, world_size {world_size}")
        return self.head_slice(self.shard_heads(world_size)[rank])

    def head_slice(self, heads: range) -> HeadPlan:
        """The plan of the heads ``heads`` (a contiguous range of this plan's) of every layer, the rest unchanged."""
        if not isinstance(heads, range) or heads.step != 1 or not 0 <= heads.start < heads.stop <= self.num_heads:
            raise PlanError(f"heads expected a non-empty contiguous range within the plan's {self.num_heads} heads, "
                            f"got {heads!r}")
        return dataclasses.replace(self, roles=tuple(row[heads.start : heads.stop] for row in self.roles))

    def frames_kept(self, role: str) -> float:
        """Frames' worth of tokens a head of ``role`` attends to once the window is long enough."""
        if role == DENSE:
            raise PlanError("a dense head keeps the whole window; it has no fixed frame count")
        p = self.params(role)
        kept = p.sink_frames + p.recent_frames + self.chunk_frames
        if role == DYNAMIC:
            kept += p.selected_segments / p.segments_per_frame
        return kept

    # -- validation against a model ------------------------------------------------------------
    def validate_geometry(
        self,
        *,
        num_layers: int | None = None,
        num_heads: int | None = None,
        window_frames: int | None = None,
    ) -> None:
        """Raise :class:`PlanError` naming every mismatch between this plan and a model.

        ``window_frames`` is the longest KV window (in frames, current chunk included) the model
        attends to; a compressed role whose sink + recent + chunk already exceed it can never be
        met and is reported as an error.
        """
        problems = []
        if num_layers is not None and num_layers != self.num_layers:
            problems.append(f"num_layers: plan has {self.num_layers}, model has {num_layers}")
        if num_heads is not None and num_heads != self.num_heads:
            problems.append(f"num_heads: plan has {self.num_heads}, model has {num_heads}")
        if window_frames is not None:
            if window_frames < self.chunk_frames:
                problems.append(
                    f"window_frames: model window of {window_frames} frames is shorter than the "
                    f"plan's chunk of {self.chunk_frames} frames"
                )
            for role in COMPRESSED_ROLES:
                if self.count(role) and self.frames_kept(role) > window_frames:
                    problems.append(
                        f"{role} budget: keeps {self.frames_kept(role):g} frames, more than the "
                        f"model's window of {window_frames} frames"
                    )
        if problems:
            raise PlanError("plan does not match the model: " + "; ".join(problems))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_roles(
        cls,
        roles: Sequence[Sequence[str]],
        *,
        frame_tokens: int,
        chunk_frames: int,
        provenance: Mapping[str, Any] | None = None,
        **role_params: Any,
    ) -> HeadPlan:
        """Build a plan from ``roles[layer][head]``.

        ``role_params`` are :class:`RoleParams` fields applied to both compressed roles
        (``recent_frames=2``), or to one of them with a ``static_``/``dynamic_`` prefix
        (``dynamic_recent_frames=2``), plus ``selection`` and ``segment_choice``.
        """
        static, dynamic, plan_fields = _split_role_params(role_params)
        return cls(
            roles=tuple(tuple(row) for row in roles),
            frame_tokens=frame_tokens,
            chunk_frames=chunk_frames,
            static=static,
            dynamic=dynamic,
            provenance=provenance or {},
            **plan_fields,
        )

    @classmethod
    def uniform(
        cls, role: str, *, num_layers: int, num_heads: int, frame_tokens: int, chunk_frames: int, **role_params: Any
    ) -> HeadPlan:
        """Every head of every layer in ``role``."""
        return cls.from_roles(
            [[role] * num_heads for _ in range(num_layers)],
            frame_tokens=frame_tokens,
            chunk_frames=chunk_frames,
            **role_params,
        )

    @classmethod
    def from_reference_json(
        cls, path: str | os.PathLike[str], *, frame_tokens: int | None = None, chunk_frames: int | None = None,
        **role_params: Any,
    ) -> HeadPlan:
        """Import a head plan in the Forcing-KV reference format (static/dynamic head lists per layer).

        Accepts a top-level object with ``layers`` or a bare list of layers, the key aliases listed
        in ``_REF_*_KEYS``, and layers in any order; every head must be in exactly one list. The
        geometry and role parameters a file written by :meth:`to_reference_dict` embeds are the
        defaults; the arguments override them.
        """
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        layers = doc.get("layers") if isinstance(doc, dict) else doc
        if not isinstance(layers, list) or not layers:
            raise PlanError(f"{path}: expected a non-empty list of layers (top level or under 'layers')")
        by_index: dict[int, list[str]] = {}
        num_heads = doc.get("num_heads") if isinstance(doc, dict) else None
        if num_heads is None:
            num_heads = 1 + max(
                (h for entry in layers for key in _REF_STATIC_KEYS + _REF_DYNAMIC_KEYS for h in entry.get(key, [])),
                default=-1,
            )
        for position, entry in enumerate(layers):
            if not isinstance(entry, dict):
                raise PlanError(f"{path}: layer entry {position} expected an object, got {type(entry).__name__}")
            index = _first_key(entry, _REF_LAYER_KEYS, default=position, where=f"{path}: layer entry {position}")
            static = _first_key(entry, _REF_STATIC_KEYS, default=None, where=f"{path}: layer {index}")
            dynamic = _first_key(entry, _REF_DYNAMIC_KEYS, default=None, where=f"{path}: layer {index}")
            if static is None and dynamic is None:
                raise PlanError(f"{path}: layer {index} has neither a static nor a dynamic head list")
            row = _reference_row(static or [], dynamic or [], num_heads, where=f"{path}: layer {index}")
            if index in by_index:
                raise PlanError(f"{path}: layer {index} is listed twice")
            by_index[index] = row
        expected = list(range(len(by_index)))
        if sorted(by_index) != expected:
            raise PlanError(f"{path}: layer indices expected 0..{len(by_index) - 1}, got {sorted(by_index)}")
        num_layers = doc.get("num_layers") if isinstance(doc, dict) else None
        if num_layers is not None and num_layers != len(by_index):
            raise PlanError(f"{path}: num_layers says {num_layers}, the file lists {len(by_index)} layers")
        provenance = {"source": os.path.basename(os.fspath(path))}
        embedded = doc.get(REFERENCE_EMBEDDED, {}) if isinstance(doc, dict) else {}
        if isinstance(doc, dict):
            provenance.update({k: doc[k] for k in ("format", "profile", "description") if k in doc})
        provenance = embedded.get("provenance") or provenance  # a round trip keeps the original provenance
        params = {**{f"{role}_{k}": v for role in COMPRESSED_ROLES for k, v in embedded.get(role, {}).items()},
                  **{k: embedded[k] for k in _PLAN_WIDE if k in embedded}, **role_params}
        return cls.from_roles(
            [by_index[i] for i in expected],
            frame_tokens=frame_tokens if frame_tokens is not None else embedded.get("frame_tokens"),
            chunk_frames=chunk_frames if chunk_frames is not None else embedded.get("chunk_frames"),
            provenance=provenance,
            **params,
        )

    # -- serialization -------------------------------------------------------------------------
    def to_reference_dict(self) -> dict[str, Any]:
        """The reference format (static/dynamic head lists per layer), with the rest of the plan embedded."""
        if self.count(DENSE):
            raise PlanError("the reference format has no 'dense' role; this plan has dense heads")
        data = self.to_dict()["data"]
        return {
            "format": REFERENCE_FORMAT,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "description": f"converted from an fkv-compile plan; role parameters kept under {REFERENCE_EMBEDDED!r}",
            REFERENCE_EMBEDDED: {k: v for k, v in data.items() if k != "roles"},
            "layers": [{"layer_idx": i, "static_head": list(self.heads(i, STATIC)),
                        "dynamic_head": list(self.heads(i, DYNAMIC))} for i in range(self.num_layers)],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": PLAN_TYPE,
            "version": PLAN_VERSION,
            "data": {
                "roles": [list(row) for row in self.roles],
                "frame_tokens": self.frame_tokens,
                "chunk_frames": self.chunk_frames,
                "static": dataclasses.asdict(self.static),
                "dynamic": dataclasses.asdict(self.dynamic),
                "selection": self.selection,
                "segment_choice": self.segment_choice,
                "provenance": dict(self.provenance),
            },
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> HeadPlan:
        if not isinstance(doc, Mapping) or doc.get("type") != PLAN_TYPE:
            found = doc.get("type") if isinstance(doc, Mapping) else type(doc).__name__
            raise PlanError(
                f"expected a document of type {PLAN_TYPE!r}, got {found!r}; reference-format files are "
                "read with HeadPlan.from_reference_json"
            )
        version = doc.get("version")
        if not isinstance(version, int) or version > PLAN_VERSION:
            raise PlanError(f"plan version expected an int <= {PLAN_VERSION}, got {version!r}; upgrade fkv-compile")
        if version < PLAN_VERSION:
            warnings.warn(f"loading plan version {version}, current is {PLAN_VERSION}", stacklevel=2)
        data = dict(doc.get("data", {}))
        try:
            static = RoleParams(**data.pop("static", {}))
            dynamic = RoleParams(**data.pop("dynamic", {}))
            return cls(static=static, dynamic=dynamic, **data)
        except TypeError as exc:
            raise PlanError(f"malformed plan data: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadPlan:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except IsADirectoryError:
            raise PlanError(f"{path}: a directory, not a plan file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{path}: not a JSON plan file ({exc})") from None
        return cls.from_dict(doc)


def _first_key(entry: Mapping[str, Any], keys: Sequence[str], *, default: Any, where: str) -> Any:
    present = [k for k in keys if k in entry]
    if len(present) > 1:
        raise PlanError(f"{where}: ambiguous keys {present}, expected only one of them")
    return entry[present[0]] if present else default


def _reference_row(static: Sequence[int], dynamic: Sequence[int], num_heads: int, *, where: str) -> list[str]:
    row: list[str | None] = [None] * num_heads
    for role, heads in zip(COMPRESSED_ROLES, (static, dynamic)):
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
                raise PlanError(f"{where}: {role} head {h!r} expected an int in [0, {num_heads})")
            if row[h] is not None:
                raise PlanError(f"{where}: head {h} is listed as both {row[h]} and {role}")
            row[h] = role
    missing = [h for h, r in enumerate(row) if r is None]
    if missing:
        raise PlanError(f"{where}: heads {missing} are in neither the static nor the dynamic list")
    return [r for r in row if r is not None]
