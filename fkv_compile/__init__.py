"""fkv-compile: Forcing-KV head-wise KV-cache compression for AR video diffusion, as a torch.compile backend.

    plan = fkv_compile.HeadPlan.load("plan.json")
    model = torch.compile(model, backend="forcing_kv", options={"plan": plan})
    fkv_compile.report(model)

The layout follows the data (docs/design.md): the spec (``plan``, ``semantics``), the ``config``,
Triton ``kernels``, the run-time ``modes``, the custom ``ops``, the compile-time ``passes``, the
``backend`` and ``report``, the bundled ``models``, and the ``tools`` users run (CLI, check, bench).
"""

from .backend import forcing_kv
from .config import Config, OptionsError
from .modes.profile import tag
from .passes import RecompileLimitWarning, SiteError
from .plan import HeadPlan, PlanError, RoleParams
from .report import MemoryReport, Report, is_released, memory_report, report

__all__ = [
    "HeadPlan", "RoleParams", "PlanError", "Config", "OptionsError", "SiteError", "RecompileLimitWarning", "Report",
    "report", "MemoryReport", "memory_report", "is_released", "forcing_kv", "tag",
]
__version__ = "0.1.0"
