"""The compressed ops in plain torch: the implementation on CPU (and wherever Triton is not chosen).

Same signatures and contracts as the Triton kernels of :mod:`fkv_compile.kernels`; which of the two
runs is decided once per device and configuration in :mod:`.dispatch`.

- :func:`range_attention`: heads whose ranges hold the same number of tokens are one group; each
  group's tokens are gathered (or sliced, for one range shared by the whole group) and attended
  with one SDPA call, so the time follows the kept tokens, not the window;
- :func:`segment_similarity`: cosine of every token's key with the same token one frame later,
  averaged per segment (:func:`fkv_compile.semantics.segment_table`), vectorized, from partial sums
  (:func:`similarity_partials`) that head parallelism all-reduces across ranks;
- :func:`gather_tokens`: the tokens of an index, zeros for padding slots.

Shape legend: ``B`` batch, ``H`` heads of q, ``G`` heads of k/v, ``Lq``/``Lk`` tokens, ``D`` head dim,
``R`` ranges per head, ``T`` tokens gathered, ``F`` frame tokens, ``P`` segments per frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..semantics import COSINE_EPS, check_candidate_region, segment_table

__all__ = ["gather_tokens", "range_attention", "segment_similarity", "similarity_from_partials", "similarity_partials"]


def _range_tokens(starts: torch.Tensor, ends: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions ``[B, G, count]`` of the ranges ``[B, G, R]`` laid end to end, and which are real
    (a head with fewer tokens than ``count`` is padded with position 0)."""
    lengths = (ends - starts).clamp_min(0)
    before = lengths.cumsum(-1)  # tokens in the ranges up to and including each
    t = torch.arange(count, device=starts.device).expand(*starts.shape[:2], count).contiguous()
    r = torch.searchsorted(before.contiguous(), t, right=True).clamp_max(starts.shape[-1] - 1)
    position = starts.gather(-1, r) + t - (before - lengths).gather(-1, r)
    valid = t < before[..., -1:]
    return torch.where(valid, position, 0), valid


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``x`` ``[B, H, L, D]`` as a table of ``D``-element rows (a strided view, rows may overlap) and the row
    steps of its batch, head and token dims: token ``(b, h, t)`` is row ``b * sb + h * sh + t * st``.

    Why: one ``embedding`` lookup in this table gathers tokens several times faster on CPU than advanced
    indexing with three broadcast index tensors, and needs no copy of a strided window."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    step = math.gcd(*x.stride()[:3]) or 1
    last = sum((size - 1) * stride for size, stride in zip(x.shape[:3], x.stride()[:3]))
    table = x.as_strided((last // step + 1, x.shape[-1]), (step, 1))
    return table, tuple(stride // step for stride in x.stride()[:3])


def _run(heads: list[int]) -> slice | None:
    """``heads`` as a slice when they are consecutive (the common case: indexing by it is a view)."""
    return slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else None


def _heads_of(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]``: a view for consecutive heads, else a copy stacked from each head's view.

    Why stacked: the models' q, K and V are ``[B, L, H, D]`` buffers viewed as ``[B, H, L, D]``, and
    ``index_select`` along dim 1 of such a view first copies all of it (2.7x slower on CPU)."""
    run = _run(heads)
    return x[:, run] if run else torch.stack([x[:, h] for h in heads], 1)


def _put_heads(out: torch.Tensor, heads: list[int], values: torch.Tensor) -> None:
    """``out[:, heads] = values``."""
    run = _run(heads)
    if run:
        out[:, run].copy_(values)
    else:
        out.index_copy_(1, torch.tensor(heads, device=out.device), values)


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    scale: float | None = None,
    q_heads: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of every head of ``k``/``v`` over the key tokens of its ranges (see
    :func:`fkv_compile.kernels.attention.range_attention` for the contract)."""
    b, num_heads, lq, _ = q.shape
    g = k.shape[1]
    if q_heads is None and g != num_heads:
        raise ValueError(f"range_attention: k has {g} heads, q {num_heads}; pass q_heads to map them")
    if out is None:
        out = q.new_empty((b, num_heads, lq, v.shape[-1]))
    q_index = q_heads.tolist() if q_heads is not None else list(range(g))
    lengths = (ends - starts).clamp_min(0).sum(-1)  # [B, G]
    groups: dict[tuple[int, ...], list[int]] = {}
    for head, per_item in enumerate(lengths.t().tolist()):
        groups.setdefault(tuple(per_item), []).append(head)
    tables = None
    for per_item, heads in groups.items():
        s, e = starts[:, heads], ends[:, heads]
        single = (e - s > 0).sum(-1) <= 1
        first = torch.argmax((e - s).clamp_min(0), dim=-1, keepdim=True)
        a, z = s.gather(-1, first), e.gather(-1, first)
        if bool(single.all()) and bool((a == a[0, 0]).all()) and bool((z == z[0, 0]).all()):
            lo, hi = int(a[0, 0]), int(z[0, 0])
            # heads after tokens: a scattered group copies only the range, not the window
            kg, vg, mask = _heads_of(k[:, :, lo:hi], heads), _heads_of(v[:, :, lo:hi], heads), None
        else:
            tokens, valid = _range_tokens(s, e, max(per_item))
            tables = tables or (_token_rows(k), _token_rows(v))
            kg, vg = (F.embedding(_rows(steps, tokens, heads), table) for table, steps in tables)
            mask = None if len(set(per_item)) == 1 else valid[:, :, None, :]
        target = [q_index[h] for h in heads]
        result = F.scaled_dot_product_attention(_heads_of(q, target), kg, vg, attn_mask=mask, scale=scale)
        _put_heads(out, target, result)
    return out


def _rows(steps: tuple[int, int, int], tokens: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Rows of a :func:`_token_rows` table holding ``tokens`` ``[B, G, T]`` of ``heads``."""
    sb, sh, st = steps
    items = torch.arange(tokens.shape[0], device=tokens.device)[:, None, None]
    index = torch.tensor(heads, device=tokens.device)[None, :, None]
    return items * sb + index * sh + tokens * st


def similarity_partials(
    keys: torch.Tensor,
    groups: torch.Tensor,
    first_frame: int,
    num_candidates: int,
    frame_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums a similarity is made of, over the heads of each group and the head dim (fp32): ``dots``
    ``[B, G, nc, F]`` (each candidate token's key with the same token one frame later) and ``squares``
    ``[B, G, nc + 1, F]`` (squared key norms of the candidates and the frame after them). Sums of partial sums
    over disjoint heads are the sums over all of them: head parallelism all-reduces these."""
    f, nc = frame_tokens, num_candidates
    g, hg = groups.shape
    # token-major, a group's heads and dims as one contiguous row, the sums as dot products along it (einsum: no
    # product tensor is made): a layer's choice 2.5x faster on CPU than products summed over two dims of a copy
    region = keys.transpose(1, 2)[:, first_frame * f : (first_frame + nc + 1) * f]  # [B, T, H, D], a view
    x = region.index_select(2, groups.flatten().to(keys.device)).float().flatten(2)  # [B, T, G * Hg * D]
    x = x.unflatten(1, (nc + 1, f)).unflatten(3, (g, -1))  # [B, nc + 1, F, G, Hg * D]
    squares = torch.einsum("...e,...e->...", x, x).permute(0, 3, 1, 2)  # [B, G, nc + 1, F]
    dots = torch.einsum("...e,...e->...", x[:, :-1], x[:, 1:]).permute(0, 3, 1, 2)  # [B, G, nc, F]
    return dots, squares


def similarity_from_partials(dots: torch.Tensor, squares: torch.Tensor, segments: int) -> torch.Tensor:
    """Similarity ``[B, G, nc * P]`` (fp32, frame-major): the cosine of every token (norms clamped at
    :data:`~fkv_compile.semantics.COSINE_EPS`) averaged over each segment."""
    f = dots.shape[-1]
    norms = squares.sqrt().clamp_min(COSINE_EPS)
    cos = dots / (norms[:, :, :-1] * norms[:, :, 1:])  # [B, G, nc, F]
    table = segment_table(f, segments, dots.shape[2], dots.device)
    cum = F.pad(cos.flatten(2).cumsum(-1, dtype=torch.float64), (1, 0))  # prefix sums over the candidates' tokens
    sums = cum[..., table.end] - cum[..., table.start]
    return (sums / (table.end - table.start)).float()


def segment_similarity(
    keys: torch.Tensor,
    groups: torch.Tensor,
    first_frame: int,
    num_candidates: int,
    frame_tokens: int,
    segments: int,
) -> torch.Tensor:
    """Similarity ``[B, G, num_candidates * P]`` (fp32, frame-major) of the candidate frames
    ``[first_frame, first_frame + num_candidates)`` of ``keys`` ``[B, H, L, D]``, each against the next
    frame; ``groups`` ``[G, Hg]``: the heads whose keys each selection concatenates."""
    check_candidate_region(keys.shape[2], first_frame, num_candidates, frame_tokens, segments)
    if num_candidates == 0:
        return keys.new_empty((keys.shape[0], groups.shape[0], 0), dtype=torch.float32)
    dots, squares = similarity_partials(keys, groups, first_frame, num_candidates, frame_tokens)
    return similarity_from_partials(dots, squares, segments)


def gather_tokens(k: torch.Tensor, v: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k[b, :, index[b]]`` and the same of ``v``, ``[B, G, T, D]``; ``index`` ``[B, T]`` (``-1``: a padding
    slot, which comes out as zeros)."""
    b, g, _, d = k.shape
    pad = (index < 0)[:, None, :, None]
    at = index.clamp_min(0)[:, None, :, None].expand(b, g, -1, d)
    return (torch.gather(k, 2, at).masked_fill(pad, 0), torch.gather(v, 2, at).masked_fill(pad, 0))
