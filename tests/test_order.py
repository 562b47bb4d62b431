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

    def written(buffers, write, end):
        return order.written(0, *buffers, write, end, end, 4, 4, order.touched(0, *buffers))

    assert written((k, v), (0, 4), 4), "a stream's first chunk"
    assert written((k, v), (4, 8), 8), "appended"
    assert not written((k, v), (0, 4), 8), "inside the window"
    assert not written((k, v), (8, 12), 12), "the previous window was out of order"
    assert written((k, v), (0, 4), 4), "a new stream starts over"
    assert not written((k, v), (2, 6), 8), "a write that stops short of the window's end (its last tokens older)"
    assert written((k, v), (0, 4), 4), "and over again"
    assert not written((k.clone(), v.clone()), (4, 8), 8), "other buffers: their history is unknown"


def test_writes_from_elsewhere_between_the_ops_own_are_found_by_content():
    """The op appends each chunk at the window's end; between its calls eager code sometimes writes the buffers too:
    a slot in or out of turn, or all of them again in order (a Krea-style rebuild). Each verdict is the stamps'."""
    verdicts, touched_seen = set(), 0
    for seed in range(8):
        gen = torch.Generator().manual_seed(200 + seed)
        buf_k = torch.randn(1, SLOTS * FRAME, HEADS, DIM, generator=gen, dtype=torch.float64)
        buf_v = torch.zeros_like(buf_k)
        order, stamps, filled = WindowOrder(), WriteStamps(), 0

        def write(slot: int) -> None:
            tokens = slice(slot * FRAME, (slot + 1) * FRAME)
            buf_k[:, tokens] = torch.randn(1, FRAME, HEADS, DIM, generator=gen, dtype=torch.float64)
            stamps.stamp(buf_k, (slice(None), tokens))

        for _ in range(30):
            kind = int(torch.randint(0, 4, (1,), generator=gen)) if filled else 0
            if kind == 1:  # one slot, in turn or not
                write(int(torch.randint(0, filled, (1,), generator=gen)))
            elif kind == 2:  # everything again, in order
                for slot in range(filled):
                    write(slot)
            touched = order.touched(0, buf_k, buf_v)
            touched_seen += touched
            if filled == SLOTS:  # full: a new stream from the start
                filled = 0
            write(filled)  # the op's own write, at the window's end
            filled += 1
            end = filled * FRAME
            window = buf_k[:, :end].transpose(1, 2)
            expected = stamps.in_written_order(window)
            got = order.written(0, buf_k, buf_v, (end - FRAME, end), end, end, FRAME, FRAME, touched)
            assert got is expected, (seed, kind, filled)
            verdicts.add(expected)
    assert verdicts == {True, False} and touched_seen > 20, "both verdicts, over histories written from elsewhere"
