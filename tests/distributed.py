"""Multi-process runs of the Ulysses miniature over gloo (CPU), for tests/test_ulysses.py.

The parent spawns ``world_size`` processes with :func:`run_ranks`; each runs the scenarios it is given
(compile the sequence-parallel miniature with the global plan, roll it out) and saves what it saw, its
error if it raised, one file per rank and scenario; the parent compares. A process group timeout turns
a hang (a rank waiting in a collective no other rank joins) into an error instead of a stuck test.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HANG_TIMEOUT_S = 90


@dataclass(frozen=True)
class Scenario:
    """One compile and rollout on every rank."""

    name: str
    cfg: Any  # MiniConfig without sequence parallelism (the single device's); the ranks add it
    plan: Any  # the global HeadPlan every rank is given
    mode: str
    chunks: int
    batch: int = 1
    options: tuple[tuple[str, Any], ...] = ()  # more backend options
    explicit: bool = False  # name the layout: options process_group (a new group of every rank) and head_range


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, scenarios: list[Scenario], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=HANG_TIMEOUT_S))
    try:
        for scenario in scenarios:
            torch._dynamo.reset()
            torch.save(_run(scenario, world_size), Path(out) / f"{scenario.name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(scenario: Scenario, world_size: int) -> dict[str, Any]:
    import fkv_compile
    from fkv_compile.models import build, make_inputs, rollout

    cfg = dataclasses.replace(scenario.cfg, sequence_parallel=world_size)
    model = build(cfg)
    inputs = make_inputs(scenario.cfg, batch=scenario.batch, chunks=scenario.chunks)
    options = {"plan": scenario.plan, "mode": scenario.mode, "lowering": "aot_eager", **dict(scenario.options)}
    if scenario.explicit:
        per, rank = cfg.rank_heads, dist.get_rank()
        options.update(process_group=dist.new_group(list(range(world_size))), head_range=(rank * per, (rank + 1) * per))
    compiled = torch.compile(model, backend="forcing_kv", options=options)
    try:
        outputs = rollout(compiled, cfg, inputs)
    except Exception as exc:  # what every rank raised is compared by the parent
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    report = fkv_compile.report(compiled, print_table=False)
    return {"error": None, "outputs": outputs, "report": report, "plan": fkv_compile.plan_of(compiled)}


def run_ranks(world_size: int, scenarios: list[Scenario], out: Path) -> dict[str, list[dict[str, Any]]]:
    """Run ``scenarios`` on ``world_size`` spawned ranks; per scenario, what each rank saved, by rank."""
    mp.spawn(_rank_main, args=(world_size, _free_port(), scenarios, str(out)), nprocs=world_size)
    return {s.name: [torch.load(out / f"{s.name}.rank{r}.pt", weights_only=False) for r in range(world_size)]
            for s in scenarios}
