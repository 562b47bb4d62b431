"""A Self Forcing-style AR rollout: chunk by chunk, a few denoising steps, then a clean pass that commits the chunk.

The pipeline (not the model) allocates the per-layer caches, as the real pipelines do, and the
same (possibly compiled) model is called ``len(steps) + 1`` times per chunk at the same position.
A prompt switch (LongLive) swaps the text and recomputes the self-attention cache from the frames
generated so far (KV-recache, :func:`recache`) before the next chunk. :func:`recompute_rollout` is the streaming
pipeline that rebuilds its cache at every block instead (``cache_style="recompute"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modes.profile import tag
from .self_forcing import CausalVideoDiT, CrossCache, KVCache, MiniConfig, write_index

__all__ = ["RolloutInputs", "make_inputs", "new_caches", "rollout", "chunks", "denoise", "recache", "recompute_rollout",
           "build"]

DENOISING_STEPS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)


@dataclass
class RolloutInputs:
    """Everything random a rollout consumes, drawn up front so that runs are comparable."""

    context: torch.Tensor  # [B, Lt, text_dim]
    noise: list[list[torch.Tensor]]  # per chunk, per denoising step: [B, C, C_in, H, W]
    switches: dict[int, torch.Tensor] = field(default_factory=dict)  # chunk -> the new prompt from that chunk on


def build(cfg: MiniConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> CausalVideoDiT:
    """The miniature with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return CausalVideoDiT(cfg).to(dtype).eval()


def make_inputs(
    cfg: MiniConfig, *, batch: int = 1, chunks: int, seed: int = 0, dtype: torch.dtype = torch.float32,
    steps: Sequence[float] = DENOISING_STEPS, device: torch.device | str = "cpu", switch_at: Sequence[int] = (),
) -> RolloutInputs:
    """Seeded on the CPU (the same numbers on every device), then moved to ``device``. ``switch_at``:
    chunks (> 0) before which the prompt changes to a new random one."""
    if any(not 0 < c < chunks for c in switch_at):
        raise ValueError(f"switch_at expected chunks in [1, {chunks}), got {list(switch_at)}")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.chunk_frames, cfg.in_channels, cfg.latent_height, cfg.latent_width)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype)
    noise = [[torch.randn(shape, generator=gen).to(device, dtype) for _ in steps] for _ in range(chunks)]
    switches = {c: torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen).to(device, dtype) for c in switch_at}
    return RolloutInputs(context=context, noise=noise, switches=switches)


def new_caches(
    cfg: MiniConfig, *, batch: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[list[KVCache], list[CrossCache]]:
    """Per-layer self-attention caches (dense, preallocated) and cross-attention caches."""
    lc = cfg.cache_frames * cfg.frame_tokens if cfg.cache_style != "cat" else 0  # "cat": grown per chunk
    shape = (batch, lc, cfg.rank_heads, cfg.head_dim)
    def index() -> torch.Tensor | int:
        return torch.tensor([0], dtype=torch.long, device=device) if cfg.index_style == "tensor" else 0

    def indices() -> dict:
        if cfg.cache_style == "recompute":  # Python ints and flags, set by recompute_rollout
            return {"end": 0, "context": False}
        return {"global_end_index": index(), "local_end_index": index(), "recache": False}

    kv = [
        {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device),
         **indices()}
        for _ in range(cfg.num_layers)
    ]
    text_shape = (batch, cfg.text_len, cfg.num_heads, cfg.head_dim)  # cross-attention: every head, on its tokens
    cross = [
        {"k": torch.zeros(text_shape, dtype=dtype, device=device), "v": torch.zeros(text_shape, dtype=dtype, device=device),
         "is_init": False}
        for _ in range(cfg.num_layers)
    ]
    return kv, cross


