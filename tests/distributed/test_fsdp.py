"""FSDP2 (``fully_shard`` per transformer block, then the root), each block compiled with
attnfx: every rank rewrites every site, and two optimizer steps give single-process
eager's losses and gradients."""

from __future__ import annotations

import copy

import torch
from _dist import WORLD, D, Model, grads_close, loss_fn, reference_grads, skip_without_gloo, spawn

STEPS = 2


def _worker(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import attnfx

    torch.manual_seed(1)
    model = Model()
    for block in model.blocks:
        fully_shard(block)
        block.compile(backend="attnfx", options={"inner": "eager"})
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    xs = torch.randn(STEPS, 2 * WORLD, 16, D)
    losses, grads = [], []
    for step in range(STEPS):
        loss = loss_fn(model(xs[step, 2 * rank : 2 * rank + 2]))
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / WORLD)
        # the unsharded gradients (an all-gather outside the compiled blocks)
        grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return {"xs": xs, "losses": losses, "grads": grads, "counters": dict(attnfx.counters)}


def test_fsdp2_rewrites_every_rank_and_matches_eager(tmp_path):
    skip_without_gloo()
    res = spawn(_worker, tmp_path)
    torch.manual_seed(1)
    ref = Model()
    xs = res[0]["xs"]
    gold_model = copy.deepcopy(ref).double()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    gold_opt = torch.optim.SGD(gold_model.parameters(), lr=0.5)
    for step in range(STEPS):
        base = reference_grads(ref, xs[step])
        gold = reference_grads(gold_model, xs[step], torch.float64)
        ref_loss = loss_fn(ref(xs[step])).item()
        for rank, r in enumerate(res):
            where = f"rank {rank}, step {step + 1}"
            # each block compiled once: its site rewritten, on every rank
            assert r["counters"] == {"rewritten.softmax": 2}, (where, r["counters"])
            # the mean of the ranks' losses is the whole batch's loss
            assert abs(r["losses"][step] - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), where
            bad = grads_close(r["grads"][step], base, gold)
            assert not bad, (where, bad)
        # eager takes the same steps (the gradients set by reference_grads' copies)
        for p, g in zip(ref.parameters(), base.values()):
            p.grad = g
        for p, g in zip(gold_model.parameters(), gold.values()):
            p.grad = g
        opt.step()
        gold_opt.step()
