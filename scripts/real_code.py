"""Run the pass on a pipeline's own public code and compare with the float64 oracle of the keep rule.

    python scripts/real_code.py --checkout DIR --pipeline krea [--mode select,compact] [--blocks 6]

The pipeline's model file(s) are copied at run time from a checkout of its public repository into a temporary
folder (never into this repository), next to shims for the heavy imports they make (named per pipeline below, with
every change made to the copy). A tiny configuration with random weights runs on the CPU (float32 by default), through
the pipeline's own cache handling, for two videos. The reference is the same rollout in float64 with every attention
over a KV cache replaced by the masked-dense oracle; the budget is twice the error of that oracle run in the dtype,
and the script checks that it lies several times below what compression changes (dense attention, each wrong kept
set). It prints the error and budget per video, the sites compressed and left alone with their reasons, the KV
bytes, and the graphs, recompiles and graph breaks. Results go to docs/real_code.md with the checkout's commit.

Pipelines:
- ``krea``: krea-ai/realtime-video (Krea Realtime 14B, Self Forcing on Wan 2.1): the server's streaming loop. Each
  block re-initialises the KV cache (``CausalInferencePipeline._initialize_kv_cache``, the repository's own function:
  it zeroes the buffers in place and sets the Python-int indices to 0), recomputes it from position 0 with one
  forward over the clean context frames (the first frame and the latest ``kv_cache_num_frames - 1``; a block-causal
  flex-attention mask), then denoises the block with the chunk written after that context. Changes to the copy:
  ``frame_seqlen = 1560`` (hard-coded for 480p) becomes the tiny frame's size, the module's ``flex_attention`` is
  the eager one (not compiled with max-autotune at import), ``sinusoidal_embedding_1d`` builds its table on the
  positions' device (not ``torch.cuda.current_device()``), and the SDPA fallbacks of ``attention()`` and of the
  cross-attention keep the inputs' dtype (they cast to bf16, which would make the float64 reference a bf16 one; in
  bf16 this changes nothing).
- ``self-forcing``: guandeh17/Self-Forcing: ``CausalInferencePipeline.inference`` itself (the repository's method,
  with its ``_initialize_kv_cache`` and ``_initialize_crossattn_cache``), called twice on one pipeline object as a
  server does: the first video allocates the caches, the second resets their indices and reuses the buffers. Shims:
  the generator (``WanDiffusionWrapper``: the model's flow prediction and ``x0 = x_t - sigma_t * flow``), the text
  encoder (random embeddings), the VAE (identity), the scheduler (:class:`_Scheduler`). Changes to the copy: the
  cross-attention's ``flash_attention`` (CUDA only) is the module's ``attention()`` (its SDPA fallback, keeping the
  inputs' dtype), the module's ``flex_attention`` is the eager one. The model has the 12 heads x 128 the pipeline's
  cache functions allocate.
- ``longlive-v1``: NVlabs/LongLive, branch v1.0: the same ``inference`` (with its
  ``_set_all_modules_max_attention_size``) at configs/longlive_inference.yaml's cache (a 12-frame window, a 3-frame
  sink); shims as for ``self-forcing`` plus ``utils.debug_option`` and ``utils.memory``. Change to the copy:
  ``max_local * 1560`` (hard-coded 480p) becomes the tiny frame's size.
- ``longlive-2``: NVlabs/LongLive, branch main (Wan 2.2 TI2V-5B): ``CausalDiffusionInferencePipeline.inference`` and
  its helpers, and ``WanDiffusionWrapper.forward`` / ``_call_model`` (which publishes the positions as Python ints
  before the compiled model runs), from the checkout, at configs/inference.yaml's cache (a 32-frame window, an
  8-frame sink kept as its global sink, 8-frame chunks, no CFG); the model is compiled as
  ``configure_torch_compile`` compiles it (``dynamic=False``). Shims: the UniPC sampler (:class:`_FlowEuler`), the
  text encoder, the training scheduler's sigmas (``t / 1000``), ``transformers``' ``x_clip_loss`` import,
  ``wan_default_config`` (the tiny heads). Its CUDA-only Triton RoPE and adaLN kernels are off through its own
  switches (``LLV2_TRITON_ROPE=0``, ``LLV2_TRITON_ADALN=0``). Changes to the copy: the cross-attention's
  ``flash_attention`` (CUDA only) is the module's ``attention()``, whose SDPA fallback keeps the inputs' dtype. It
  recompiles per chunk unless its position ints are marked dynamic (docs/patterns.md: the warning names them).
- ``causal-forcing``: thu-ml/Causal-Forcing: Self Forcing's model file and its own ``inference``, frame-wise as
  configs/causal_forcing_dmd_framewise_2step.yaml runs it (1-frame blocks, 2 steps, 4 for the first frame); the
  shims of ``self-forcing`` plus its ``tqdm`` progress bar (silent).
- ``rolling-forcing``: TencentARC/RollingForcing: ``CausalInferencePipeline.inference_rolling_forcing`` (rolling
  windows of as many blocks as denoising steps; after each window its first block, clean, is cached by a call with
  ``updating_cache=True``), with its ``_initialize_kv_cache`` and ``_initialize_crossattn_cache``, the shims of
  ``self-forcing``. Change to the copy: ``self.frame_length = 1560`` (hard-coded 480p) becomes the tiny frame's size.
- ``streamdiffusion-v2``: chenfengxu714/StreamDiffusionV2: ``CausalStreamInferencePipeline.prepare`` and
  ``inference_wo_batch`` with its cache functions, driven as streamv2v/inference_wo_batch.py drives them, each video a
  fresh stream (a new pipeline object, the model's eviction queues emptied), 12 blocks by default so that its ring
  buffer wraps (:func:`load_streamdiffusion_v2`). Shims: the generator (``CausalWanDiffusionWrapper``'s call), the
  text encoder, the scheduler; flash-attn absent, so its attention is its own SDPA fallback. Change to the copy: the
  SDPA fallback of ``wan_base/modules/attention.py`` keeps the inputs' dtype (it casts to its bf16 default, float32
  on a CPU).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.overrides import TorchFunctionMode

import fkv_compile
from fkv_compile import HeadPlan, semantics
from fkv_compile.bundled import PLANS, bundled_plan
from fkv_compile.tools.check import CONCLUSIVE, wrong_kept_sets
from fkv_compile.tools.testing import WriteStamps, error_budget, is_plain_sdpa, max_abs_error

DIFFUSERS_SHIM = {
    "diffusers/__init__.py": "",
    "diffusers/configuration_utils.py": '''
        def register_to_config(init):
            return init

        class ConfigMixin:
            pass
    ''',
    "diffusers/models/__init__.py": "",
    "diffusers/models/modeling_utils.py": '''
        import torch

        class ModelMixin(torch.nn.Module):
            pass
    ''',
}


@dataclass(frozen=True)
class Tiny:
    """The tiny configuration every pipeline is built at."""

    dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    ffn_dim: int = 128
    text_len: int = 16
    text_dim: int = 32
    freq_dim: int = 32
    latent_height: int = 8
    latent_width: int = 12
    chunk_frames: int = 3
    context_frames: int = 3  # krea: kv_cache_num_frames
    steps: tuple[int, ...] = (1000, 937, 833, 625)
    channels: int = 16  # latent channels (Wan 2.1's VAE; Wan 2.2's 5B model has 48)

    @property
    def frame_tokens(self) -> int:
        return (self.latent_height // 2) * (self.latent_width // 2)


@dataclass
class Loaded:
    """A pipeline's model and how to roll a video out with its own cache handling."""

    model: torch.nn.Module
    # (the module, what to call for it: itself, its compiled module or an oracle wrapper, noise, text) -> latents
    rollout: Callable[[torch.nn.Module, Callable[..., Any], list[torch.Tensor], torch.Tensor], list[torch.Tensor]]
    caches: Callable[[], list[dict]]  # the self-attention caches of the rollout running now
    heads: int  # attention heads per layer (the plan's)
    tiny: Tiny  # the configuration it was built at (a pipeline may change the chunk, the channels)
    grad_mode: Callable[[], Any] = torch.no_grad  # what the pipeline generates under
    dynamic: bool | None = None  # torch.compile's ``dynamic``, as the pipeline's own code compiles the model
    blocks: int = 6  # blocks (chunks) per video unless --blocks says otherwise: enough for its cache's every regime


