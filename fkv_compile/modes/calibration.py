"""Self-calibration: a model compiled without a plan runs dense on its first video and makes its own plan.

``torch.compile(model, backend="forcing_kv")`` with no plan rewrites the attention sites as usual,
but while the session has no plan their ops run dense attention (bit-identical to ``mode="off"``)
and record each call's frame-level attention mass, as ``mode="profile"`` does. At the first call
of layer 0 that starts a new video (its window holds only the current chunk, after windows with
history), or the chunk after ``calibration.chunks`` chunks, :class:`Calibrator` classifies the
heads (:class:`~fkv_compile.classify.Profile`) and returns the plan; from that call on the sites
compress in the configured mode. The graphs do not change, so nothing recompiles.

The geometry (tokens per frame, frames per chunk) comes from the options, else from the model's
3-d patch embedding: a ``Conv3d`` whose ``[B, C, F, h, w]`` output becomes the token sequence
(Wan and the models built on it). Its output shape is read from the traced graph when the
convolution is traced, else from a one-shot forward hook (an outer frame that dynamo skips runs the
embedding eagerly). A candidate is accepted only if it fits the attention: ``Lq = F h w``.

Chunks are told apart at layer 0 by the window's length and a fingerprint of its last history
frame: the denoising steps of one chunk read the same history, the next chunk's history ends with
the previous chunk.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ..classify import MassRecord, Profile
from ..config import Calibration
from ..plan import HeadPlan, PlanError
from ..semantics import window_layout
from .profile import record_call

__all__ = ["Geometry", "GeometryError", "Calibrator"]

log = logging.getLogger("fkv_compile")


class GeometryError(ValueError):
    """The frame geometry of a model compiled without a plan cannot be determined or does not fit its attention."""


@dataclass(frozen=True)
class Geometry:
    """Tokens per frame and frames per chunk, and where they came from (for the report)."""

    frame_tokens: int
    chunk_frames: int
    source: str

    @classmethod
    def of_patches(cls, shape: tuple[int, ...], source: str) -> Geometry:
        """The geometry of a patch embedding's ``[B, C, F, h, w]`` output."""
        f, h, w = shape[-3:]
        return cls(frame_tokens=h * w, chunk_frames=f, source=f"{source} ({f} frames x {h}x{w} patches per chunk)")

    def fits(self, lq: int, lk: int) -> bool:
        return window_layout(lq, lk, self.frame_tokens, self.chunk_frames) is not None


MISSING = ("cannot tell the frame geometry of this model: pass options frame_tokens (tokens per latent frame) and "
           "chunk_frames (latent frames per chunk), or a plan")


