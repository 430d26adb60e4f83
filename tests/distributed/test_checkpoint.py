"""Sites inside higher-order ops' subgraphs: activation-checkpointed blocks
(``checkpoint(..., use_reentrant=False)``, ``checkpoint_wrapper``) and ``torch.cond``
branches are rewritten, recomputed in backward with identical results, reported by
``explain`` and counted; refusals inside them are counted with their reasons."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _dist import Block, D, Model, loss_fn
from torch.utils.checkpoint import checkpoint

import attnfx
from attnfx import cpu
from attnfx.testing import assert_attention_close


class Checkpointed(nn.Module):
    def __init__(self, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(heads=heads) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return x


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            checkpoint_wrapper,
        )

        self.blocks = nn.ModuleList(checkpoint_wrapper(Block()) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block(heads=1)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda y: self.a(y), lambda y: self.b(y), (x,))


@pytest.fixture
def op_outputs(monkeypatch):
    """Every output the op's CPU path computes, in call order."""
    seen = []
    real = cpu.forward

    def spy(*args, **kwargs):
        res = real(*args, **kwargs)
        seen.append(res[0].detach().clone() if res is not None else None)
        return res

    monkeypatch.setattr(cpu, "forward", spy)
    return seen


def _against_eager(model, x, compiled):
    """The compiled model's output and gradients against eager's (the rule, float64 gold)."""
    gold_model = _copy(model).double()
    base_out = model(x)
    loss_fn(base_out).backward()
    base = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    gold_out = gold_model(x.double())
    loss_fn(gold_out).backward()
    out = compiled(x)
    loss_fn(out).backward()
    assert_attention_close(out.detach(), base_out.detach(), gold_out.detach(), context="output")
    for n, p in model.named_parameters():
        g = dict(gold_model.named_parameters())[n].grad
        assert_attention_close(p.grad, base[n], g, grad=True, check_strides=False, context=n)


def _copy(m):
    import copy

    return copy.deepcopy(m)


@pytest.mark.parametrize("make", [Checkpointed, Wrapped], ids=["checkpoint", "checkpoint_wrapper"])
def test_checkpointed_sites_rewritten_and_recomputed(make, op_outputs):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 16, D)
    compiled = torch.compile(model, backend="attnfx", options={"inner": "eager"})
    compiled(x)  # compiled: verification's own calls of the op done
    op_outputs.clear()
    _against_eager(model, x, compiled)
    assert attnfx.counters == {"rewritten.softmax": 2}
    # the forward ran the op once per block, the backward once more (recomputation)...
    assert len(op_outputs) == 4, len(op_outputs)
    # ...in reverse block order, with bit-identical results
    assert torch.equal(op_outputs[0], op_outputs[3])
    assert torch.equal(op_outputs[1], op_outputs[2])


def test_checkpointed_sites_with_inductor(op_outputs):
    """Inductor inlines the checkpointed subgraph and its partitioner decides what to
    recompute: the op still runs in the recomputed forward."""
    torch.manual_seed(0)
    model = Checkpointed()
    x = torch.randn(2, 16, D)
    compiled = torch.compile(model, backend="attnfx")
    compiled(x)
    op_outputs.clear()
    _against_eager(model, x, compiled)
    assert attnfx.counters == {"rewritten.softmax": 2}
    assert len(op_outputs) == 4, len(op_outputs)
    assert torch.equal(op_outputs[0], op_outputs[3])


def test_cond_branches_rewritten():
    torch.manual_seed(0)
    model = Branches()
    x = torch.randn(2, 16, D)
    _against_eager(model, x, torch.compile(model, backend="attnfx", options={"inner": "eager"}))
    # one site per branch: both rewritten, whichever runs
    assert attnfx.counters == {"rewritten.softmax": 2}


def test_explain_reports_subgraph_sites():
    torch.manual_seed(0)
    model = Checkpointed()
    rep = attnfx.explain(model, torch.randn(2, 16, D))
    assert rep.count("softmax") == 2, str(rep)
    assert sorted(s.where for s in rep.rewritten) == ["blocks.0.attn", "blocks.1.attn"]
    assert not attnfx.counters  # explain's sites are in its report only


def test_refusal_inside_checkpoint_counted():
    torch.manual_seed(0)
    model = Checkpointed(heads=4)  # head dim 8: below what the kernels take
    compiled = torch.compile(model, backend="attnfx", options={"inner": "eager"})
    compiled(torch.randn(2, 16, D))
    (key,) = attnfx.counters
    assert key.startswith("kept.head dim 8"), attnfx.counters
    assert attnfx.counters[key] == 2


def test_checkpoint_around_the_whole_model():
    """Nested: a checkpointed model whose blocks are checkpointed too."""

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Checkpointed()

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(2, 16, D)
    _against_eager(model, x, torch.compile(model, backend="attnfx", options={"inner": "eager"}))
    assert attnfx.counters == {"rewritten.softmax": 2}


def test_plain_model_unchanged():
    """A model without subgraphs compiles as before (same counts)."""
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 16, D)
    _against_eager(model, x, torch.compile(model, backend="attnfx", options={"inner": "eager"}))
    assert attnfx.counters == {"rewritten.softmax": 2}
