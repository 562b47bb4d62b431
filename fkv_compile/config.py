"""The backend's configuration: one frozen, validated type built once from ``torch.compile``'s ``options``.

``torch.compile(model, backend="forcing_kv", options={...})`` hands the mapping to the backend;
:meth:`Config.from_options` turns it into a :class:`Config` (every value checked, with an error that
names the option, what it expected and what to do) and everything downstream takes the ``Config``.
The valid values of each option are defined here once; the CLI offers the same choices.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bundled import bundled_plan, is_bundled_name
from .classify import ProfileSettings
from .plan import DYNAMIC, HeadPlan, PlanError

__all__ = ["Config", "Calibration", "OptionsError", "Choice", "Mode", "MODES", "LOWERINGS", "INDUCTOR_MODES", "KERNELS",
           "RELEASES",
           "KERNELS_ENV", "CONFIG_TYPE", "default_kernels"]

LOWERINGS: tuple[str, ...] = ("inductor", "aot_eager", "eager")
"""What compiles the rewritten graph."""
INDUCTOR_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's ``mode`` for the Inductor lowering: torch.compile takes ``mode`` or ``options``, not both."""
KERNELS: tuple[str, ...] = ("auto", "torch", "triton")
"""Which implementation the compressed ops run: ``auto`` is Triton on CUDA and torch on CPU."""
RELEASES: tuple[str, ...] = ("watch", "trust")
"""When ``compact`` releases the pipeline's K/V buffers: ``watch`` (default) once a whole video showed that nothing
but the compiled model writes them; ``trust`` at their first call (the caller vouches for that)."""
KERNELS_ENV = "FKV_KERNELS"
"""Environment variable giving the default of the option ``kernels``."""
CONFIG_TYPE = "fkv_compile.Config"
AUTO_PLAN = "auto"
"""The ``plan`` option's value that means no plan given (the default)."""
GEOMETRY_OPTIONS: tuple[str, ...] = ("frame_tokens", "chunk_frames")
"""Options that set the plan's geometry (a bundled plan's default is its model's native one)."""


class OptionsError(ValueError):
    """The backend options are malformed."""


class Choice(str, enum.Enum):
    """A named value that compares, prints and formats as its string (report rows, reasons)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:  # as its string's, since it equals it (Enum hashes the member's name)
        return str.__hash__(self)


class Mode(Choice):
    """What the pass does with the attention it finds (docs/usage.md, "Modes"); the pass's choice per mode is one
    table (:data:`fkv_compile.passes.pipeline.REWRITES`)."""

    OFF = "off"  # nothing rewritten, sites found and reported
    ORACLE = "oracle"  # dense attention masked by the keep rule
    SELECT = "select"  # attention over the kept tokens of the model's own cache
    COMPACT = "compact"  # the cache's writes, rolls and reads served by a compact store
    PROFILE = "profile"  # dense attention, its frame-level mass recorded

    @property
    def rewrites(self) -> bool:
        """Whether the pass replaces the attention it finds (all but ``off``)."""
        return self is not Mode.OFF


MODES: tuple[str, ...] = tuple(m.value for m in Mode)


def default_kernels() -> str:
    """The ``kernels`` option's default: ``$FKV_KERNELS`` or ``auto``."""
    value = os.environ.get(KERNELS_ENV, "auto")
    if value not in KERNELS:
        raise OptionsError(f"{KERNELS_ENV} expected one of {KERNELS}, got {value!r}; unset it or pick one of those")
    return value


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"option {option} expected one of {choices}, got {value!r}")


def _check_geometry(values: Mapping[str, Any]) -> None:
    """The geometry options in ``values`` are positive ints where given."""
    for name in GEOMETRY_OPTIONS:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionsError(f"option {name} expected a positive int, got {value!r}")


def _check_head_parallelism(process_group: Any, head_range: Any) -> None:
    if process_group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise OptionsError(f"option process_group expected a torch.distributed ProcessGroup, got "
                               f"{type(process_group).__name__}")
    if head_range is not None:
        ok = (isinstance(head_range, tuple) and len(head_range) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in head_range)
              and 0 <= head_range[0] < head_range[1])
        if not ok:
            raise OptionsError(f"option head_range expected (start, stop) ints with 0 <= start < stop, "
                               f"got {head_range!r}")