def rollout(
    model: nn.Module | Callable[..., torch.Tensor],
    cfg: MiniConfig,
    inputs: RolloutInputs,
    *,
    steps: Sequence[float] = DENOISING_STEPS,
    caches: tuple[list[KVCache], list[CrossCache]] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Generate ``len(inputs.noise)`` chunks; returns the denoised latents of every chunk (:func:`chunks`)."""
    outputs = []
    for chunk, x in enumerate(chunks(model, cfg, inputs, steps=steps, caches=caches)):
        outputs.append(x)
        if on_chunk is not None:
            on_chunk(chunk)
    return outputs


def denoise(noises: Sequence[torch.Tensor], steps: Sequence[float],
            flow: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One chunk's denoising steps, flow matching: ``x_t = (1 - t) x0 + t noise``; ``flow(step, x_t, t * 1000)`` is
    the model's prediction of ``noise - x0`` (``t`` per batch item and frame: a last chunk may be short)."""
    x = noises[0]
    for i, t in enumerate(steps):
        x0 = x - t * flow(i, x, torch.full(x.shape[:2], t * 1000.0, dtype=x.dtype, device=x.device))
        x = x0 if i + 1 == len(steps) else (1 - steps[i + 1]) * x0 + steps[i + 1] * noises[i + 1]
    return x


@torch.no_grad()
def chunks(
    model: nn.Module | Callable[..., torch.Tensor],
    cfg: MiniConfig,
    inputs: RolloutInputs,
    *,
    steps: Sequence[float] = DENOISING_STEPS,
    caches: tuple[list[KVCache], list[CrossCache]] | None = None,
) -> Iterator[torch.Tensor]:
    """The rollout chunk by chunk: yields each chunk's denoised latents once its clean pass ran (a server can
    interleave several videos' chunks on one model).

    Each chunk is denoised (:func:`denoise`), then the clean pass at ``t = 0`` writes its keys and values into the
    caches for the next chunk.
    ``caches`` (fresh, from :func:`new_caches`) lets the caller watch them; by default they are new.
    Every forward is tagged with its chunk and step for the profiler (:func:`fkv_compile.tag`).
    """
    batch, dtype, device = inputs.context.shape[0], inputs.context.dtype, inputs.context.device
    kv_cache, cross_cache = caches if caches is not None else new_caches(cfg, batch=batch, dtype=dtype, device=device)
    outputs = []
    context = inputs.context
    for chunk, noises in enumerate(inputs.noise):
        start = chunk * cfg.chunk_frames * cfg.frame_tokens
        if chunk in inputs.switches:
            context = inputs.switches[chunk]
            with tag(chunk=chunk, step=-1):
                recache(model, cfg, outputs, context, kv_cache, cross_cache)

        def flow(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with tag(chunk=chunk, step=step):
                return model(x, t, context, kv_cache, cross_cache, start)

        x = denoise(noises, steps, flow)
        zero = torch.zeros((batch, x.shape[1]), dtype=dtype, device=device)
        with tag(chunk=chunk, step=len(steps)):  # the clean pass that commits the chunk
            model(x, zero, context, kv_cache, cross_cache, start)
        outputs.append(x)
        yield x


@torch.no_grad()
def recache(
    model: nn.Module | Callable[..., torch.Tensor],
    cfg: MiniConfig,
    history: Sequence[torch.Tensor],
    context: torch.Tensor,
    kv_cache: list[KVCache],
    cross_cache: list[CrossCache],
) -> None:
    """LongLive's KV-recache after a prompt switch: recompute the self-attention cache under the new prompt.

    The last ``min(cache frames, frames so far)`` generated chunks (``history``, clean latents) are run
    again at ``t = 0`` from the start of the cache, chunk by chunk; the model leaves the sink slots as
    they were (sink protection) and the cross-attention caches are rebuilt from the new text.
    """
    c, f = cfg.chunk_frames, cfg.frame_tokens
    chunks = min(cfg.cache_frames // c, len(history))
    first = len(history) - chunks
    for cross in cross_cache:
        cross["is_init"] = False
    for cache in kv_cache:
        write_index(cache, "global_end_index", first * c * f)
        write_index(cache, "local_end_index", 0)
        cache["recache"] = True
    zero = torch.zeros((context.shape[0], c), dtype=context.dtype, device=context.device)
    for chunk in range(first, len(history)):
        model(history[chunk], zero, context, kv_cache, cross_cache, chunk * c * f)
    for cache in kv_cache:
        cache["recache"] = False


@torch.no_grad()
def recompute_rollout(
    model: nn.Module | Callable[..., torch.Tensor],
    cfg: MiniConfig,
    inputs: RolloutInputs,
    *,
    steps: Sequence[float] = DENOISING_STEPS,
    caches: tuple[list[KVCache], list[CrossCache]] | None = None,
) -> list[torch.Tensor]:
    """A streaming pipeline that recomputes its KV cache at every block (``cache_style="recompute"``, Krea-style).

    Before each block after the first it zeroes every layer's K/V buffers in place, sets the Python-int index to
    0 and runs one forward at ``t = 0`` over the clean context frames (the video's first frame and its latest
    ``context_frames - 1``), which rewrites the cache from position 0; the block's denoising steps then write the
    chunk after that context, at the same slots once the context is full. There is no clean pass. Returns the
    denoised latents of every chunk.
    """
    batch, dtype, device = inputs.context.shape[0], inputs.context.dtype, inputs.context.device
    kv_cache, cross_cache = caches if caches is not None else new_caches(cfg, batch=batch, dtype=dtype, device=device)
    outputs: list[torch.Tensor] = []
    for chunk, noises in enumerate(inputs.noise):
        if outputs:
            frames = torch.cat(outputs, 1)
            latest = min(cfg.context_frames - 1, frames.shape[1] - 1)
            context_frames = torch.cat([frames[:, :1], frames[:, frames.shape[1] - latest:]], 1)
            for cache in kv_cache:
                cache["k"].zero_()
                cache["v"].zero_()
                cache["end"], cache["context"] = 0, True
            zero = torch.zeros((batch, context_frames.shape[1]), dtype=dtype, device=device)
            with tag(chunk=chunk, step=-1):
                model(context_frames, zero, inputs.context, kv_cache, cross_cache, 0)
            for cache in kv_cache:
                cache["context"] = False
        start = kv_cache[0]["end"]

        def flow(step: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with tag(chunk=chunk, step=step):
                return model(x, t, inputs.context, kv_cache, cross_cache, start)

        outputs.append(denoise(noises, steps, flow))
    return outputs
