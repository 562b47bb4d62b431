"""The custom ops: registration checks and run-time layer binding."""

import pytest
import torch

from fkv_compile import (
    HeadPlan,
    ops,  # noqa: F401  registers torch.ops.fkv
)
from fkv_compile.config import Config
from fkv_compile.modes.state import open_session
from fkv_compile.semantics import oracle_attention


def _session(plan):
    options = {"plan": plan, "lowering": "eager"}
    return open_session(options, None, Config.from_options)


@pytest.mark.parametrize("op", ["select_attention", "oracle_attention", "profile_attention"])
def test_opcheck(op, monkeypatch):
    # opcheck calls the op on clones of the key, whose addresses the allocator may reuse in any order:
    # layer binding is not what it checks (see the next test), so every call is layer 0
    plan = HeadPlan.from_roles([["static", "dynamic"]], frame_tokens=6, chunk_frames=2, segments_per_frame=3)
    s = _session(plan)
    monkeypatch.setattr(type(s), "layer_of", lambda self, site, key: 0)
    s.new_site(graph=0, node="sdpa", pattern="cache-window", action="rewritten", layer_key="param")
    key = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (12, 48, 48))  # the autograd formula too
    torch.library.opcheck(getattr(torch.ops.fkv, op).default, (q, k, v, key, s.id, 0, None))


def test_layers_bind_in_order_of_first_use_and_stay_bound():
    plan = HeadPlan.from_roles([["static", "static"], ["dense", "dense"]], frame_tokens=4, chunk_frames=1)
    s = _session(plan)
    s.new_site(graph=0, node="sdpa", pattern="cache-window", action="rewritten", layer_key="param")
    keys = [torch.nn.Parameter(torch.randn(2)) for _ in range(2)]
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    for _ in range(2):
        for layer, key in enumerate(keys):
            out = torch.ops.fkv.select_attention(q, k, v, key, s.id, 0, None)
            torch.testing.assert_close(out, oracle_attention(q, k, v, plan, layer))
    assert s.layers[0].kept.tolist() == [12.0, 12.0] and s.layers[1].kept.tolist() == [20.0, 20.0]
    assert s.layers[0].calls == 2


def test_unknown_session_is_a_clear_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="session 987654 is unknown"):
        torch.ops.fkv.select_attention(q, q, q, q, 987654, 0, None)
