"""Run-time state belongs to the compiled model: compiled, run and dropped, a compact model leaves nothing behind."""

import ctypes
import gc
import resource
import weakref

import torch
from rollouts import mixed_plan

import fkv_compile
from fkv_compile.models import MiniConfig, build, make_inputs, rollout
from fkv_compile.report import session_of

# 384 tokens per frame, 4 heads x 128, 2 layers, 21 frames: a store of about 28 MiB after the rollout
CFG = MiniConfig(dim=512, num_heads=4, ffn_dim=512, latent_height=32, latent_width=48, num_frames=21)
ROUNDS = 4


def _rss() -> int:
    """Resident bytes after handing freed heap back to the system (glibc keeps it otherwise: noise per round)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _compile_run_drop() -> tuple[weakref.ref, int]:
    model = build(CFG, seed=0)
    inputs = make_inputs(CFG, chunks=7, seed=0)
    options = {"plan": mixed_plan(CFG), "mode": "compact", "lowering": "aot_eager"}
    compiled = torch.compile(model, backend="forcing_kv", options=options)
    rollout(compiled, CFG, inputs)
    session = session_of(compiled, "test")
    store_bytes = fkv_compile.memory_report(compiled).compact_bytes
    ref = weakref.ref(session)
    del session, compiled, model, inputs, options
    torch._dynamo.reset()
    for _ in range(5):  # a full collection: objects a pass's finalizers let go (dynamo's, after a graph break at
        if not gc.collect():  # .tolist()) are freed by the next pass
            break
    return ref, store_bytes


def test_a_dropped_compact_model_frees_its_session_and_stores():
    rss = []
    for _ in range(ROUNDS):
        session, store_bytes = _compile_run_drop()
        assert session() is None, "the session (and its compact stores) outlived its model and dynamo's caches"
        rss.append(_rss())
    assert store_bytes > 20 * 2**20
    growth = (rss[-1] - rss[1]) / (ROUNDS - 2)  # the first round warms up torch's own caches
    print(f"store {store_bytes / 2**20:.1f} MiB per round; RSS after each round (MiB): "
          f"{[round(r / 2**20) for r in rss]}; growth {growth / 2**20:.1f} MiB per round")
    assert growth < store_bytes / 2, f"the process grows by {growth / 2**20:.1f} MiB per compile-run-drop round"
