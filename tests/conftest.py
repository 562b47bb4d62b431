import os

# the Triton kernels run on CPU through the interpreter, which Triton reads when it is first
# imported (Inductor imports it): set before anything imports torch._inductor
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# scripts/mutation_check.py: the same examples every run, so a mutation is caught or not deterministically
settings.register_profile("mutation", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """What the suite's comparisons against the fp64 oracle could see: each one's smallest effect over its budget."""
    from rollouts import SEEN

    if not SEEN:
        return
    terminalreporter.section("effect / budget of the comparisons against the float64 oracle")
    for test, dtype, budget, effect in sorted(SEEN, key=lambda row: row[3] / row[2]):
        terminalreporter.write_line(f"{effect / budget:9.1f}  budget {budget:.2e}  effect {effect:.2e}  {dtype:<9} {test}")
