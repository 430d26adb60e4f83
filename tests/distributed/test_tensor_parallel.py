"""Tensor parallelism: q/k/v projections column-wise, the output projection row-wise
(``parallelize_module``), so every rank holds half the heads.  Compiled with attnfx, each
site is rewritten on every rank and runs on the local heads (the op's DTensor sharding
rules, ``attnfx/distributed.py``), with no collective besides the row-wise projection's
all-reduce; outputs and gradients are the unsharded model's."""

from __future__ import annotations

import copy

import pytest
import torch
from _dist import HEADS, LAYERS, WORLD, D, Model, grads_close, loss_fn, skip_without_gloo, spawn


def _comms(fn) -> dict:
    """The collectives ``fn`` runs, by name, as the profiler records them (gloo's own
    events).  CommDebugMode would not see them: under a dispatch mode, a compiled
    model runs eagerly."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith("gloo:")))


def _worker(rank: int, local_output: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    import attnfx
    from attnfx import cpu

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(1)
    # q, k, v as DTensors: no mask (a plain mask tensor cannot meet DTensors, and DTensor
    # has no rule for CPU SDPA)
    model = Model(causal=local_output)
    plan = {
        "q": ColwiseParallel(use_local_output=local_output),
        "k": ColwiseParallel(use_local_output=local_output),
        "v": ColwiseParallel(use_local_output=local_output),
        "o": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block.attn, mesh, plan)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="attnfx", options={"inner": "eager"})
    torch.manual_seed(0)
    x = torch.randn(2, 16, D)  # the same on every rank, as tensor parallelism wants

    heads_seen = []
    real_forward = cpu.forward

    def spy(q, *args, **kwargs):
        heads_seen.append(q.shape[1])
        return real_forward(q, *args, **kwargs)

    out = compiled(x)  # compiles outside the comm counter
    cpu.forward = spy
    try:
        fwd = _comms(lambda: compiled(x))
    finally:
        cpu.forward = real_forward
    out = compiled(x)
    bwd = _comms(lambda: loss_fn(out).backward())
    eager_fwd = _comms(lambda: eager(x))
    eager_out = eager(x)
    eager_bwd = _comms(lambda: loss_fn(eager_out).backward())

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    return {
        "out": full(out).detach(),
        "grads": {n: full(p.grad) for n, p in model.named_parameters()},
        "counters": dict(attnfx.counters),
        "heads_seen": heads_seen,
        "comms": (fwd, bwd),
        "eager_comms": (eager_fwd, eager_bwd),
    }


@pytest.mark.parametrize("local_output", [True, False], ids=["local-heads", "dtensor-heads"])
def test_tensor_parallel_sites_run_on_local_heads(tmp_path, local_output):
    skip_without_gloo()
    res = spawn(_worker, tmp_path, local_output)
    torch.manual_seed(1)
    ref = Model(causal=local_output)
    gold_model = copy.deepcopy(ref).double()
    torch.manual_seed(0)
    x = torch.randn(2, 16, D)
    base_out = ref(x)
    loss_fn(base_out).backward()
    gold_out = gold_model(x.double())
    loss_fn(gold_out).backward()
    base = {n: p.grad for n, p in ref.named_parameters()}
    gold = {n: p.grad for n, p in gold_model.named_parameters()}
    from attnfx.testing import assert_attention_close

    for rank, r in enumerate(res):
        where = f"rank {rank}"
        assert r["counters"] == {"rewritten.softmax": LAYERS}, (where, r["counters"])
        # the op ran once per layer, in forward, on this rank's half of the heads
        assert r["heads_seen"] == [HEADS // WORLD] * LAYERS, (where, r["heads_seen"])
        fwd, bwd = r["comms"]
        # nothing gathered around the op: the collectives are the tensor-parallel
        # projections' (the eager tensor-parallel model's: 2 all-reduces forward, 6 back)
        assert not any("all_gather" in op for op in {**fwd, **bwd}), (where, fwd, bwd)
        assert fwd == {"gloo:all_reduce": LAYERS}, (where, fwd)  # the row-wise outputs
        assert r["comms"] == r["eager_comms"], (where, r["comms"], r["eager_comms"])
        assert_attention_close(r["out"], base_out.detach(), gold_out.detach(), context=where)
        bad = grads_close(r["grads"], base, gold)
        assert not bad, (where, bad)
