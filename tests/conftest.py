import os
import random

import pytest
import torch

# The Triton interpreter must be chosen before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (the GPU run uses 12 workers) each worker would start as many CPU threads as the
# machine has cores: CPU work in the tests (references, oracles) then oversubscribes the host many
# times over. Each worker gets its share of the cores instead.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh random seed per test (data differs every run); printed when the test fails."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    yield value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"torch.manual_seed({seeds[0]}) reproduces this failure"))


@pytest.fixture
def backend():
    """Restore the global backend after a test that changes it."""
    import pysnell

    before = pysnell.get_backend()
    yield pysnell
    pysnell.set_backend(before)


# PYSNELL_TEST_LOG=<file>: append each test's outcome and duration (and a failure's traceback) as it
# finishes, so a device run that hits its time limit still says what failed and what was slow. Under
# pytest-xdist the controller receives every worker's reports: only it writes (else each line twice).
_TEST_LOG = None if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.get("PYSNELL_TEST_LOG")


def pytest_runtest_logreport(report):
    if not _TEST_LOG or (report.when != "call" and not report.failed):
        return
    with open(_TEST_LOG, "a") as log:
        log.write(f"{report.outcome.upper():7s} {report.duration:7.2f}s {report.nodeid} ({report.when})\n")
        if report.failed:
            log.write(report.longreprtext[-6000:] + "\n" + "-" * 80 + "\n")
