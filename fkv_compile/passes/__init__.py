"""Graph passes over the dynamo FX graph (torch-level IR) that a ``forcing_kv`` backend call receives.

Invariants every pass keeps:

- only attention nodes the matchers accept are touched; everything else stays exactly as traced,
  and every declined attention call gets a report row with its reason;
- a new node gets an ``example_value`` from its op's fake implementation;
- no new aliasing: the custom ops return fresh tensors and declare no mutation; ``compact``'s ops
  keep their order through data (roll tokens feed the attention op) and only release the dense
  cache storage of sites whose every cache access they replaced (see :mod:`.compact`);
- no dead-code elimination: ``eliminate_dead_code`` on a dynamo graph deletes in-place cache
  writes (``setitem``, ``fill_``), so the passes erase only the nodes they replace;
- no buffers owned by the backend inside the graph: run-time state lives in the session
  (:mod:`fkv_compile.modes.state`), reached through integer ids baked into the op calls.

The route through a compile (docs/walkthrough.md): :func:`.pipeline.run_passes` counts the compile for its frame
(:mod:`.limits`), finds the attention sites (:mod:`.attention`: the matchers; :mod:`.windows`: the cache windows;
:mod:`.sites`: what they find), checks the plan against their traced shapes (:mod:`.fit`), records the declined
calls, and rewrites each site by its mode's entry of :data:`.pipeline.REWRITES` (:mod:`.compact` proves which cache
accesses a store may own; :mod:`.rewrite` and :mod:`.replay` edit the graph).
"""

from __future__ import annotations

from .fit import PlanNeverAppliesWarning
from .limits import RecompileLimitWarning
from .pipeline import run_passes
from .replay import dropping_outputs
from .sites import SiteError

__all__ = ["SiteError", "RecompileLimitWarning", "PlanNeverAppliesWarning", "run_passes", "dropping_outputs"]
