"""DistributedDataParallel around a model compiled with attnfx (and the model compiled
after wrapping), with buckets small enough that DDP's graph splitting (DDPOptimizer)
compiles the model in pieces, on fake inputs: every rank rewrites every site, and the
gradients are single-process eager's."""

from __future__ import annotations

import pytest
import torch
from _dist import (
    WORLD,
    D,
    Model,
    grads_close,
    loss_fn,
    reference_grads,
    skip_without_gloo,
    spawn,
)

BUCKET_BYTES = 4096  # a block's attention and MLP parameters fill several buckets


def _worker(rank: int, inner: str) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import attnfx
    from attnfx import report

    # DDPOptimizer's first bucket is capped at this constant (1 MiB), and the other
    # buckets must not be smaller: lowered so that a small model is split too
    dist._DEFAULT_FIRST_BUCKET_BYTES = BUCKET_BYTES
    torch.manual_seed(0)
    xs = torch.randn(2 * WORLD, 16, D)
    x = xs[2 * rank : 2 * rank + 2]
    results = {}
    for order in ("compile, then wrap", "wrap, then compile"):
        torch._dynamo.reset()
        attnfx.reset_counters()
        torch.manual_seed(1)
        model = Model()
        opts = {"inner": inner}
        mb = BUCKET_BYTES / 2**20
        if order == "compile, then wrap":
            ddp = DDP(torch.compile(model, backend="attnfx", options=opts), bucket_cap_mb=mb)
        else:
            ddp = torch.compile(DDP(model, bucket_cap_mb=mb), backend="attnfx", options=opts)
        with report.collecting() as records:
            loss_fn(ddp(x)).backward()
        results[order] = {
            "counters": dict(attnfx.counters),
            "graphs": sorted({r.graph for r in records if r.status == "rewritten"}),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
    return {"xs": xs, "results": results}


def _check(res: list[dict]) -> None:
    torch.manual_seed(1)
    model = Model()
    xs = res[0]["xs"]
    base = reference_grads(model, xs)
    gold = reference_grads(model, xs, torch.float64)
    for rank, r in enumerate(res):
        for order, got in r["results"].items():
            where = f"rank {rank}, {order}"
            # both blocks' sites, on every rank, nothing kept
            assert got["counters"] == {"rewritten.softmax": 2}, (where, got["counters"])
            # the graph was split: each block's site in a graph of its own
            assert len(got["graphs"]) == 2, (where, got["graphs"])
            # DDP averages the ranks' gradients of their half batches: the gradient of the
            # whole batch's mean loss, single-process eager's (the equivalence rule)
            bad = grads_close(got["grads"], base, gold)
            assert not bad, (where, bad)


def test_ddp_rewrites_every_rank_and_matches_eager(tmp_path):
    skip_without_gloo()
    _check(spawn(_worker, tmp_path, "eager"))


@pytest.mark.slow
def test_ddp_with_inductor(tmp_path):
    """The same through inductor (AOT autograd compiles each piece on fake inputs first)."""
    skip_without_gloo()
    _check(spawn(_worker, tmp_path, "inductor"))