@dataclass(frozen=True)
class Calibration:
    """How a model compiled without a plan makes its own (option ``calibration``, a mapping of these fields).

    chunks:
        ``None`` (default): calibrate on the first video, switching when the next one starts; a number:
        switch once that many chunks have run (within a video: the compact store adopts the dense window).
    settings:
        The classification (``alpha``, ``sink_frames``, ``layer_static_budget``, ``static_budget`` of
        :class:`~fkv_compile.classify.ProfileSettings`), given flat in the mapping.
    roles:
        Role parameters of the plan made (``HeadPlan.from_roles`` keywords: ``retention``,
        ``dynamic_recent_frames``, ``selection``, ...); the defaults unless given.
    """

    chunks: int | None = None
    settings: ProfileSettings = ProfileSettings()
    roles: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.chunks is not None and (isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1):
            raise OptionsError(f"option calibration: chunks expected a positive int or None, got {self.chunks!r}")
        try:  # the role parameters' own checks, on a plan of any geometry
            HeadPlan.from_roles([[DYNAMIC]], frame_tokens=1 << 20, chunk_frames=1, **dict(self.roles))
        except (PlanError, TypeError) as exc:
            raise OptionsError(f"option calibration: roles: {exc}") from None

    @classmethod
    def from_mapping(cls, value: Any) -> Calibration:
        if isinstance(value, Calibration):
            return value
        if not isinstance(value, Mapping):
            raise OptionsError(f"option calibration expected a mapping, got {type(value).__name__}")
        settings_fields = {f.name for f in dataclasses.fields(ProfileSettings)} - {"forced"}
        unknown = sorted(set(value) - settings_fields - {"chunks", "roles"})
        if unknown:
            raise OptionsError(f"option calibration: unknown keys {unknown}; expected some of "
                               f"{sorted(settings_fields | {'chunks', 'roles'})}")
        roles = value.get("roles", {})
        if not isinstance(roles, Mapping):
            raise OptionsError(f"option calibration: roles expected a mapping of role parameters, got {roles!r}")
        try:
            settings = ProfileSettings(**{k: v for k, v in value.items() if k in settings_fields})
        except PlanError as exc:
            raise OptionsError(f"option calibration: {exc}") from None
        return cls(chunks=value.get("chunks"), settings=settings, roles=tuple(sorted(roles.items())))

    def to_dict(self) -> dict[str, Any]:
        settings = {k: v for k, v in self.settings.as_dict().items() if k != "forced"}
        return {"chunks": self.chunks, **settings, "roles": dict(self.roles)}


def _resolve_plan(plan: Any, geometry: dict[str, int]) -> Any:
    """A HeadPlan from a plan, a bundled plan's name or a path; ``geometry`` (frame_tokens, chunk_frames) set on it."""
    if isinstance(plan, str) and is_bundled_name(plan) and not os.path.exists(plan):
        try:
            return bundled_plan(plan, **geometry)
        except PlanError as exc:
            raise OptionsError(f"option plan: {exc}") from None
    if isinstance(plan, (str, os.PathLike)):
        try:
            plan = HeadPlan.load(plan)
        except (OSError, PlanError) as exc:
            raise OptionsError(f"option plan: cannot load {os.fspath(plan)!r}: {exc}") from None
    if isinstance(plan, HeadPlan) and geometry:
        try:
            plan = dataclasses.replace(plan, **geometry)
        except PlanError as exc:
            raise OptionsError(f"option plan: {exc}") from None
    return plan


