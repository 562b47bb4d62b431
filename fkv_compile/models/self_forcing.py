"""A miniature Self Forcing-style causal video DiT, written from scratch.

It reproduces the code path a compiler pass meets in Self Forcing (Wan2.1-based; docs/patterns.md)
at any size: dict KV caches allocated by the caller with int64 index
tensors read by ``.item()``, RMSNorm on q/k over the model dim, 3-axis complex RoPE at absolute
positions with a ``.tolist()`` loop, in-place slice writes, a rolling window with a protected sink,
``fill_`` index updates, per-frame adaLN modulation, a cross-attention cache filled on first use,
and SDPA in ``[B, H, L, D]`` after transposes. Every size comes from :class:`MiniConfig`, so the
same classes run at real size (dim 1536, 12 heads, 30 layers, 1560 tokens per frame).

``sequence_parallel=N`` runs it with Ulysses sequence parallelism over the ``N`` ranks of the default
``torch.distributed`` group (as LongLive 2.0 and xDiT do): each rank embeds the whole chunk and keeps
its ``1 / N`` of the tokens; in self-attention an all-to-all turns the token split into a head split
(``[B, S/N, H, D] -> [B, S, H/N, D]``) before RoPE and the cache, so a rank's cache holds ``H / N``
heads, and another turns it back after attention; the output tokens are gathered at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .flash_standin import register as register_flash_standin
from .flash_standin import varlen_attention

__all__ = ["MiniConfig", "CausalVideoDiT", "KVCache", "CrossCache", "write_index"]

KVCache = dict  # {"k", "v": [B, Lc, H, D], "global_end_index", "local_end_index": int64 [1] or int,
#                  "recache": bool, set by the pipeline while it recomputes the cache after a prompt switch}
CrossCache = dict  # {"k", "v": [B, Lt, H, D], "is_init": bool}


@dataclass(frozen=True)
class MiniConfig:
    """Sizes of the miniature. ``window_frames=None`` is global attention (cache = whole video)."""

    dim: int = 256
    num_heads: int = 2
    num_layers: int = 2
    ffn_dim: int = 512
    in_channels: int = 16
    latent_height: int = 8
    latent_width: int = 12
    patch: tuple[int, int] = (2, 2)
    chunk_frames: int = 3
    num_frames: int = 21
    window_frames: int | None = None
    sink_frames: int = 3
    index_style: str = "tensor"  # "tensor": int64 [1] read with .item(); "int": Python ints in the dict
    # "slots": preallocated buffer, indices in the dict (Self Forcing); "absolute": slots at the absolute
    # position, no indices (CausVid; global); "cat": grown by torch.cat (research forks; global);
    # "longlive": LongLive v1's per-layer clone, attention over cat(sink, window), cache written after all layers;
    # "longlive2": LongLive 2.0's: the same clone, attention over a slice of it (its window is the whole cache), the
    # write-back at the end of the model's forward (one graph with the attention when index_style="int");
    # "rolling": Rolling Forcing-like, keys stored un-rotated and the window re-rotated at every call (order-dependent);
    # "recompute": Krea-style streaming, the cache zeroed and rebuilt from position 0 at every block by a forward
    # over the clean context frames (frame-causal mask), the chunk written after it (models.rollout.recompute_rollout)
    # "ring": StreamDiffusionV2-like, appended until full, then each new chunk written over the next non-sink slot in
    # turn; a graph break after the write and one before the attention, which reads the whole filled buffer in slot
    # order (a window cut in an earlier graph, written by code before it)
    cache_style: str = "slots"
    context_frames: int = 4  # "recompute": the frames rebuilt per block, the first frame and the latest others
    attention: str = "sdpa"  # "sdpa", "manual" (softmax(q @ k^T * scale) @ v written out) or "varlen" (flash-attn)
    text_len: int = 20
    text_dim: int = 64
    freq_dim: int = 64
    rope_positions: int = 1024
    lora_rank: int = 0  # > 0: every Linear of a block carries an unmerged LoRA of this rank (LongLive)
    # a graph break in the self-attention ("slots" caches): "after-write" (the window read and the attention
    # in the next graph), "before-attention" (the window arrives at the attention's graph as an input)
    graph_break: str = "none"
    sequence_parallel: int = 1  # Ulysses over this many ranks of the default process group (see the module doc)

    @property
    def staged(self) -> bool:
        """LongLive's cache: a clone rolled, written and attended over; the cache written after all layers."""
        return self.cache_style in ("longlive", "longlive2")

    def __post_init__(self) -> None:
        styles = ("slots", "absolute", "cat", "longlive", "longlive2", "rolling", "recompute", "ring")
        if self.cache_style not in styles or self.attention not in ("sdpa", "manual", "varlen"):
            raise ValueError(f"cache_style expected one of {styles}, attention 'sdpa', 'manual' or 'varlen'; got "
                             f"{self.cache_style!r}, {self.attention!r}")
        if self.graph_break not in ("none", "after-write", "before-attention"):
            raise ValueError(f"graph_break expected 'none', 'after-write' or 'before-attention', got {self.graph_break!r}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank expected >= 0, got {self.lora_rank}")
        if self.cache_style in ("absolute", "cat", "recompute") and self.window_frames is not None:
            raise ValueError(f"cache_style={self.cache_style!r} sizes its own cache: window_frames must be None")
        if self.cache_style == "ring" and (self.window_frames is None
                                           or (self.window_frames - self.sink_frames) % self.chunk_frames):
            raise ValueError("cache_style='ring' needs window_frames whose frames after the sink are whole chunks, got "
                             f"window_frames={self.window_frames}, sink_frames={self.sink_frames}, "
                             f"chunk_frames={self.chunk_frames}")
        if self.context_frames < 1:
            raise ValueError(f"context_frames expected >= 1, got {self.context_frames}")
        n = self.sequence_parallel
        if n < 1 or self.num_heads % n or (self.chunk_frames * self.frame_tokens) % n:
            raise ValueError(f"sequence_parallel expected a positive divisor of num_heads ({self.num_heads}) and of "
                             f"the chunk's {self.chunk_frames * self.frame_tokens} tokens, got {n}")

    @property
    def rank_heads(self) -> int:
        """Heads of one rank's attention and KV cache (all of them without sequence parallelism)."""
        return self.num_heads // self.sequence_parallel

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        return self.latent_height // self.patch[0], self.latent_width // self.patch[1]

    @property
    def frame_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def cache_frames(self) -> int:
        if self.cache_style == "recompute":
            return self.context_frames + self.chunk_frames
        return self.num_frames if self.window_frames is None else self.window_frames


