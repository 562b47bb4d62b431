"""``@triton.autotune`` with its choices persisted to a JSON file, so a machine tunes each shape once.

Triton's autotuner keeps the best configuration per key (the kernel's ``key`` arguments plus the
dtypes of its tensor arguments) in memory only. :class:`TunedKernel` preloads that memory from
:class:`TuningCache` before the first launch and writes back what a launch tuned. Entries are
keyed by GPU name, Triton and torch versions, kernel name and the autotune key (head dim, dtype,
...), so one file serves several machines and upgrades never reuse stale choices.

Environment: ``FKV_TUNING_CACHE`` the file (default ``~/.cache/fkv_compile/tuning.json``),
``FKV_AUTOTUNE=0`` no tuning (each kernel runs its first configuration). Under the Triton
interpreter every kernel has a single configuration and nothing is benchmarked.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import triton

from . import interpreting

__all__ = ["TUNING_CACHE_ENV", "AUTOTUNE_ENV", "TuningCache", "TunedKernel", "tuning_enabled", "shared_cache",
           "fitting", "architecture", "FITS_PATH", "machine_signature", "cpu_bench"]

TUNING_CACHE_ENV = "FKV_TUNING_CACHE"
AUTOTUNE_ENV = "FKV_AUTOTUNE"
FORMAT = "fkv-compile-tuning/1"


def tuning_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def _default_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fkv_compile" / "tuning.json"


def machine_signature(device: torch.device) -> dict[str, str]:
    """What a tuned choice is only valid for: the GPU and the compiler versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "triton-interpreter"
    return {"device": name, "triton": triton.__version__, "torch": torch.__version__}


def _config_to_json(config: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def _config_from_json(data: dict[str, Any]) -> triton.Config:
    return triton.Config(dict(data["kwargs"]), num_warps=int(data["num_warps"]), num_stages=int(data["num_stages"]))


class TuningCache:
    """The tuned configurations in one JSON file (read once, merged and rewritten atomically on save).

    A file that is not valid JSON, or not in this format, is ignored with a warning and never
    overwritten (it may be someone else's file): tuning results then stay in memory.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else Path(os.environ.get(TUNING_CACHE_ENV) or _default_path())
        self._entries: list[dict[str, Any]] | None = None
        self._writable = True
        self._lock = threading.Lock()

    def _read(self) -> list[dict[str, Any]] | None:
        """The file's entries, ``[]`` when it does not exist, ``None`` (after a warning) when unusable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            warnings.warn(f"fkv tuning cache {self.path} is corrupt ({e}); ignoring it (delete it to re-tune)")
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            warnings.warn(f"fkv tuning cache {self.path} is not an {FORMAT} file; ignoring it and leaving it as is")
            return None
        return data["entries"]

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            if self._entries is None:
                read = self._read()
                self._writable = read is not None
                self._entries = read or []
            return self._entries

    def values(self, signature: dict[str, str], kernel: str) -> dict[tuple, dict[str, Any]]:
        """What was chosen for ``kernel`` on this machine, by key, as stored (a config's JSON form, or a contest's
        winner)."""
        found = {}
        for entry in self.entries():
            try:
                if entry["machine"] == signature and entry["kernel"] == kernel:
                    found[tuple(entry["key"])] = entry["config"]
            except (KeyError, TypeError) as e:
                warnings.warn(f"fkv tuning cache {self.path}: skipping a malformed entry ({e!r})")
        return found

    def lookup(self, signature: dict[str, str], kernel: str) -> dict[tuple, triton.Config]:
        """The tuned configs of ``kernel`` on this machine, by autotune key."""
        found = {}
        for key, value in self.values(signature, kernel).items():
            try:
                found[key] = _config_from_json(value)
            except (KeyError, TypeError, ValueError) as e:
                warnings.warn(f"fkv tuning cache {self.path}: skipping a malformed entry ({e!r})")
        return found

    def put(self, signature: dict[str, str], kernel: str, key: tuple, config: triton.Config | dict[str, Any]) -> None:
        """Remember ``config`` (a Triton config, or any JSON object) for ``kernel`` at ``key`` on this machine."""
        value = _config_to_json(config) if isinstance(config, triton.Config) else dict(config)
        entry = {"machine": signature, "kernel": kernel, "key": list(key), "config": value}
        entries = self.entries()
        with self._lock:
            entries[:] = [e for e in entries if (e.get("machine"), e.get("kernel"), e.get("key")) != (
                signature, kernel, list(key))] + [entry]
            if self._writable:
                self._save(entry)

    def _save(self, entry: dict[str, Any]) -> None:
        """Merge ``entry`` into the file as it is now (other processes may have written) and replace it."""
        on_disk = self._read()
        if on_disk is None:
            self._writable = False
            return
        merged = [e for e in on_disk if (e.get("machine"), e.get("kernel"), e.get("key")) != (
            entry["machine"], entry["kernel"], entry["key"])] + [entry]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "entries": merged}, indent=1))
        os.replace(tmp, self.path)