def _write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _copy(checkout: Path, root: Path, names: list[str], edits: dict[str, list[tuple[str, str]]]) -> None:
    """Copy ``names`` from the checkout into ``root``, applying the listed ``(old, new)`` edits (each must match)."""
    for name in names:
        if not (checkout / name).is_file():
            raise SystemExit(f"real_code: {checkout} has no {name}: not a checkout of this pipeline's repository")
        text = (checkout / name).read_text()
        for old, new in edits.get(name, []):
            if old not in text:
                raise SystemExit(f"real_code: {name} of this checkout no longer contains {old!r}: update the shim")
            text = text.replace(old, new)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _function(checkout: Path, path: str, qualname: str, **names: Any) -> Callable[..., Any]:
    """A function of the checkout's ``path`` (``Class.method``), compiled alone with ``torch`` and ``names`` as its
    globals: the file's own imports are not run."""
    tree = ast.parse((checkout / path).read_text())
    cls, _, name = qualname.partition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    namespace: dict[str, Any] = {"torch": torch, **names}
                    exec(compile(ast.Module([item], []), f"{path}:{qualname}", "exec"), namespace)
                    return namespace[name]
    raise SystemExit(f"real_code: {path} has no {qualname}")


def load_krea(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    files = ["wan/modules/attention.py", "wan/modules/sage.py", "wan/modules/model.py", "wan/modules/causal_model.py"]
    _copy(checkout, root, files, {
        "wan/modules/causal_model.py": [("frame_seqlen = 1560", f"frame_seqlen = {tiny.frame_tokens}")],
        "wan/modules/model.py": [("device=torch.cuda.current_device()", "device=position.device"),
                                 ("dtype = torch.bfloat16", "dtype = q.dtype")],
        "wan/modules/attention.py": [("        q = q.transpose(1, 2).to(dtype)\n        k = k.transpose(1, 2).to(dtype)\n"
                                      "        v = v.transpose(1, 2).to(dtype)\n\n        out = torch.nn.functional",
                                      "        q = q.transpose(1, 2)\n        k = k.transpose(1, 2)\n"
                                      "        v = v.transpose(1, 2)\n\n        out = torch.nn.functional")],
    })
    _write_files(root, {"wan/__init__.py": "", "wan/modules/__init__.py": "", **DIFFUSERS_SHIM})
    os.environ["DISABLE_SAGEATTENTION"] = "1"
    sys.path.insert(0, str(root))
    causal = importlib.import_module("wan.modules.causal_model")
    causal.flex_attention = flex_attention
    torch.manual_seed(0)
    model = causal.CausalWanModel(dim=tiny.dim, ffn_dim=tiny.ffn_dim, num_heads=tiny.num_heads,
                                  num_layers=tiny.num_layers, text_len=tiny.text_len, text_dim=tiny.text_dim,
                                  freq_dim=tiny.freq_dim)
    model = randomize(model).to(dtype).eval()
    init_kv = _function(checkout, "pipeline/causal_inference.py", "CausalInferencePipeline._initialize_kv_cache")
    init_cross = _function(checkout, "pipeline/causal_inference.py",
                           "CausalInferencePipeline._initialize_crossattn_cache")

    class Pipeline:  # the attributes the repository's two cache functions read
        def __init__(self, generator: torch.nn.Module):
            self.generator = type("Generator", (), {"model": generator})()
            generator.config = type("Config", (), {"num_heads": tiny.num_heads, "dim": tiny.dim})()
            self.num_transformer_blocks = tiny.num_layers
            self.frame_seq_length = tiny.frame_tokens
            self.local_attn_size = tiny.context_frames + tiny.chunk_frames  # as release_server.init_models sets it
            self.kv_cache1 = None

    state: dict[str, Any] = {}

    def rollout(model: torch.nn.Module, compiled: Callable[..., Any], noise: list[torch.Tensor],
                text: torch.Tensor) -> list[torch.Tensor]:
        """release_server's loop: per block the cache re-initialised and recomputed over the clean context frames
        (keep_first_frame: the first latent frame, not re-encoded through the VAE), then the denoising steps."""
        pipe = Pipeline(model)
        state["pipe"] = pipe
        b = text.shape[0]
        init_kv(pipe, batch_size=b, dtype=noise[0].dtype, device="cpu")
        init_cross(pipe, batch_size=b, dtype=noise[0].dtype, device="cpu")
        context = [t for t in text]
        seq_len = (tiny.context_frames + tiny.chunk_frames) * tiny.frame_tokens
        latents: list[torch.Tensor] = []  # [B, F, C, H, W] per block
        out = []
        for block, x in enumerate(noise):
            start_frame = 0
            if latents:
                frames = torch.cat(latents, 1)
                clean = torch.cat((frames[:, :1], frames[:, 1:][:, -tiny.context_frames + 1:]), 1)
                init_kv(pipe, batch_size=b, dtype=x.dtype, device="cpu")
                model.block_mask = model._prepare_blockwise_causal_attn_mask(
                    device="cpu", num_frames=clean.shape[1], frame_seqlen=tiny.frame_tokens,
                    num_frame_per_block=tiny.chunk_frames, local_attn_size=-1)
                zero = torch.zeros((b, clean.shape[1]), dtype=torch.int64)
                start_frame = min(frames.shape[1], tiny.context_frames)
                compiled(clean.transpose(1, 2), zero, context, seq_len, kv_cache=pipe.kv_cache1,
                         crossattn_cache=pipe.crossattn_cache, current_start=start_frame * tiny.frame_tokens)
                model.block_mask = None
            noisy = x
            for i, t in enumerate(tiny.steps):
                tt = torch.full((b, x.shape[1]), t, dtype=torch.int64)
                flow = compiled(noisy.transpose(1, 2), tt, context, seq_len, kv_cache=pipe.kv_cache1,
                                crossattn_cache=pipe.crossattn_cache,
                                current_start=start_frame * tiny.frame_tokens).transpose(1, 2)
                sigma = t / 1000
                x0 = noisy - sigma * flow
                nxt = tiny.steps[i + 1] / 1000 if i + 1 < len(tiny.steps) else 0.0
                noisy = (1 - nxt) * x0 + nxt * x
            latents.append(noisy)
            out.append(noisy)
        return out

    # release_server.generate_block_internal runs under torch.inference_mode(): caches without version counters
    return Loaded(model, rollout, lambda: state["pipe"].kv_cache1, tiny.num_heads, tiny, torch.inference_mode)


class _Scheduler:
    """Stands in for the pipeline's flow-matching scheduler: ``add_noise(x0, noise, t) = (1 - t/1000) x0 + t/1000 n``,
    with ``n`` the script's own noise for the call's index (drawn in float64, so that every dtype's run adds the same;
    the pipeline's ``torch.randn_like`` argument is not used)."""

    def __init__(self) -> None:
        self.calls = 0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        fresh = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0.dtype)
        sigma = (t.to(torch.float64) / 1000).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return (1 - sigma) * x0 + sigma * fresh


