"""The run-time proof that a window is in written order (fkv_compile.modes.order), against write stamps."""

import torch

from fkv_compile.modes.order import WindowOrder
from fkv_compile.tools.testing import WriteStamps

FRAME, HEADS, DIM, SLOTS = 4, 2, 8, 6


def _writes(seed: int, steps: int = 40) -> list[tuple[int, int]]:
    """A stream of one-frame chunk writes ``(slot, repeats)``: appended while there is room, then into any slot
    (a ring's, in or out of turn), each written again by ``repeats`` later denoising steps."""
    gen = torch.Generator().manual_seed(seed)
    filled, out = 0, []
    for _ in range(steps):
        slot = filled if filled < SLOTS else int(torch.randint(0, SLOTS, (1,), generator=gen))
        filled = max(filled, slot + 1)
        out.append((slot, int(torch.randint(0, 3, (1,), generator=gen))))
    return out


def test_content_sampling_agrees_with_write_stamps_over_ring_and_append_streams():
    verdicts = set()
    for seed in range(8):
        buf_k = torch.zeros(1, SLOTS * FRAME, HEADS, DIM, dtype=torch.float64)
        buf_v = torch.zeros_like(buf_k)
        order, stamps, filled = WindowOrder(), WriteStamps(), 0
        gen = torch.Generator().manual_seed(100 + seed)
        for slot, repeats in _writes(seed):
            filled = max(filled, slot + 1)
            for _ in range(repeats + 1):
                tokens = slice(slot * FRAME, (slot + 1) * FRAME)
                buf_k[:, tokens] = torch.randn(1, FRAME, HEADS, DIM, generator=gen, dtype=torch.float64)
                stamps.stamp(buf_k, (slice(None), tokens))
                k, v = (b[:, :filled * FRAME].transpose(1, 2) for b in (buf_k, buf_v))
                expected = stamps.in_written_order(k)
                assert order.sampled(0, k, v, FRAME, FRAME) is expected, (seed, slot, filled)
                verdicts.add(expected)
    assert verdicts == {True, False}, "the streams reach both verdicts"


def test_a_write_the_op_made_keeps_the_order_only_at_the_window_end():
    order = WindowOrder()
    k, v = torch.zeros(1, 24, 2, 8), torch.zeros(1, 24, 2, 8)
    assert order.written(0, k, v, (0, 4), 4, 4, 4), "a stream's first chunk"
    assert order.written(0, k, v, (4, 8), 8, 8, 4), "appended"
    assert not order.written(0, k, v, (0, 4), 8, 8, 4), "inside the window"
    assert not order.written(0, k, v, (8, 12), 12, 12, 4), "the previous window was out of order"
    assert order.written(0, k, v, (0, 4), 4, 4, 4), "a new stream starts over"
    assert not order.written(0, k.clone(), v.clone(), (4, 8), 8, 8, 4), "other buffers: their history is unknown"
