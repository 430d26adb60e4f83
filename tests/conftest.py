import os

import pytest

from attnfx._compat import ensure_torchvision_importable

ensure_torchvision_importable()

# The suite checks every rewrite on CPU, including the forms the backend by default leaves
# to inductor on CPU because its code is faster there (option cpu="auto"); tests of that
# policy pass cpu="auto" explicitly.
os.environ.setdefault("ATTNFX_CPU_REWRITE", "always")

# Small, fast hypothesis profiles: "ci" (default) for the CPU suite, "nightly" for long runs.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        max_examples=25,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    settings.register_profile(
        "nightly", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck)
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles afresh: no cache entries, counters or verified sites leak
    between tests."""
    import torch

    import attnfx
    from attnfx import backend

    torch._dynamo.reset()
    attnfx.reset_counters()
    # verify="first" skips sites this process verified before: start each test afresh,
    # so that what a test sees verified does not depend on the tests run before it.
    backend._verified.clear()
    yield
    torch._dynamo.reset()
