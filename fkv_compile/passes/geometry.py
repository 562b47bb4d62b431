"""The frame geometry of a model, read from its 3-d patch embedding (for models compiled without a plan).

Video DiTs built on Wan (Self Forcing, LongLive, CausVid, ...) embed a chunk of latent frames with a
``Conv3d`` whose ``[B, C, F, h, w]`` output is flattened into the token sequence: ``F`` frames per
chunk, ``h * w`` tokens per frame. When dynamo traces that convolution, its output shape is in the
graph; when the frame holding it runs eagerly (dynamo skips a ``forward`` whose loop over blocks has
a graph break, as these models' do), a one-shot forward hook on the module reads it on the next call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..modes.calibration import Calibrator, Geometry

__all__ = ["traced_patch_geometry", "watch_patch_embeddings"]

_CONV3D = (torch.conv3d, F.conv3d, torch.ops.aten.convolution.default)


def _flattened_into_tokens(node: fx.Node) -> bool:
    """``node``'s output is flattened from its frame dim on (``x.flatten(2)``): it becomes a token sequence."""
    for user in node.users:
        if (user.op == "call_method" and user.target == "flatten") or user.target is torch.flatten:
            start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
            if start == 2:
                return True
    return False


def traced_patch_geometry(gm: fx.GraphModule) -> list[Geometry]:
    """The geometry of every traced 3-d convolution whose ``[B, C, F, h, w]`` output becomes tokens."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV3D:
            continue
        out = node.meta.get("example_value", node.meta.get("val"))
        shape = getattr(out, "shape", ())
        if len(shape) == 5 and all(isinstance(s, int) for s in shape[2:]) and _flattened_into_tokens(node):
            found.append(Geometry.of_patches(tuple(shape), f"the patch embedding {node.name} (traced)"))
    return found


def watch_patch_embeddings(model: nn.Module, calibrator: Calibrator) -> int:
    """Hook every ``Conv3d`` of ``model`` once: its next output shape goes to ``calibrator``, then the hook
    removes itself. Returns the number of modules hooked. The hooks hold the calibrator weakly."""
    target = weakref.ref(calibrator)

    def hook_for(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            calibrator = target()
            if calibrator is not None and isinstance(out, torch.Tensor) and out.dim() == 5:
                label = name or type(model).__name__
                calibrator.observe_patch(tuple(out.shape), f"the patch embedding {label} (Conv3d)")
            handles[name].remove()

        return hook

    handles = {name: module.register_forward_hook(hook_for(name))
               for name, module in model.named_modules() if isinstance(module, nn.Conv3d)}
    return len(handles)
