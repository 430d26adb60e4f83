"""Optional sharding of the GPU tests across processes: ``ATTNFX_TEST_SHARD=i/n`` keeps
every n-th test of tests/gpu starting at i.  Kernel compiles are CPU-bound and the tests
are tiny on the GPU, so benchmarks/gpu_check.sh runs a few shards side by side."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    # the GPU machines run a checkout without ``pip install``: no entry point names the
    # backend there
    from attnfx.backend import ensure_registered

    ensure_registered()


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("ATTNFX_TEST_SHARD")
    if not shard:
        return
    i, n = (int(x) for x in shard.split("/"))
    mine = [it for it in items if HERE in Path(str(it.path)).resolve().parents]
    keep = set(id(it) for it in mine[i::n])
    deselected = [it for it in mine if id(it) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if id(it) not in {id(d) for d in deselected}]
