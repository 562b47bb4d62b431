"""Triton kernels of the compressed ops (Triton only: which implementation runs is chosen in
:mod:`fkv_compile.modes.dispatch`).

- :mod:`.attention`: attention of each head over its own list of key-token ranges;
- :mod:`.similarity`: the keep rule's segment similarity;
- :mod:`.gather`: the compact store's commit (gather of chosen tokens);
- :mod:`.tuning`: autotuning with a persisted cache.

The kernel modules import Triton, an optional dependency (``pip install 'fkv-compile[triton]'``);
nothing here imports it. On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton's first import), which is how the tests exercise them.
"""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["interpreting", "triton_installed"]


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (decided by the environment at Triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_installed() -> bool:
    """Looked up once, without importing Triton."""
    return importlib.util.find_spec("triton") is not None
