"""Triton kernels behind the custom ops, and the choice between them and the torch path.

The kernels (:mod:`.attention`, :mod:`.similarity`, :mod:`.gather`) import Triton, an optional
dependency (``pip install 'fkv-compile[triton]'``); nothing here imports it before a kernel is
actually requested. ``auto`` runs Triton on CUDA tensors and torch on CPU; ``triton`` forces the
kernels, on CPU through the interpreter (``TRITON_INTERPRET=1`` set before the first import of
Triton), which is how the tests exercise them.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["KERNEL_CHOICES", "KERNELS_ENV", "KernelsError", "default_kernels", "use_triton", "interpreting"]

KERNEL_CHOICES: tuple[str, ...] = ("auto", "torch", "triton")
KERNELS_ENV = "FKV_KERNELS"
"""Environment variable giving the default of the backend option ``kernels``."""


class KernelsError(RuntimeError):
    """The requested kernels cannot run here."""


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (decided by the environment at Triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_kernels() -> str:
    """The ``kernels`` option's default: ``$FKV_KERNELS`` or ``auto``."""
    value = os.environ.get(KERNELS_ENV, "auto")
    if value not in KERNEL_CHOICES:
        raise KernelsError(f"{KERNELS_ENV}={value!r}: expected one of {KERNEL_CHOICES}")
    return value


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: ``use_triton`` runs on every op call."""
    return importlib.util.find_spec("triton") is not None


def use_triton(requested: str, device: torch.device) -> bool:
    """Whether an op on ``device`` runs the Triton kernels for the ``kernels`` choice ``requested``."""
    if requested == "torch":
        return False
    if requested == "auto":
        return device.type == "cuda" and _triton_installed()
    if requested != "triton":
        raise KernelsError(f"kernels expected one of {KERNEL_CHOICES}, got {requested!r}")
    if not _triton_installed():
        raise KernelsError("kernels='triton' needs Triton: pip install 'fkv-compile[triton]'")
    if device.type == "cpu" and not interpreting():
        raise KernelsError(
            "kernels='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before Python starts"
        )
    if device.type not in ("cpu", "cuda"):
        raise KernelsError(f"kernels='triton' runs on CUDA (or CPU via the interpreter), got device {device}")
    return True