def _load_wan_inference(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype, *, edits: dict,
                        shims: dict[str, str], model_kwargs: dict[str, Any], methods: tuple[str, ...],
                        attributes: dict[str, Any], source: str = "pipeline/causal_inference.py",
                        entry: str = "inference", cache_attribute: str = "kv_cache1") -> Loaded:
    """A Self Forcing-family pipeline whose ``CausalInferencePipeline.<entry>`` (with ``methods``, all from the
    checkout's ``source``) runs the model: the generator, text encoder, VAE and scheduler are shims, the pipeline
    object keeps ``attributes`` and lives across videos as a server keeps it; its self-attention caches are
    ``cache_attribute``."""
    files = ["wan/modules/attention.py", "wan/modules/model.py", "wan/modules/causal_model.py"]
    _copy(checkout, root, files, {
        "wan/modules/attention.py": [("        q = q.transpose(1, 2).to(dtype)\n        k = k.transpose(1, 2).to(dtype)\n"
                                      "        v = v.transpose(1, 2).to(dtype)\n",
                                      "        q = q.transpose(1, 2)\n        k = k.transpose(1, 2)\n"
                                      "        v = v.transpose(1, 2)\n")],
        "wan/modules/model.py": [("from .attention import flash_attention",
                                  "from .attention import attention as flash_attention")],
        **edits,
    })
    _write_files(root, {"wan/__init__.py": "", "wan/modules/__init__.py": "", **DIFFUSERS_SHIM, **shims})
    sys.path.insert(0, str(root))
    causal = importlib.import_module("wan.modules.causal_model")
    causal.flex_attention = flex_attention
    # the pipelines' own cache functions allocate 12 heads x 128: the model has them, at a tiny width otherwise
    heads, head_dim = 12, 128
    torch.manual_seed(0)  # the model's own initialisation (its modulations) draws from the global generator
    model = causal.CausalWanModel(dim=heads * head_dim, ffn_dim=tiny.ffn_dim, num_heads=heads,
                                  num_layers=tiny.num_layers, text_len=tiny.text_len, text_dim=tiny.text_dim,
                                  freq_dim=tiny.freq_dim, **model_kwargs)
    model = randomize(model).to(dtype).eval()
    quiet = types.SimpleNamespace(tqdm=lambda steps, *args, **kwargs: steps)  # Causal Forcing's progress bar
    bound = {name: _function(checkout, source, f"CausalInferencePipeline.{name}", List=list, Optional=None,
                             gpu=torch.device("cpu"), tqdm=quiet, time=time)
             for name in (entry, *methods)}
    seq_len = 21 * tiny.frame_tokens

    class Generator:
        """WanDiffusionWrapper's call: the flow prediction and ``x0 = x_t - sigma_t * flow``."""

        def __init__(self, call: Callable[..., Any]):
            self.call, self.model = call, model

        def __call__(self, noisy_image_or_video, conditional_dict, timestep, kv_cache, crossattn_cache, current_start,
                     cache_start=None, **extra):  # Rolling Forcing: updating_cache
            # cache_start=None as the wrapper passes it (the model's own default is 0; the attention reads None as
            # current_start)
            flow = self.call(noisy_image_or_video.transpose(1, 2), timestep, list(conditional_dict["prompt_embeds"]),
                             seq_len, kv_cache=kv_cache, crossattn_cache=crossattn_cache,
                             current_start=current_start, cache_start=cache_start, **extra).transpose(1, 2)
            sigma = (timestep.to(torch.float64) / 1000).to(flow.dtype)[..., None, None, None]
            return flow, noisy_image_or_video - sigma * flow

    class Pipeline:  # CausalInferencePipeline's attributes, its methods from the checkout, shims for the rest
        locals().update({name: fn for name, fn in bound.items() if name != entry})

        def __init__(self, call: Callable[..., Any], text: torch.Tensor):
            self.generator, self.text = Generator(call), text
            self.num_transformer_blocks, self.frame_seq_length = tiny.num_layers, tiny.frame_tokens
            self.num_frame_per_block, self.independent_first_frame = tiny.chunk_frames, False
            self.denoising_step_list = torch.tensor(tiny.steps, dtype=torch.long)
            self.scheduler = _Scheduler()
            self.vae = type("Vae", (), {"decode_to_pixel": staticmethod(lambda latents, use_cache=False: latents)})()
            setattr(self, cache_attribute, None)
            self.__dict__.update(attributes)

        def text_encoder(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"prompt_embeds": self.text}

    pipes: dict[int, Pipeline] = {}  # one pipeline object per model call, across videos, as a server keeps it
    state: dict[str, Any] = {}

    def rollout(model: torch.nn.Module, call: Callable[..., Any], noise: list[torch.Tensor],
                text: torch.Tensor) -> list[torch.Tensor]:
        pipe = pipes.setdefault(id(call), Pipeline(call, text))
        pipe.text, pipe.scheduler.calls = text, 0
        state["pipe"] = pipe
        _, latents = bound[entry](pipe, torch.cat(noise, 1), [""], return_latents=True)
        return list(latents.split(tiny.chunk_frames, dim=1))

    return Loaded(model, rollout, lambda: getattr(state["pipe"], cache_attribute), heads, tiny)


