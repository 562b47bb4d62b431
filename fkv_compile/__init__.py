"""fkv-compile: Forcing-KV head-wise KV-cache compression for AR video diffusion, as a torch.compile backend.

    plan = fkv_compile.HeadPlan.load("plan.json")
    model = torch.compile(model, backend="forcing_kv", options={"plan": plan})
    fkv_compile.report(model)
"""

from .backend import OptionsError, forcing_kv
from .passes import RecompileLimitWarning, SiteError
from .plan import HeadPlan, PlanError, RoleParams
from .report import MemoryReport, Report, is_released, memory_report, report

__all__ = [
    "HeadPlan", "RoleParams", "PlanError", "OptionsError", "SiteError", "RecompileLimitWarning", "Report", "report", "MemoryReport",
    "memory_report", "is_released", "forcing_kv",
]
__version__ = "0.1.0"
