"""Every fkv custom op under torch.library.opcheck, in the layouts real models hand them.

Real pipelines keep K/V in ``[B, L, H, D]`` buffers and attend over transposed views of them (``[B, H, L, D]``,
not contiguous), the query a transposed view of the projection; the ops' fakes must promise what the real ops
return for those layouts, in every dtype a pipeline runs, at batch 1 and 2, with autograd on where the op is
differentiable. The cache ops write their buffers without declaring a mutation (``store_attention``'s docstring
says why), so each check hands them buffers that already hold what they write: the writes change no value.
"""

import pytest
import torch

from fkv_compile import HeadPlan, ops  # noqa: F401  registers torch.ops.fkv
from fkv_compile.config import Config
from fkv_compile.modes.state import open_session

FRAME, CHUNK, HEADS, DIM = 6, 2, 2, 8
LQ = FRAME * CHUNK
PLAN = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=FRAME, chunk_frames=CHUNK, segments_per_frame=3,
                          candidate_frames=CHUNK)  # what compact's store needs
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = [pytest.param(b, d, id=f"b{b}-{str(d).removeprefix('torch.')}") for b in (1, 2) for d in DTYPES]


def _session(mode: str, monkeypatch, pattern: str = "cache-window"):
    s = open_session({"plan": PLAN, "mode": mode, "lowering": "eager"}, None, Config.from_options)
    # opcheck calls the op on clones of the key, whose addresses the allocator may reuse in any order: layer
    # binding is not what it checks (tests/test_ops.py does), so every call is layer 0
    monkeypatch.setattr(type(s), "layer_of", lambda self, site, key: 0)
    s.new_site(graph=0, node="sdpa", pattern=pattern, action="rewritten", layer_key="param")
    return s


def _bhld(buffer: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """``buffer[:, start:end]`` of a ``[B, L, H, D]`` buffer as attention reads it: ``[B, H, L, D]``, a view."""
    return buffer[:, start:end].transpose(1, 2)


def _buffer(batch: int, tokens: int, dtype: torch.dtype, seed: int, grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, HEADS, DIM, generator=gen).to(dtype)
    return x.requires_grad_(grad)


@pytest.mark.parametrize("batch,dtype", LAYOUTS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("op", ["select_attention", "oracle_attention", "profile_attention"])
def test_attention_ops_in_real_layouts(op, grad, batch, dtype, monkeypatch):
    s = _session(op.removesuffix("_attention"), monkeypatch)
    q = _bhld(_buffer(batch, LQ, dtype, 0, grad))
    window = 4 * FRAME + LQ  # two sink/recent frames, two candidates, the chunk
    k, v = (_bhld(_buffer(batch, window + FRAME, dtype, seed, grad), 0, window) for seed in (1, 2))
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    assert not q.is_contiguous() and not k.is_contiguous()
    torch.library.opcheck(getattr(torch.ops.fkv, op).default, (q, k, v, key, s.id, 0, None))


@pytest.mark.parametrize("batch,dtype", LAYOUTS)
@pytest.mark.parametrize("masked", [True, False], ids=["kept-tokens", "all-tokens"])
def test_attention_backward_in_real_layouts(masked, batch, dtype, monkeypatch):
    s = _session("select", monkeypatch)
    q, grad_out = (_bhld(_buffer(batch, LQ, dtype, seed)) for seed in (0, 3))
    k, v = (_bhld(_buffer(batch, 5 * FRAME + LQ, dtype, seed), 0, 4 * FRAME + LQ) for seed in (1, 2))
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    torch.library.opcheck(torch.ops.fkv.attention_backward.default, (grad_out, q, k, v, key, s.id, 0, masked, None))


def _chunk_cache(batch: int, dtype: torch.dtype, write: tuple[int, int], tokens: int = 5 * FRAME):
    """A query, the chunk's K/V ``[B, Lq, H, D]`` and buffers that already hold them at ``write``."""
    q = _bhld(_buffer(batch, LQ, dtype, 0))
    k_new, v_new = (_buffer(batch, LQ, dtype, seed) for seed in (1, 2))
    cache_k, cache_v = (_buffer(batch, tokens, dtype, seed) for seed in (3, 4))
    cache_k[:, write[0]:write[1]], cache_v[:, write[0]:write[1]] = k_new, v_new
    return q, k_new, v_new, cache_k, cache_v


@pytest.mark.parametrize("batch,dtype", LAYOUTS)
def test_select_cache_attention_in_real_layouts(batch, dtype, monkeypatch):
    s = _session("select", monkeypatch)
    write = (2 * FRAME, 2 * FRAME + LQ)
    q, k_new, v_new, cache_k, cache_v = _chunk_cache(batch, dtype, write)
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    torch.library.opcheck(torch.ops.fkv.select_cache_attention.default,
                          (q, k_new, v_new, cache_k, cache_v, key, *write, 0, write[1], 0, s.id, 0, None))


@pytest.mark.parametrize("batch,dtype", LAYOUTS)
def test_store_ops_in_real_layouts(batch, dtype, monkeypatch):
    # a video's first chunk (the store's first write starts at 0), a roll over equal tokens, the staged op on a clone
    s = _session("compact", monkeypatch)
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    write = (0, LQ)
    q, k_new, v_new, cache_k, cache_v = _chunk_cache(batch, dtype, write)
    common = (*write, 0, LQ, 0, s.id, 0, None)
    torch.library.opcheck(torch.ops.fkv.store_attention.default,
                          (q, k_new, v_new, cache_k, cache_v, key, [], *common))
    torch.library.opcheck(torch.ops.fkv.staged_store_attention.default,
                          (q, k_new, v_new, cache_k.clone(), cache_v.clone(), key, [], *common))
    flat_k, flat_v = (c[:, :1].expand(-1, 5 * FRAME, -1, -1).contiguous() for c in (cache_k, cache_v))
    torch.library.opcheck(torch.ops.fkv.store_roll.default, (key, flat_k, flat_v, 0, FRAME, 2 * FRAME, s.id, 0))
    torch.library.opcheck(torch.ops.fkv.replay_roll.default, (flat_k, 0, FRAME, 2 * FRAME, [], s.id))
    torch.library.opcheck(torch.ops.fkv.replay_write.default, (cache_k, k_new, *write, [], s.id))


@pytest.mark.parametrize("batch,dtype", LAYOUTS)
def test_store_grown_attention_in_real_layouts(batch, dtype, monkeypatch):
    s = _session("compact", monkeypatch)
    # the op releases the grown K/V it returns (storage resized to 0), which opcheck then compares: whole-tensor reads
    # of a released tensor crash the process (README), so here they stay allocated; their layout is what is checked
    monkeypatch.setattr(s.compact, "release_unwatched", lambda layer, k, v: None)
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    q, k_new, v_new, cache_k, cache_v = _chunk_cache(batch, dtype, (0, LQ), tokens=LQ)
    # the grown K/V hold no values (released at once, the store holds the tokens): nothing to compare between an
    # eager and a traced run, so the check is of the schema, the fake's layouts and the autograd registration
    torch.library.opcheck(torch.ops.fkv.store_grown_attention.default,
                          (q, k_new, v_new, cache_k, cache_v, key, 0, s.id, 0, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