def load_self_forcing(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    return _load_wan_inference(checkout, root, tiny, dtype, edits={}, shims={}, model_kwargs={},
                               methods=("_initialize_kv_cache", "_initialize_crossattn_cache"),
                               attributes={"local_attn_size": -1,
                                           "args": type("Args", (), {"context_noise": 0})()})


def load_longlive(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    window, sink = 12, 3  # configs/longlive_inference.yaml: local_attn_size 12, sink_size 3
    args = type("Args", (), {"context_noise": 0,
                             "model_kwargs": type("ModelKwargs", (), {"local_attn_size": window})()})()
    return _load_wan_inference(
        checkout, root, tiny, dtype,
        edits={"wan/modules/causal_model.py": [("max_local * 1560", f"max_local * {tiny.frame_tokens}")]},
        shims={"utils/__init__.py": "", "utils/debug_option.py": "DEBUG = False\n",
               "utils/memory.py": '''
                   import torch
                   gpu = torch.device("cpu")
                   def get_cuda_free_memory_gb(device=None): return 0.0
                   def log_gpu_memory(*args, **kwargs): pass
                   class DynamicSwapInstaller: pass
               '''},
        model_kwargs={"local_attn_size": window, "sink_size": sink},
        methods=("_initialize_kv_cache", "_initialize_crossattn_cache", "_set_all_modules_max_attention_size"),
        attributes={"local_attn_size": window, "args": args})


class _FlowEuler:
    """Stands in for the pipeline's UniPC sampler: ``tiny.steps`` as timesteps, each step the deterministic flow
    update ``x + (sigma_next - sigma) * flow`` with ``sigma = t / 1000``."""

    def __init__(self, steps: tuple[int, ...]):
        self.timesteps = torch.tensor(steps, dtype=torch.float32)
        self.sigmas = [t / 1000 for t in steps] + [0.0]
        self.index = 0

    def step(self, flow: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, return_dict: bool = False):
        sigma, following = self.sigmas[self.index], self.sigmas[self.index + 1]
        self.index += 1
        return (latents + (following - sigma) * flow,)


def load_longlive2(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    """LongLive 2.0 (Wan 2.2 TI2V-5B): ``CausalDiffusionInferencePipeline.inference`` and its helpers, and
    ``WanDiffusionWrapper.forward``/``_call_model`` (which publishes the cache positions as Python ints before the
    compiled model runs), all from the checkout; configs/inference.yaml's cache (a 32-frame window, an 8-frame sink
    kept as the global sink, 8-frame chunks, 4 steps, no CFG)."""
    window, sink, chunk = 32, 8, 8
    tiny = dataclasses.replace(tiny, chunk_frames=chunk, channels=48)
    files = ["wan_5b/modules/attention.py", "wan_5b/modules/model.py", "wan_5b/modules/causal_model.py",
             "utils/position_embedding_utils.py", "utils/prompt_conditioning.py"]
    _copy(checkout, root, files, {
        "wan_5b/modules/attention.py": [("        q = q.transpose(1, 2).to(dtype)\n        k = k.transpose(1, 2).to(dtype)\n"
                                         "        v = v.transpose(1, 2).to(dtype)\n",
                                         "        q = q.transpose(1, 2)\n        k = k.transpose(1, 2)\n"
                                         "        v = v.transpose(1, 2)\n")],
        "wan_5b/modules/model.py": [("from .attention import flash_attention",
                                     "from .attention import attention as flash_attention")],
    })
    _write_files(root, {"wan_5b/__init__.py": "", "wan_5b/modules/__init__.py": "", "utils/__init__.py": "",
                        "transformers/__init__.py": "", "transformers/models/__init__.py": "",
                        "transformers/models/x_clip/__init__.py": "",
                        "transformers/models/x_clip/modeling_x_clip.py": "x_clip_loss = None\n", **DIFFUSERS_SHIM})
    os.environ["LLV2_TRITON_ROPE"] = os.environ["LLV2_TRITON_ADALN"] = "0"  # CUDA-only kernels: their own fallbacks
    sys.path.insert(0, str(root))
    causal = importlib.import_module("wan_5b.modules.causal_model")
    causal.flex_attention = flex_attention
    conditioning = importlib.import_module("utils.prompt_conditioning")
    torch.manual_seed(0)
    model = causal.CausalWanModel(model_type="ti2v", in_dim=tiny.channels, out_dim=tiny.channels, dim=tiny.dim,
                                  ffn_dim=tiny.ffn_dim, num_heads=tiny.num_heads, num_layers=tiny.num_layers,
                                  text_len=tiny.text_len, text_dim=tiny.text_dim, freq_dim=tiny.freq_dim,
                                  local_attn_size=window, sink_size=sink, num_frame_per_block=chunk)
    model = randomize(model).to(dtype).eval()
    names = {"os": os, "tqdm": lambda steps: steps, "encode_prompt_blocks": conditioning.encode_prompt_blocks,
             "wan_default_config": {"Wan2.2-TI2V-5B": {"num_heads": tiny.num_heads,
                                                       "head_dim": tiny.dim // tiny.num_heads}},
             "_LLV2_TIME": False, "_LLV2_PROFILE_SPEC": "", "_LLV2_PROFILE_OUTPUT_DIR": "",
             "_LLV2_PROFILE_CALL_COUNTER": 0, "_LLV2_DUMP_LATENT_DIR": "", "List": list, "Optional": None}
    source = "pipeline/causal_diffusion_inference.py"
    methods = ("inference", "_inference_inner", "_initialize_kv_cache", "_initialize_crossattn_cache",
               "_set_all_modules_max_attention_size", "_set_all_modules_sink_size",
               "_set_all_modules_global_sink_size", "_is_shot_boundary", "_is_scene_cut", "_pin_current_chunk",
               "_zero_kv_data", "_dit_model")
    pipeline_methods = {name: _function(checkout, source, f"CausalDiffusionInferencePipeline.{name}", **names)
                        for name in methods}
    wrapper_methods = {name: _function(checkout, "utils/wan_5b_wrapper.py", f"WanDiffusionWrapper.{name}", **names)
                       for name in ("forward", "_call_model", "_convert_flow_pred_to_x0")}

    class Wrapper:  # WanDiffusionWrapper's call path from the checkout; the training scheduler's sigma = t / 1000
        locals().update(wrapper_methods)
        __call__ = wrapper_methods["forward"]

        def __init__(self, call: Callable[..., Any]):
            self.model, self._compiled_model_call = model, call
            self.uniform_timestep, self.seq_len = False, 21 * tiny.frame_tokens
            steps = torch.arange(1000, -1, -1, dtype=torch.float64)
            self.scheduler = type("Scheduler", (), {"timesteps": steps, "sigmas": steps / 1000})()

    class Pipeline:  # CausalDiffusionInferencePipeline's attributes at configs/inference.yaml, its methods
        locals().update(pipeline_methods)

        def __init__(self, call: Callable[..., Any], text: torch.Tensor):
            self.generator, self.text = Wrapper(call), text
            self.model_name, self.num_transformer_blocks = "Wan2.2-TI2V-5B", tiny.num_layers
            self.frame_seq_length, self.num_frame_per_block = tiny.frame_tokens, chunk
            self.local_attn_size, self.sink_size, self.multi_shot_sink = window, sink, True
            self.global_sink_size, self.multi_shot_rope_offset, self.shot_clean_recache = sink, 8, False
            self.scene_cut_prefix, self.guidance_scale, self.negative_prompt = "[scene cut]", 1.0, ""
            self.quantize_kv, self.independent_first_frame, self.kv_quant_config = False, False, None
            self.streaming_vae = self.async_vae = self.use_relative_rope = False
            self.vae_device = self.inference_t_scale = None
            self._rope_method_override = self._original_seq_len_override = None
            self.kv_cache_pos = self.kv_cache_neg = self.crossattn_cache_pos = self.crossattn_cache_neg = None

        def text_encoder(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"prompt_embeds": self.text.expand(len(text_prompts), -1, -1)}

        def _initialize_sample_scheduler(self, noise: torch.Tensor) -> _FlowEuler:
            return _FlowEuler(tiny.steps)

    pipes: dict[int, Pipeline] = {}  # one pipeline object per model call, across videos, as a server keeps it
    state: dict[str, Any] = {}

    def rollout(model: torch.nn.Module, call: Callable[..., Any], noise: list[torch.Tensor],
                text: torch.Tensor) -> list[torch.Tensor]:
        pipe = pipes.setdefault(id(call), Pipeline(call, text))
        pipe.text = text
        state["pipe"] = pipe
        latents = pipe.inference(torch.cat(noise, 1), [[""] * len(noise)], return_latents=True)
        return list(latents.split(chunk, dim=1))

    # WanDiffusionWrapper.configure_torch_compile's default: dynamic=False
    return Loaded(model, rollout, lambda: state["pipe"].kv_cache_pos, tiny.num_heads, tiny, dynamic=False)


def load_causal_forcing(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    """thu-ml/Causal-Forcing: Self Forcing's model file and ``inference``, frame-wise as its
    configs/causal_forcing_dmd_framewise_2step.yaml runs it: 1-frame blocks, 2 denoising steps per frame and 4 for
    the first (``denoising_step_list_first_chunk``)."""
    tiny = dataclasses.replace(tiny, chunk_frames=1)
    steps = torch.tensor(tiny.steps, dtype=torch.long)
    return _load_wan_inference(checkout, root, tiny, dtype, edits={}, shims={}, model_kwargs={},
                               methods=("_initialize_kv_cache", "_initialize_crossattn_cache"),
                               attributes={"local_attn_size": -1, "args": type("Args", (), {"context_noise": 0})(),
                                           "denoising_step_list": steps[::2], "denoising_step_list_first_chunk": steps})


def load_rolling_forcing(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    """TencentARC/RollingForcing: ``CausalInferencePipeline.inference_rolling_forcing`` from the checkout (a rolling
    window of as many blocks as denoising steps, each block one step further; the window's first block, clean, cached
    by a pass with ``updating_cache=True``); its cache stores the first block un-rotated and re-rotates it as an
    anchor in front of the working cache at every call."""
    return _load_wan_inference(
        checkout, root, tiny, dtype,
        edits={"wan/modules/causal_model.py": [("self.frame_length = 1560",
                                                f"self.frame_length = {tiny.frame_tokens}")]},
        shims={"utils/__init__.py": "", "utils/wan_wrapper.py": "WanDiffusionWrapper = WanTextEncoder = "
                                                                 "WanVAEWrapper = None\n"},
        model_kwargs={}, methods=("_initialize_kv_cache", "_initialize_crossattn_cache"),
        attributes={"args": type("Args", (), {"context_noise": 0})()},
        source="pipeline/rolling_forcing_inference.py", entry="inference_rolling_forcing",
        cache_attribute="kv_cache_clean")


def load_streamdiffusion_v2(checkout: Path, root: Path, tiny: Tiny, dtype: torch.dtype) -> Loaded:
    """chenfengxu714/StreamDiffusionV2: ``CausalStreamInferencePipeline.prepare`` (``batch_denoise=False``) and
    ``inference_wo_batch`` from the checkout, driven as streamv2v/inference_wo_batch.py's ``run_inference`` drives them
    (a first call of two latent frames, then one frame per call, the position reset at frame 50), at
    configs/wan_causal_dmd_v2v_fast.yaml's cache: 5 frames, a 2-frame sink, 1-frame blocks, the steps 700, 500, 400,
    200. Once full, the cache is a ring: a new frame overwrites the slot its model's eviction queue names, and
    attention reads the whole buffer in slot order. (configs/wan_causal_dmd_v2v.yaml also refreshes a sink frame when
    its cosine similarity to the new frame falls below 0.2; under random weights those similarities sit near 0.2, so
    a difference of 1e-6 flips the decision and no comparison can be budgeted.)"""
    tiny = dataclasses.replace(tiny, chunk_frames=1, steps=(700, 500, 400, 200))
    files = ["models/wan/causal_model.py", "models/wan/wan_base/modules/attention.py",
             "models/wan/wan_base/modules/model.py"]
    _copy(checkout, root, files, {
        # its SDPA fallback casts to its bf16 default (to float32 on a CPU): keep the inputs' dtype
        "models/wan/wan_base/modules/attention.py": [("def _prepare_sdpa_inputs(q, k, v, dtype):\n",
                                                      "def _prepare_sdpa_inputs(q, k, v, dtype):\n"
                                                      "    dtype = q.dtype\n")],
    })
    _write_files(root, {"models/__init__.py": "", "models/wan/__init__.py": "", "models/wan/wan_base/__init__.py": "",
                        "models/wan/wan_base/modules/__init__.py": "", **DIFFUSERS_SHIM})
    sys.path.insert(0, str(root))
    causal = importlib.import_module("models.wan.causal_model")
    causal.flex_attention = flex_attention  # not compiled with max-autotune at import
    heads, head_dim = 12, 128  # what its _initialize_kv_cache allocates
    torch.manual_seed(0)
    model = causal.CausalWanModel(dim=heads * head_dim, ffn_dim=tiny.ffn_dim, num_heads=heads,
                                  num_layers=tiny.num_layers, text_len=tiny.text_len, text_dim=tiny.text_dim,
                                  freq_dim=tiny.freq_dim)
    model = randomize(model).to(dtype).eval()
    source = "models/wan/causal_stream_inference.py"
    bound = {name: _function(checkout, source, f"CausalStreamInferencePipeline.{name}", List=list,
                             dist=torch.distributed)
             for name in ("prepare", "inference_wo_batch", "_initialize_kv_cache", "_initialize_crossattn_cache")}
    seq_len = 21 * tiny.frame_tokens
    frames, sink, threshold, refresh = 5, 2, -1, 50  # num_kv_cache, num_sink_tokens, adapt_sink_threshold, t_refresh

    class Generator:
        """CausalWanDiffusionWrapper's call: the flow prediction per frame's timestep, ``x0 = x_t - sigma_t * flow``."""

        def __init__(self, call: Callable[..., Any], model: torch.nn.Module):
            self.call, self.model = call, model  # its _initialize_kv_cache sets the sink on self.model's blocks

        def __call__(self, noisy_image_or_video, conditional_dict, timestep, kv_cache, crossattn_cache, current_start,
                     current_end):
            flow = self.call(noisy_image_or_video.permute(0, 2, 1, 3, 4), t=timestep,
                             context=conditional_dict["prompt_embeds"], seq_len=seq_len, kv_cache=kv_cache,
                             crossattn_cache=crossattn_cache, current_start=current_start,
                             current_end=current_end).permute(0, 2, 1, 3, 4)
            sigma = (timestep.to(torch.float64) / 1000).to(flow.dtype)[..., None, None, None]
            return noisy_image_or_video - sigma * flow

    class Pipeline:  # CausalStreamInferencePipeline's attributes, its methods from the checkout, shims for the rest
        locals().update(bound)

        def __init__(self, call: Callable[..., Any], model: torch.nn.Module, text: torch.Tensor):
            self.generator, self.text, self.device = Generator(call, model), text, "cpu"
            self.num_transformer_blocks, self.num_heads, self.frame_seq_length = tiny.num_layers, heads, \
                tiny.frame_tokens
            self.num_kv_cache, self.kv_cache_length = frames, frames * tiny.frame_tokens
            self.num_sink_tokens, self.adapt_sink_threshold = sink, threshold
            self.num_frame_per_block, self.kv_cache1, self.conditional_dict = 1, None, None
            self.denoising_step_list = torch.tensor(tiny.steps, dtype=torch.long)
            self.scheduler = _Scheduler()

        def text_encoder(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"prompt_embeds": self.text}

    state: dict[str, Any] = {}

    def rollout(model: torch.nn.Module, call: Callable[..., Any], noise: list[torch.Tensor],
                text: torch.Tensor) -> list[torch.Tensor]:
        """One stream from a fresh start: a new pipeline object and the model's eviction queues emptied (a second
        stream on the same objects would start inside the first one's ring, whose queue may name a slot before the
        first chunk's two frames: its own code then fails on the empty slice)."""
        for block in model.blocks:
            block.self_attn.evict_idx = None
        pipe = state["pipe"] = Pipeline(call, model, text)
        frame = tiny.frame_tokens
        start, end = 0, 2 * frame  # the first chunk: 1 + chunk_size // 4 latent frames
        out = [pipe.prepare(text_prompts=[""], device="cpu", dtype=noise[0].dtype, noise=torch.cat(noise[:2], 1),
                            current_start=start, current_end=end, batch_denoise=False)]
        for x in noise[2:]:
            start, end = end, end + frame
            if start // frame >= refresh:
                start = pipe.kv_cache_length - frame
                end = start + frame
            out.append(pipe.inference_wo_batch(noise=x, current_start=start, current_end=end,
                                               current_step=tiny.steps[0]))
        return out

    return Loaded(model, rollout, lambda: state["pipe"].kv_cache1, heads, tiny, blocks=12)


PIPELINES: dict[str, Callable[[Path, Path, Tiny, torch.dtype], Loaded]] = {
    "krea": load_krea, "self-forcing": load_self_forcing, "longlive-v1": load_longlive, "longlive-2": load_longlive2,
    "rolling-forcing": load_rolling_forcing, "causal-forcing": load_causal_forcing,
    "streamdiffusion-v2": load_streamdiffusion_v2}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere a trained model has them (releases zero-initialise output layers and biases, which
    would make the output independent of the attention): every Linear and Conv weight ~ N(0, 1/fan_in), biases
    ~ N(0, 0.02^2); other parameters (norms, modulations) as the model made them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.02)
    return model


def _plan(name: str, tiny: Tiny, heads: int) -> HeadPlan:
    """``mixed``: static, dynamic and dense heads in every layer (heads cycle through the roles with the layer);
    ``compressed``: static and dynamic heads alternating (no dense head: what the bundled plans are); otherwise the bundled plan ``name``'s first ``tiny.num_layers`` layers at the tiny geometry."""
    if name in ("mixed", "compressed"):
        roles = ["static", "dynamic", "dense"] if name == "mixed" else ["static", "dynamic"]
        return HeadPlan.from_roles([[roles[(layer + h) % len(roles)] for h in range(heads)]
                                    for layer in range(tiny.num_layers)],
                                   frame_tokens=tiny.frame_tokens, chunk_frames=tiny.chunk_frames)
    plan = bundled_plan(name, frame_tokens=tiny.frame_tokens, chunk_frames=tiny.chunk_frames)
    if plan.num_heads != heads or plan.num_layers < tiny.num_layers:
        raise SystemExit(f"real_code: plan {name!r} has {plan.num_layers} layers x {plan.num_heads} heads; this "
                         f"pipeline's tiny model has {tiny.num_layers} x {heads}")
    return dataclasses.replace(plan, roles=plan.roles[:tiny.num_layers])


def _inputs(tiny: Tiny, blocks: int, seed: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(1, tiny.chunk_frames, tiny.channels, tiny.latent_height, tiny.latent_width, generator=gen)
             for _ in range(blocks)]
    text = torch.randn(1, tiny.text_len, tiny.text_dim, generator=gen)
    return [n.to(dtype) for n in noise], text.to(dtype)


def _run(loaded: Loaded, model: torch.nn.Module, inputs: tuple[list[torch.Tensor], torch.Tensor],
         call: Callable[..., Any] | None = None) -> list[torch.Tensor]:
    """One video of ``model``, called through ``call`` (its compiled module, an oracle wrapper; default itself), under
    the pipeline's grad mode."""
    with loaded.grad_mode():
        return loaded.rollout(model, call if call is not None else model, *inputs)


class _LayerOrderOracle(TorchFunctionMode):
    """Every self-attention SDPA call of one model call replaced by the masked-dense oracle, the i-th call being layer
    i. The pipelines' keys are not always views of their cache (LongLive v1 attends over ``cat`` of slices of a
    per-layer clone), so the layer is told by the order of the calls; cross-attention, whose keys have the text's
    length, runs unchanged.

    A call whose keys are a window not written front to back (StreamDiffusionV2's ring, once full: see
    :class:`~fkv_compile.tools.testing.WriteStamps`) runs dense, which is what the pass promises there."""

    def __init__(self, plan: HeadPlan, text_len: int, stamps: WriteStamps):
        super().__init__()
        self.plan, self.text_len, self.calls, self.stamps = plan, text_len, 0, stamps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__setitem__:
            self.stamps.stamp(*args[:2])
        elif (func is F.scaled_dot_product_attention and is_plain_sdpa(args, kwargs)
                and args[1].shape[-2] != self.text_len):
            layer, self.calls = self.calls % self.plan.num_layers, self.calls + 1
            if not self.stamps.in_written_order(args[1]):
                return func(*args, **kwargs)
            return semantics.oracle_attention(*args[:3], self.plan, layer, scale=kwargs.get("scale"))
        return func(*args, **kwargs)


def _oracle_rollout(loaded: Loaded, model: torch.nn.Module, inputs, plan: HeadPlan) -> list[torch.Tensor]:
    """The rollout with the oracle installed around every model call."""
    text_len = inputs[1].shape[1]
    stamps = WriteStamps(lambda: [c[n] for c in loaded.caches() or () for n in "kv"])  # the pipeline's own caches

    def oracle_model(*args, **kwargs):
        with _LayerOrderOracle(plan, text_len, stamps):
            return model(*args, **kwargs)

    return _run(loaded, model, inputs, oracle_model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", required=True, type=Path, help="a checkout of the pipeline's public repository")
    parser.add_argument("--pipeline", required=True, choices=sorted(PIPELINES))
    parser.add_argument("--mode", default="select,compact", help="comma-separated modes to run")
    parser.add_argument("--blocks", type=int, default=None,
                        help="blocks (chunks) per video (default: the pipeline's, 6 unless its cache needs more)")
    parser.add_argument("--plan", default="mixed", choices=["mixed", "compressed", *sorted(PLANS)],
                        help="mixed: static, dynamic and dense heads in every layer; compressed: static and dynamic "
                             "heads alternating; or a bundled plan's first --layers layers at the tiny geometry")
    parser.add_argument("--layers", type=int, default=Tiny.num_layers, help="transformer blocks of the tiny model")
    parser.add_argument("--dynamic", default="pipeline", choices=["pipeline", "default", "true"],
                        help="torch.compile's dynamic: as the pipeline's own code compiles the model (LongLive 2.0: "
                             "False; the others: None), torch's default None, or True")
    parser.add_argument("--recompile-limit", type=int, default=None,
                        help="torch._dynamo.config.recompile_limit (default: torch's, 8)")
    parser.add_argument("--kv-recache", action=argparse.BooleanOptionalAction, default=True,
                        help="compact keeps the model's sink frames for an exact KV-recache (the default); "
                             "--no-kv-recache frees them")
    parser.add_argument("--lowering", default="aot_eager", choices=fkv_compile.config.LOWERINGS)
    parser.add_argument("--no-grad", action="store_true",
                        help="generate under torch.no_grad() even where the pipeline uses torch.inference_mode()")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the model's dtype (a whole bf16 rollout rounds away more than compression changes: "
                             "its comparison is inconclusive, and says so)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    tiny = Tiny(num_layers=args.layers)
    if args.recompile_limit is not None:
        torch._dynamo.config.recompile_limit = args.recompile_limit
    with tempfile.TemporaryDirectory() as tmp:
        dtype = getattr(torch, args.dtype)
        loaded = PIPELINES[args.pipeline](args.checkout, Path(tmp), tiny, dtype)
        if args.no_grad:
            loaded.grad_mode = torch.no_grad
        tiny = loaded.tiny
        plan = _plan(args.plan, tiny, loaded.heads)
        model64 = _to64(loaded.model)
        videos = [_inputs(tiny, args.blocks or loaded.blocks, seed, dtype) for seed in (0, 1)]
        print(f"{args.pipeline} at {commit}: tiny config {tiny}, plan {args.plan} "
              f"({', '.join(f'{plan.count(r)} {r}' for r in ('static', 'dynamic', 'dense'))} heads), "
              f"kv_recache={args.kv_recache}, {args.dtype}, under "
              f"{loaded.grad_mode.__name__}")
        references, budgets, smallest_effects = [], [], []
        for v, inputs in enumerate(videos):
            in64 = ([n.double() for n in inputs[0]], inputs[1].double())
            reference = _oracle_rollout(loaded, model64, in64, plan)
            budget = error_budget(_oracle_rollout(loaded, loaded.model, inputs, plan), reference, floor=1e-6)
            effects = {"dense": max_abs_error(_run(loaded, model64, in64), reference)}
            effects.update({name: max_abs_error(_oracle_rollout(loaded, model64, in64, wrong), reference)
                            for name, wrong in wrong_kept_sets(plan).items()})
            smallest = min(effects.values())
            verdict = "conclusive" if smallest > CONCLUSIVE * budget else "INCONCLUSIVE"
            print(f"video {v}: budget {budget:.2e} ({args.dtype} oracle vs float64), smallest effect {smallest:.2e} "
                  f"({min(effects, key=effects.get)}): {smallest / budget:.1f} budgets, {verdict}")
            references.append(reference)
            budgets.append(budget)
            smallest_effects.append(smallest)
        failed = False
        for mode in args.mode.split(","):
            torch._dynamo.reset()
            dynamic = {"pipeline": loaded.dynamic, "default": None, "true": True}[args.dynamic]
            compiled = torch.compile(loaded.model, backend="forcing_kv", dynamic=dynamic,
                                     options={"plan": plan, "mode": mode, "lowering": args.lowering,
                                              "kv_recache": args.kv_recache})
            failed |= any(smallest <= CONCLUSIVE * b for smallest, b in zip(smallest_effects, budgets))
            graphs = []
            for v, inputs in enumerate(videos):
                try:
                    err = max_abs_error(_run(loaded, loaded.model, inputs, compiled), references[v])
                except Exception as exc:  # reported, and the run fails
                    print(f"{mode} video {v}: FAILED: {type(exc).__name__}: {str(exc)[:400]}")
                    failed = True
                    break
                ok = err <= budgets[v]
                failed |= not ok
                graphs.append(fkv_compile.report(compiled, print_table=False).graphs)
                print(f"{mode} video {v}: max abs error {err:.2e}, budget {budgets[v]:.2e}: {'ok' if ok else 'WRONG'}; "
                      f"{graphs[-1] - (graphs[-2] if v else 0)} graphs compiled")
            _summary(compiled)
        return 1 if failed else 0


def _to64(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    m64 = copy.deepcopy(model).double()
    if hasattr(m64, "freqs"):  # a plain attribute (complex): not cast by .double()
        m64.freqs = model.freqs
    return m64


def _summary(compiled: torch.nn.Module) -> None:
    rep = fkv_compile.report(compiled, print_table=False)
    sites = [s for s in rep.sites if s.action.is_site]
    print(f"  graphs {rep.graphs} for {len(rep.frames)} frames, {rep.recompiles} recompiles, {rep.graph_breaks} "
          f"graph breaks; sites: " + ", ".join(f"{s.action}" + (f" ({s.reason})" if s.reason else "") for s in sites))
    for s in rep.sites:
        if not s.action.is_site:
            print(f"  left alone: {s.node} in graph {s.graph}: {s.reason}")
    chosen, reused, whole = rep.selections
    print(f"  kept ranges: chosen {chosen}, reused {reused}, none needed {whole}; "
          f"{sum(r.out_of_order for r in rep.layers)} calls dense out of written order")
    if rep.compact:
        print("  " + rep.compact.replace("\n", "\n  "))
    if rep.memory is not None:
        print(f"  KV bytes: {rep.memory.dense_bytes:,} dense -> {rep.memory.compact_bytes:,} in the stores "
              f"({100 * rep.memory.saved_fraction:.1f}% less), {rep.memory.kept_dense_bytes:,} dense still held")


if __name__ == "__main__":
    sys.exit(main())