@dataclass(frozen=True)
class Config:
    """Everything the pass and the ops of one ``torch.compile`` call are told.

    plan:
        The :class:`~fkv_compile.HeadPlan`: a role per layer and head, and the geometry; ``None``
        (no option, or ``"auto"``): the model calibrates itself (see ``calibration``); a model with no
        attention over a KV cache compiles as with its lowering alone.
    plan_name:
        The bundled plan ``plan`` was given by (set by :meth:`from_options`): its geometry is the
        model's native one, and the geometry read from the traced model's patch embedding wins.
    frame_tokens, chunk_frames:
        The geometry, when given as options (set on the plan; used by calibration).
    calibration:
        :class:`Calibration`: how a model compiled without a plan makes one.
    mode:
        ``off``, ``oracle``, ``select`` (default), ``compact`` or ``profile`` (see :data:`MODES`).
    lowering:
        ``inductor`` (default), ``aot_eager`` (fast tests) or ``eager`` (debugging).
    inductor_mode:
        What ``torch.compile(mode=...)`` would tell Inductor (:data:`INDUCTOR_MODES`, e.g. ``max-autotune``):
        torch.compile refuses ``mode`` together with ``options``, so with options it is given here.
    strict:
        Raise on an attention over a KV cache the pass cannot rewrite, and when a compiled frame
        reaches dynamo's recompile limit, instead of leaving attention dense.
    kv_recache:
        ``compact`` on LongLive's ``cat(sink, window)`` attention: keep the model's attention sink whole
        for every head (default ``True``), so that a KV-recache after a prompt switch is served
        exactly; ``False`` saves those bytes and a KV-recache raises a ``StoreError``.
    release:
        ``compact``: when the pipeline's K/V buffers are released. ``watch`` (default): the ops keep and write them
        until a whole video and the next one's start showed, through their version counters, that nothing else
        writes them (a pipeline that zeroes or rebuilds them keeps them and runs ``select``); ``trust``: at their
        first call, for a caller who knows that only the compiled model touches its caches (memory saved from the
        first video; a write from outside then crashes the process, as with FSDP's released parameters).
    kernels:
        ``auto`` (Triton on CUDA, torch on CPU), ``torch``, or ``triton`` (on CPU through the
        interpreter); the default is ``$FKV_KERNELS`` or ``auto``.
    process_group:
        Head parallelism (Ulysses): the ``torch.distributed`` process group whose ranks split the heads
        (default: the default group, when initialized). When the traced attention has ``num_heads / N`` of
        the plan's heads, this rank uses its contiguous slice of them; a layer-level selection all-reduces
        over this group. Not serializable (``to_dict`` refuses it).
    head_range:
        ``(start, stop)``: this rank's heads of the plan when they are not its contiguous slice by rank
        (other layouts); the ranks of the group must cover the plan's heads exactly once.
    """

    plan: HeadPlan | None = None
    plan_name: str | None = None
    frame_tokens: int | None = None
    chunk_frames: int | None = None
    calibration: Calibration = Calibration()
    mode: Mode = Mode.SELECT
    lowering: str = "inductor"
    inductor_mode: str | None = None
    strict: bool = False
    kv_recache: bool = True
    release: str = "watch"
    kernels: str = dataclasses.field(default_factory=default_kernels)
    process_group: Any = None
    head_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.plan is not None and not isinstance(self.plan, HeadPlan):
            raise OptionsError(f"option plan expected a HeadPlan or a path, got "
                               f"{type(self.plan).__name__}; pass a HeadPlan or the path of one saved with HeadPlan.save")
        _choice("mode", self.mode, MODES)
        object.__setattr__(self, "mode", Mode(self.mode))
        _choice("lowering", self.lowering, LOWERINGS)
        if self.inductor_mode is not None:
            _choice("inductor_mode", self.inductor_mode, INDUCTOR_MODES)
            if self.lowering != "inductor":
                raise OptionsError(f"option inductor_mode={self.inductor_mode!r} needs lowering='inductor', got "
                                   f"lowering={self.lowering!r}")
        for name in ("strict", "kv_recache"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"option {name} expected a bool, got {getattr(self, name)!r}")
        _choice("kernels", self.kernels, KERNELS)
        _choice("release", self.release, RELEASES)
        if not isinstance(self.calibration, Calibration):
            raise OptionsError(f"option calibration expected a mapping, got {type(self.calibration).__name__}")
        _check_geometry({name: getattr(self, name) for name in GEOMETRY_OPTIONS})
        _check_head_parallelism(self.process_group, self.head_range)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Config:
        """The config of ``torch.compile``'s ``options`` mapping (a plan path is loaded here)."""
        if options is not None and not isinstance(options, Mapping):
            raise OptionsError(f"options expected a mapping, got {type(options).__name__}")
        options = {} if options is None else options
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name != "plan_name")
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise OptionsError(f"backend 'forcing_kv' got unknown options {unknown}; expected some of {names}")
        values = dict(options)
        _check_geometry(values)  # before the plan is set to this geometry
        geometry = {name: values[name] for name in GEOMETRY_OPTIONS if values.get(name) is not None}
        plan = values.get("plan", AUTO_PLAN)
        if isinstance(plan, str) and plan != AUTO_PLAN and is_bundled_name(plan) and not os.path.exists(plan):
            values["plan_name"] = plan
        values["plan"] = None if plan is None or plan == AUTO_PLAN else _resolve_plan(plan, geometry)
        values["calibration"] = Calibration.from_mapping(values.get("calibration", {}))
        if values.get("kernels") is None:
            values.pop("kernels", None)
        if isinstance(values.get("head_range"), list):
            values["head_range"] = tuple(values["head_range"])
        return cls(**values)

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if self.process_group is not None:
            raise OptionsError("a config with option process_group cannot be serialized (a process group lives in "
                               "one process); serialize it without and pass the group when compiling")
        plan = self.plan_name or (None if self.plan is None else self.plan.to_dict())
        return {"type": CONFIG_TYPE, "plan": plan, "frame_tokens": self.frame_tokens, "chunk_frames": self.chunk_frames,
                "calibration": self.calibration.to_dict(), "mode": self.mode, "lowering": self.lowering,
                "inductor_mode": self.inductor_mode, "strict": self.strict, "kv_recache": self.kv_recache,
                "release": self.release, "kernels": self.kernels,
                "head_range": None if self.head_range is None else list(self.head_range)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Config:
        if not isinstance(doc, Mapping) or doc.get("type") != CONFIG_TYPE:
            found = doc.get("type") if isinstance(doc, Mapping) else type(doc).__name__
            raise OptionsError(f"expected a document of type {CONFIG_TYPE!r}, got {found!r}")
        values = {k: v for k, v in doc.items() if k != "type"}
        if isinstance(values.get("plan"), Mapping):
            values["plan"] = HeadPlan.from_dict(values["plan"])
        return cls.from_options(values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Config:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"config: not valid JSON ({exc})") from None
        return cls.from_dict(doc)