def _rope_table(head_dim: int, positions: int) -> torch.Tensor:
    """Complex128 ``[positions, head_dim / 2]``: temporal, height, width bands side by side (Wan split)."""
    c = head_dim // 2
    parts = [c - 2 * (c // 3), c // 3, c // 3]
    tables = []
    for part in parts:
        inv = 1.0 / (10000 ** (torch.arange(part, dtype=torch.float64) / part))
        angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(tables, dim=1)


Grid = torch.Tensor | list[tuple[int, int, int]]  # (F, h, w) per batch item: a tensor, or Python ints (LongLive 2.0)


def _rows(grid_sizes: Grid) -> list[tuple[int, int, int]]:
    return grid_sizes if isinstance(grid_sizes, list) else grid_sizes.tolist()


def rope_apply(x: torch.Tensor, grid_sizes: Grid, freqs: torch.Tensor, start_frame: int) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` at absolute frame positions ``start_frame + f`` (3-axis, complex128)."""
    n, c = x.size(2), x.size(3) // 2
    bands = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    out = []
    for i, (f, h, w) in enumerate(_rows(grid_sizes)):
        seq = f * h * w
        xi = torch.view_as_complex(x[i, :seq].to(torch.float64).reshape(seq, n, -1, 2))
        fi = torch.cat(
            [
                bands[0][start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                bands[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                bands[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(seq, 1, -1)
        xi = torch.view_as_real(xi * fi).flatten(2)
        out.append(torch.cat([xi, x[i, seq:]]))
    return torch.stack(out).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str) -> torch.Tensor:
    """Attention of ``[B, L, H, D]`` tensors: SDPA, written out as many models do (``manual``), or
    flash-attn's varlen op (``varlen``, a CPU stand-in where flash-attn is not installed)."""
    if kind == "varlen":
        return varlen_attention(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kind == "manual":
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        out = scores.float().softmax(dim=-1).type_as(v) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def _all_to_all(send: torch.Tensor) -> torch.Tensor:
    """Block ``j`` of ``send`` ``[N, ...]`` goes to rank ``j``; returns what each rank sent here, by rank."""
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send)
    return received


def sequence_to_heads(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Ulysses: ``[B, S/N, H, D]`` (this rank's tokens, all heads) -> ``[B, S, H/N, D]`` (all tokens, its heads)."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world_size, h // world_size, d).permute(2, 0, 1, 3, 4).contiguous()
    return _all_to_all(send).permute(1, 0, 2, 3, 4).reshape(b, world_size * s, h // world_size, d)


def heads_to_sequence(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Ulysses: ``[B, S, H/N, D]`` -> ``[B, S/N, H, D]``, the inverse of :func:`sequence_to_heads`."""
    b, s, h, d = x.shape
    send = x.reshape(b, world_size, s // world_size, h, d).permute(1, 0, 2, 3, 4).contiguous()
    return _all_to_all(send).permute(1, 2, 0, 3, 4).reshape(b, s // world_size, world_size * h, d)


def _read_index(kv_cache: KVCache, name: str) -> int:
    value = kv_cache[name]
    return value.item() if isinstance(value, torch.Tensor) else value


def write_index(kv_cache: KVCache, name: str, value: int) -> None:
    """Set an index entry of a layer cache, in place for tensors (as the pipelines do), else the Python int."""
    if isinstance(kv_cache[name], torch.Tensor):
        kv_cache[name].fill_(value)
    else:
        kv_cache[name] = value


class LoRALinear(nn.Linear):
    """``W x + b + (alpha / r) B A x`` with the low-rank update kept separate (unmerged), as LongLive runs it."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.lora_a = nn.Parameter(torch.randn(rank, in_features) / in_features**0.5)
        # random, not zero as at the start of training: the update must change the output
        self.lora_b = nn.Parameter(torch.randn(out_features, rank) / rank**0.5 * 0.1)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def _linear(cfg: MiniConfig, in_features: int, out_features: int) -> nn.Linear:
    """A block's Linear: plain, or with an unmerged LoRA when ``cfg.lora_rank`` is set."""
    if cfg.lora_rank:
        return LoRALinear(in_features, out_features, cfg.lora_rank)
    return nn.Linear(in_features, out_features)


class CausalSelfAttention(nn.Module):
    """Self-attention of one chunk against the layer's KV cache (append, or roll with a sink)."""

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (_linear(cfg, cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.sink_size = cfg.sink_frames if cfg.window_frames is not None else 0
        self.max_attention_tokens = cfg.cache_frames * cfg.frame_tokens
        self.grow = cfg.cache_style == "cat"
        self.absolute = cfg.cache_style == "absolute"
        self.defer = cfg.staged
        self.cat_window = cfg.cache_style == "longlive"
        self.rerotate = cfg.cache_style == "rolling"
        self.recompute = cfg.cache_style == "recompute"
        self.ring = cfg.cache_style == "ring"
        self.attention = cfg.attention
        self.graph_break = cfg.graph_break
        self.sequence_parallel = cfg.sequence_parallel
        if cfg.attention == "varlen":
            register_flash_standin()

    def forward(
        self,
        x: torch.Tensor,
        grid_sizes: Grid,
        freqs: torch.Tensor,
        kv_cache: KVCache,
        current_start: int,
    ) -> torch.Tensor:
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        if self.sequence_parallel > 1:  # Ulysses: all tokens, this rank's heads
            q, k, v = (sequence_to_heads(t, self.sequence_parallel) for t in (q, k, v))
            s = q.shape[1]
        frame_tokens = math.prod(grid_sizes[0][1:])
        if isinstance(frame_tokens, torch.Tensor):  # Self Forcing reads it with .item() (a graph break)
            frame_tokens = frame_tokens.item()
        current_start_frame = current_start // frame_tokens
        roped_q = rope_apply(q, grid_sizes, freqs, current_start_frame).type_as(v)
        roped_k = rope_apply(k, grid_sizes, freqs, current_start_frame).type_as(v)

        if self.grow:  # the history before this chunk, then the chunk; the grown tensors become the cache
            k_all = torch.cat([kv_cache["k"][:, :current_start], roped_k], dim=1)
            v_all = torch.cat([kv_cache["v"][:, :current_start], v], dim=1)
            kv_cache["k"], kv_cache["v"] = k_all, v_all
            return self._project(attend(roped_q, k_all, v_all, self.attention))
        if self.recompute:
            return self._project(self._recompute(roped_q, roped_k, v, kv_cache, frame_tokens))
        if self.ring:
            return self._project(self._ring(roped_q, roped_k, v, kv_cache, current_start, frame_tokens))
        current_end = current_start + s
        if self.absolute:  # CausVid: the chunk's slots are its absolute positions
            kv_cache["k"][:, current_start:current_end] = roped_k
            kv_cache["v"][:, current_start:current_end] = v
            out = attend(roped_q, kv_cache["k"][:, :current_end], kv_cache["v"][:, :current_end], self.attention)
            return self._project(out)
        sink_tokens = self.sink_size * frame_tokens
        keys, values = kv_cache["k"], kv_cache["v"]
        cache_size = keys.shape[1]
        global_end = _read_index(kv_cache, "global_end_index")
        local_end_prev = _read_index(kv_cache, "local_end_index")
        roll = None
        if self.sink_size and current_end > global_end and s + local_end_prev > cache_size:
            # evict the oldest non-sink tokens: roll the history left, keep the sink in place
            evicted = s + local_end_prev - cache_size
            roll = (sink_tokens, sink_tokens + evicted, local_end_prev - evicted - sink_tokens)  # dst, src, length
            local_end = local_end_prev + current_end - global_end - evicted
        else:
            local_end = local_end_prev + current_end - global_end
        if self.defer:  # LongLive rolls and writes a clone, and repeats both on the cache after all layers
            keys, values = keys.clone(), values.clone()
        if roll is not None:
            dst, src, length = roll
            keys[:, dst : dst + length] = keys[:, src : src + length].clone()
            values[:, dst : dst + length] = values[:, src : src + length].clone()
        local_start = local_end - s
        stored_k = k if self.rerotate else roped_k
        # LongLive's KV-recache after a prompt switch re-runs the window but leaves the sink as it was
        write_start = max(local_start, min(sink_tokens, local_end)) if kv_cache.get("recache") else local_start
        new_k, new_v = stored_k[:, write_start - local_start :], v[:, write_start - local_start :]
        keys[:, write_start:local_end] = new_k
        values[:, write_start:local_end] = new_v
        if self.defer:
            if self.cat_window:  # v1: the sink, then the window after it: adjacent slices, concatenated
                start = max(sink_tokens, local_end - (self.max_attention_tokens - sink_tokens))
                k_w = torch.cat([keys[:, :sink_tokens], keys[:, start:local_end]], dim=1)
                v_w = torch.cat([values[:, :sink_tokens], values[:, start:local_end]], dim=1)
            else:  # 2.0: the window is as long as the cache, a slice of the clone
                start = max(0, local_end - self.max_attention_tokens)
                k_w, v_w = keys[:, start:local_end], values[:, start:local_end]
            kv_cache["deferred"] = (roll, write_start, local_end, new_k, new_v, current_end)
            return self._project(attend(roped_q, k_w, v_w, self.attention))
        window = slice(max(0, local_end - self.max_attention_tokens), local_end)
        if self.rerotate:  # positions relative to the window: every cached key is rotated anew at every call
            frames = (window.stop - window.start) // frame_tokens
            grid = torch.tensor([[frames, *_rows(grid_sizes)[0][1:]]] * b, dtype=torch.long)
            k_w = rope_apply(keys[:, window], grid, freqs, 0).type_as(v)
            q_w = rope_apply(q, grid_sizes, freqs, frames - s // frame_tokens).type_as(v)
            out = attend(q_w, k_w, values[:, window], self.attention)
        else:
            if self.graph_break == "after-write":
                torch._dynamo.graph_break()
            k_w, v_w = keys[:, window], values[:, window]
            if self.graph_break == "before-attention":
                torch._dynamo.graph_break()
            out = attend(roped_q, k_w, v_w, self.attention)
        write_index(kv_cache, "global_end_index", current_end)
        write_index(kv_cache, "local_end_index", local_end)
        return self._project(out)

    def _ring(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, current_start: int,
              frame_tokens: int) -> torch.Tensor:
        """A ring buffer: a new chunk is appended while there is room, then written over the next slot after the
        sink in turn (the chunk's later denoising steps write its slot again); the attention reads the whole filled
        buffer in slot order, so once full the query's own chunk is inside the window."""
        s, keys, values = q.shape[1], kv_cache["k"], kv_cache["v"]
        global_end = _read_index(kv_cache, "global_end_index")
        filled = _read_index(kv_cache, "local_end_index")
        current_end = current_start + s
        if current_end > global_end:  # a new chunk: its slot
            if filled + s <= keys.shape[1]:
                kv_cache["slot"], filled = filled, filled + s
            else:
                following = kv_cache["slot"] + s
                kv_cache["slot"] = following if following + s <= keys.shape[1] else self.sink_size * frame_tokens
        slot = kv_cache["slot"]
        keys[:, slot:slot + s] = k
        values[:, slot:slot + s] = v
        write_index(kv_cache, "global_end_index", current_end)
        write_index(kv_cache, "local_end_index", filled)
        torch._dynamo.graph_break()
        k_w, v_w = keys[:, :filled], values[:, :filled]
        torch._dynamo.graph_break()
        return attend(q, k_w, v_w, self.attention)

    def _recompute(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                   frame_tokens: int) -> torch.Tensor:
        """Krea-style: the context forward (``kv_cache["context"]``) writes the clean context frames from position 0
        and attends frame-causally among them; a denoising step writes the chunk after them, at Python-int slots."""
        s = q.shape[1]
        if kv_cache["context"]:
            kv_cache["k"][:, :s] = k
            kv_cache["v"][:, :s] = v
            kv_cache["end"] = s
            frame = torch.arange(s, device=q.device) // frame_tokens
            causal = frame[:, None] >= frame[None, :]
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=causal)
            return out.transpose(1, 2)
        end = kv_cache["end"]
        kv_cache["k"][:, end : end + s] = k
        kv_cache["v"][:, end : end + s] = v
        return attend(q, kv_cache["k"][:, : end + s], kv_cache["v"][:, : end + s], self.attention)

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention ``[B, S, H, D]`` (Ulysses: back to this rank's tokens first)."""
        if self.sequence_parallel > 1:
            out = heads_to_sequence(out, self.sequence_parallel)
        return self.o(out.flatten(2))


def apply_deferred_cache_updates(kv_caches: list[KVCache]) -> None:
    """LongLive: after all layers ran, each layer's roll and write again, now on its cache, and its indices."""
    for cache in kv_caches:
        roll, write_start, local_end, new_k, new_v, current_end = cache.pop("deferred")
        for buffer, new in ((cache["k"], new_k), (cache["v"], new_v)):
            if roll is not None:
                dst, src, length = roll
                buffer[:, dst : dst + length] = buffer[:, src : src + length].clone()
            buffer[:, write_start:local_end] = new
        write_index(cache, "global_end_index", current_end)
        write_index(cache, "local_end_index", local_end)


class CrossAttention(nn.Module):
    """Attention to the text; its k/v are computed once per video into ``cross_cache``."""

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (_linear(cfg, cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attention = cfg.attention
        if cfg.attention == "varlen":
            register_flash_standin()

    def forward(self, x: torch.Tensor, context: torch.Tensor, cross_cache: CrossCache) -> torch.Tensor:
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        if not cross_cache["is_init"]:
            cross_cache["is_init"] = True
            cross_cache["k"] = self.norm_k(self.k(context)).view(b, -1, n, d)
            cross_cache["v"] = self.v(context).view(b, -1, n, d)
        return self.o(attend(q, cross_cache["k"], cross_cache["v"], self.attention).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.self_attn = CausalSelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(_linear(cfg, cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), _linear(cfg, cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, grid_sizes, freqs, context, kv_cache, cross_cache, current_start):
        frames = e.shape[1]
        # e: [B, F, 6, C]: shift/scale/gate for attention and FFN, one set per frame
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return (h.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)

        def gated(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return (h.unflatten(1, (frames, -1)) * gate).flatten(1, 2)

        y = self.self_attn(modulate(self.norm1(x), e[0], e[1]), grid_sizes, freqs, kv_cache, current_start)
        x = x + gated(y, e[2])
        x = x + self.cross_attn(self.norm3(x), context, cross_cache)
        y = self.ffn(modulate(self.norm2(x), e[3], e[4]))
        return x + gated(y, e[5])


def _sinusoidal(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class CausalVideoDiT(nn.Module):
    """Denoises one chunk of latent frames given the KV caches of all earlier frames.

    ``forward(x [B, F, C_in, H, W], t [B, F], context [B, Lt, text_dim], kv_cache, cross_cache,
    current_start)`` returns the flow prediction with x's shape; ``kv_cache`` and ``cross_cache``
    are lists of one dict per layer, allocated by the caller (see :mod:`.rollout`).
    """

    def __init__(self, cfg: MiniConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=(1, *cfg.patch), stride=(1, *cfg.patch))
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, cfg.in_channels * math.prod(cfg.patch))
        # a plain attribute, as in Wan: Module.to(dtype) would cast a complex buffer to real
        self.freqs = _rope_table(cfg.head_dim, cfg.rope_positions)
        self.rank = 0
        if cfg.sequence_parallel > 1:
            if not (dist.is_initialized() and dist.get_world_size() == cfg.sequence_parallel):
                raise ValueError(f"sequence_parallel={cfg.sequence_parallel} needs torch.distributed initialized with "
                                 f"that many ranks")
            self.rank = dist.get_rank()

    def forward(self, x, t, context, kv_cache, cross_cache, current_start: int):
        cfg = self.cfg
        b, frames = x.shape[:2]
        h = self.patch_embedding(x.transpose(1, 2))  # [B, C, F, h, w]
        if cfg.cache_style == "longlive2":  # its model publishes the grid as Python ints: no .item() graph break
            grid_sizes: Grid = [tuple(h.shape[2:])] * b
        else:
            grid_sizes = torch.tensor([h.shape[2:]] * b, dtype=torch.long)
        h = h.flatten(2).transpose(1, 2)  # [B, F * h * w, C]
        e = self.time_embedding(_sinusoidal(cfg.freq_dim, t.flatten()).type_as(h))  # [B * F, C]
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, (b, frames))  # [B, F, 6, C]
        n = cfg.sequence_parallel
        if n > 1:  # Ulysses: this rank's tokens, each with its frame's modulation (a "frame" of one token)
            part = slice(self.rank * h.shape[1] // n, (self.rank + 1) * h.shape[1] // n)
            h, e0 = h[:, part], e0.repeat_interleave(h.shape[1] // frames, dim=1)[:, part]
        ctx = self.text_embedding(context)
        for i, block in enumerate(self.blocks):
            h = block(h, e0, grid_sizes, self.freqs, ctx, kv_cache[i], cross_cache[i], current_start)
        if n > 1:  # every rank's tokens, in order
            gathered = h.new_empty((n * h.shape[0], *h.shape[1:]))  # [N * B, S/N, C], by rank
            dist.all_gather_into_tensor(gathered, h.contiguous())
            h = gathered.unflatten(0, (n, -1)).transpose(0, 1).flatten(1, 2)
        if cfg.staged:
            apply_deferred_cache_updates(kv_cache)
        shift, scale = (self.head_modulation.unsqueeze(1) + e.unflatten(0, (b, frames)).unsqueeze(2)).chunk(2, dim=2)
        h = (self.head_norm(h).unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)
        out = self.head(h)  # [B, F * h * w, C_in * ph * pw]
        gh, gw = cfg.grid
        ph, pw = cfg.patch
        out = out.view(b, frames, gh, gw, cfg.in_channels, ph, pw)
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, frames, cfg.in_channels, gh * ph, gw * pw)