_SHARED: dict[Path, TuningCache] = {}


def shared_cache() -> TuningCache:
    """The process-wide cache at the path the environment names now."""
    cache = TuningCache()
    return _SHARED.setdefault(cache.path, cache)


def cpu_bench(kernel_call: Callable[[], Any], quantiles: Sequence[float]) -> list[float]:
    """Milliseconds of ``kernel_call`` on the interpreter (Triton's benchmarker needs a GPU driver)."""
    kernel_call()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]


FITS_PATH = Path(__file__).with_name("gpu_fits.json")
"""Per kernel, GPU architecture, dtype and head dim: the autotune configs that compile there without spilling a
register and within a block's shared memory, measured on a CPU by ``python -m fkv_compile.tools.gpu_static
--write-fits`` (docs/gpu_static.md)."""
ARCHITECTURES = {9: "sm_90a", 8: "sm_80", 10: "sm_100a"}  # compute capability major -> the target measured


def architecture(device: torch.device) -> str | None:
    """The measured target ``device`` compiles for (``None``: not a CUDA device, or an architecture not measured)."""
    if device.type != "cuda":
        return None
    return ARCHITECTURES.get(torch.cuda.get_device_capability(device)[0])


_FITS: dict[str, Any] | None = None


def fitting(kernel: str, configs: Sequence[triton.Config], target: str | None, dtype: torch.dtype,
            head_dim: int | None) -> list[triton.Config]:
    """``configs`` that can win an autotune on ``target`` at ``dtype`` and ``head_dim``, in the table's order (the
    kernel's; where every config spills, the least spilling first): the first is the default there. All of them
    where the table has no entry; none that runs there is an error that names the kernel."""
    global _FITS
    if _FITS is None:
        _FITS = json.loads(FITS_PATH.read_text()) if FITS_PATH.exists() else {}
    table = _FITS.get("kernels", {}).get(kernel, {}).get(target or "", {})
    measured = table.get(f"{str(dtype).removeprefix('torch.')}/{head_dim}")
    if measured is None:
        return list(configs)
    by_form = {json.dumps(_config_to_json(c), sort_keys=True): c for c in configs}
    kept = [by_form[form] for form in (json.dumps(m, sort_keys=True) for m in measured) if form in by_form]
    if not kept:
        raise RuntimeError(f"fkv kernel {kernel}: none of its {len(configs)} configs compiles for {target} at {dtype}, "
                           f"head dim {head_dim} without spills within shared memory ({FITS_PATH})")
    return kept


class TunedKernel:
    """A Triton kernel under ``@triton.autotune`` whose tuned choices go through a :class:`TuningCache`.

    ``configs[0]`` is the default: the only one under the interpreter or with ``FKV_AUTOTUNE=0``. On a GPU the list
    is first cut, per architecture, dtype and head dim, to the configs that can win there (:func:`fitting`): one that
    spills or asks for more shared memory than a block has would only be timed to lose, or fail to launch.
    """

    def __init__(self, name: str, fn: Any, configs: Sequence[triton.Config], key: list[str],
                 cache: TuningCache | None = None):
        if not configs:
            raise ValueError(f"kernel {name}: no configurations")
        self.name, self.fn, self.key = name, fn, key
        self.cache = cache
        self.configs = list(configs)
        self._tuners: dict[tuple, Any] = {}  # (architecture, dtype, head dim) -> its triton autotuner
        self._preloaded: set[tuple] = set()
        self.benchmarked = 0  # keys tuned by benchmarking in this process (tests check reuse)

    def autotuner(self, target: str | None, dtype: torch.dtype, head_dim: int | None) -> Any:
        """The autotuner over the configs that can win on ``target`` (all on the interpreter, where one runs)."""
        variant = (target, dtype, head_dim)
        if variant not in self._tuners:
            configs = fitting(self.name, self.configs, target, dtype, head_dim)
            self._tuners[variant] = triton.autotune(
                configs=configs if tuning_enabled() else configs[:1], key=self.key,
                do_bench=cpu_bench if interpreting() else None)(self.fn)
        return self._tuners[variant]

    def launch(self, grid: Callable[[dict[str, Any]], tuple[int, ...]], device: torch.device, *args: Any,
               **kwargs: Any) -> None:
        """Launch on ``device``; the first tensor argument's dtype and ``HEAD_DIM`` pick the configs that can win."""
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
        tuner = self.autotuner(architecture(device), dtype, kwargs.get("HEAD_DIM"))
        cache = self.cache or shared_cache()
        signature = machine_signature(device)
        if len(tuner.configs) > 1 and (signature["device"], id(tuner)) not in self._preloaded:
            tuner.cache.update(cache.lookup(signature, self.name))
            self._preloaded.add((signature["device"], id(tuner)))
        before = set(tuner.cache)
        tuner[grid](*args, **kwargs)
        for key in set(tuner.cache) - before:
            self.benchmarked += 1
            cache.put(signature, self.name, key, tuner.cache[key])
