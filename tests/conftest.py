import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Two threads on a shared 2-core machine make tiny matmuls ~100x slower (thread contention).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, whatever an earlier test left set; restored afterwards.
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# The library has no default data folder; the tests use the WikiText-2 copy beside the repository when
# there is one (tests that need it skip otherwise). An explicit DEPGRAPH_DATA_DIR wins.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
if "DEPGRAPH_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["DEPGRAPH_DATA_DIR"] = str(_SHARED)
