"""fkv-compile: Forcing-KV head-wise KV-cache compression for AR video diffusion, as a torch.compile backend.

    model = torch.compile(model, backend="forcing_kv")   # calibrates itself on the first video
    fkv_compile.report(model)
    fkv_compile.plan_of(model).save("plan.json")         # options={"plan": "plan.json"} next time

The layout follows the data (docs/design.md): the spec (``plan``, ``semantics``), the ``config``,
Triton ``kernels``, the run-time ``modes``, the custom ``ops``, the compile-time ``passes``, the
``backend`` and ``report``, the bundled ``models``, and the ``tools`` users run (CLI, check, bench).
"""

from .backend import forcing_kv
from .config import Config, OptionsError
from .modes.profile import tag
from .passes import PlanNeverAppliesWarning, RecompileLimitWarning, SiteError
from .plan import HeadPlan, PlanError, RoleParams
from .report import MemoryReport, Report, is_released, memory_report, plan_of, report

__all__ = [
    "HeadPlan", "RoleParams", "PlanError", "Config", "OptionsError", "SiteError", "RecompileLimitWarning",
    "PlanNeverAppliesWarning", "Report",
    "report", "MemoryReport", "memory_report", "is_released", "plan_of", "forcing_kv", "tag",
]
__version__ = "0.1.0"
