"""What users run around the backend: the ``fkv`` CLI (:mod:`.cli`), equivalence checks for CI
(:mod:`.check`, :mod:`.testing`), plans from profiles (:mod:`.profiling`), benchmarks (:mod:`.bench`),
the quality harness and baseline policies (:mod:`.quality`, :mod:`.policies`), plots and progress bars.
"""
