"""Run time: what the rewritten ops do when the compiled model runs.

- :mod:`.dispatch`: torch or Triton for the compressed ops, chosen once per device and option;
- :mod:`.torch_ops`: the compressed ops in torch;
- :mod:`.ranges`: the keep rule as token ranges per head;
- :mod:`.select`: ``select`` mode (kept tokens of the dense window);
- :mod:`.store`: ``compact`` mode's per-layer KV store;
- :mod:`.profile`: ``profile`` mode's recording of attention mass;
- :mod:`.state`: a compiled model's session (sites, statistics, stores), owned by its compiled graphs.
"""