class Calibrator:
    """The calibration of one session: dense calls recorded until the plan is made.

    With a ``template`` (a plan given by name whose native geometry does not fit the model, and no
    geometry option) nothing is classified: the template's roles are used as soon as the patch
    embedding has told the geometry (the first call runs dense; its window holds only the chunk,
    which every role keeps whole anyway)."""

    def __init__(self, calibration: Calibration, geometry: Geometry | None, template: HeadPlan | None = None):
        self.calibration = calibration
        self.geometry = geometry
        self.template = template
        self.patches: list[Geometry] = []  # candidates seen at run time (patch-embedding hooks)
        self.records: list[MassRecord] = []
        self.chunks = 0  # chunks started at layer 0 during calibration
        self.switched: str | None = None  # when and why the plan was made
        self._last_chunk: tuple[int, float] | None = None
        self._had_history = False
        self._warned = False

    @property
    def active(self) -> bool:
        return self.switched is None

    def observe_patch(self, shape: tuple[int, ...], source: str) -> None:
        """A patch-embedding output ``[B, C, F, h, w]`` seen at run time (a hook on the compiled model)."""
        candidate = Geometry.of_patches(shape, source)
        if candidate not in self.patches:
            self.patches.append(candidate)

    def _resolve(self, lq: int, lk: int, layers_known: bool) -> Geometry | None:
        if self.geometry is None:
            fitting = {(g.frame_tokens, g.chunk_frames): g for g in self.patches if g.fits(lq, lk)}
            if len(fitting) > 1:
                raise GeometryError(f"{MISSING}; several patch embeddings fit the attention: "
                                    f"{[g.source for g in fitting.values()]}")
            if fitting:
                self.geometry = next(iter(fitting.values()))
                log.info("forcing_kv: geometry %d tokens per frame, %d frames per chunk, from %s",
                         self.geometry.frame_tokens, self.geometry.chunk_frames, self.geometry.source)
            elif layers_known:  # the model has run once whole: its patch embedding, if any, was seen
                seen = f"; the patch embeddings seen do not fit it: {[g.source for g in self.patches]}" if self.patches else ""
                raise GeometryError(f"{MISSING} (the attention has {lq} query and {lk} key tokens){seen}")
        return self.geometry

    def step(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float | None, num_layers: int | None) -> HeadPlan | None:
        """Called by every attention call while calibrating, before it runs: the plan to use from this call on
        (calibration ends here), or ``None`` (run dense; the call's frame mass is recorded)."""
        geometry = self._resolve(q.shape[2], k.shape[2], num_layers is not None)
        if geometry is None:
            return None
        layout = window_layout(q.shape[2], k.shape[2], geometry.frame_tokens, geometry.chunk_frames)
        if layout is None:
            return None
        if layer == 0 and self.template is not None and num_layers is not None:
            return self._switch(self._adapted(num_layers, q.shape[1]), f"the geometry was read from {geometry.source}")
        if layer == 0:
            plan = self._chunk_boundary(layout.history, self._fingerprint(k, layout.history, geometry), q.shape[1],
                                        num_layers)
            if plan is not None:
                return plan
        record_call(self.records, layer, q, k, scale, geometry.frame_tokens, geometry.chunk_frames)
        return None

    @staticmethod
    def _fingerprint(k: torch.Tensor, history: int, geometry: Geometry) -> tuple[int, float]:
        """The window's length and a sum over its last history frame: constant over one chunk's calls."""
        if not history:
            return k.shape[2], 0.0
        f = geometry.frame_tokens
        last = k[:, :, (history - 1) * f : history * f]
        return k.shape[2], float(last.double().sum())

    def _chunk_boundary(self, history: int, key: tuple[int, float], num_heads: int, num_layers: int | None) -> HeadPlan | None:
        if key == self._last_chunk:
            return None
        self._last_chunk = key
        new_video = history == 0 and self._had_history
        self._had_history |= history > 0
        self.chunks += 1
        limit = self.calibration.chunks
        due = new_video if limit is None else self.chunks > limit
        if not due or num_layers is None:
            return None
        why = "a new video started" if new_video else f"{limit} chunks ran"
        try:
            plan = self._plan(num_layers, num_heads)
        except PlanError as exc:
            if not self._warned:
                self._warned = True
                log.warning("forcing_kv: %s but calibration cannot make a plan yet (%s); calibrating on", why, exc)
            self._had_history = False
            return None
        return self._switch(plan, f"after {self.chunks - 1} chunks ({why})")

    def _switch(self, plan: HeadPlan, when: str) -> HeadPlan:
        self.switched = when
        log.info("forcing_kv: plan in use %s: %d static, %d dynamic heads", when, plan.count("static"),
                 plan.count("dynamic"))
        return plan

    def _adapted(self, num_layers: int, num_heads: int) -> HeadPlan:
        """The template at the geometry read from the model, checked against the model's layers and heads."""
        t, g = self.template, self.geometry
        for name, plan_has, model_has in (("num_layers", t.num_layers, num_layers), ("num_heads", t.num_heads, num_heads)):
            if plan_has != model_has:
                raise PlanError(f"plan does not match the model: {name}: plan has {plan_has}, the model runs {model_has}")
        return dataclasses.replace(t, frame_tokens=g.frame_tokens, chunk_frames=g.chunk_frames)

    def _plan(self, num_layers: int, num_heads: int) -> HeadPlan:
        g = self.geometry
        profile = Profile(self.records, frame_tokens=g.frame_tokens, chunk_frames=g.chunk_frames,
                          num_layers=num_layers, num_heads=num_heads)
        plan = profile.plan(self.calibration.settings, **dict(self.calibration.roles))
        return dataclasses.replace(plan, provenance={**plan.provenance, "source": "fkv_compile.calibration",
                                                     "geometry": g.source})
