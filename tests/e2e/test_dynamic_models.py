"""End to end under ``torch.compile(..., dynamic=True)``: transformers models from small
configs keep every attention site rewritten at every sequence length, from one compiled
graph, and equal eager (gold: the eager model in float64).

Dynamo makes the models' float attributes (the ``scaling`` the eager attention multiplies
by, SDPA's ``scale``) graph inputs under dynamic=True; attnfx reads them as constants,
which guards on their value, and Dynamo retraces once with them specialized (a
``RestartAnalysis`` before the first compile completes, not a recompile).
"""

from __future__ import annotations

import copy

import pytest
import torch

import attnfx
from attnfx.backend import attnfx_backend
from attnfx.testing import assert_attention_close

pytest.importorskip("transformers")

from test_models import _first_tensor, _gpt2, _llama  # noqa: E402 - after the skip

LENGTHS = (12, 20, 33)
CASES = [
    ("gpt2", _gpt2, "eager"),
    ("gpt2", _gpt2, "sdpa"),
    ("llama", _llama, "eager"),
    ("llama", _llama, "sdpa"),
]


@pytest.mark.parametrize("name,build,impl", CASES, ids=[f"{n}-{i}" for n, _, i in CASES])
def test_dynamic_model_rewritten_at_every_length_with_one_compile(name, build, impl):
    torch.manual_seed(0)
    model, _, n_layers = build(impl)
    model.eval()
    gold_model = copy.deepcopy(model).double()
    compiled_graphs = []

    def backend(gm, example_inputs):
        fn = attnfx_backend(gm, example_inputs)
        compiled_graphs.append(gm)  # counted once compiled (a retrace raises first)
        return fn

    compiled = torch.compile(model, backend=backend, dynamic=True)
    with attnfx.report.collecting() as records:
        for n in LENGTHS:
            ids = torch.randint(0, 100, (2, n))
            out = _first_tensor(compiled(ids))
            base = _first_tensor(model(ids))
            gold = _first_tensor(gold_model(ids))
            assert_attention_close(out, base, gold, check_strides=False, context=f"N={n}")
    assert len(compiled_graphs) == 1, f"{len(compiled_graphs)} compiles"
    assert attnfx.counters["rewritten.softmax"] == n_layers, dict(attnfx.counters)
    assert not [c for c in attnfx.counters if c.startswith("kept.")], dict(attnfx.counters)
    assert all(r.spec.mask_class.kind == "causal" for r in records), records

    # Parameter gradients through the rewritten sites, at a length not compiled for.
    ids = torch.randint(0, 100, (2, 27))
    grads = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        o = _first_tensor(fn(ids))
        o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(3)))
        grads.append({p: t.grad.clone() for p, t in model.named_parameters() if t.grad is not None})
    assert len(compiled_graphs) == 1, "the backward recompiled the forward"
    # Held to eager's float32 values, closely: inductor's summed reductions (bias
    # gradients, embedding rows over every token) round differently from eager's, away
    # from the sites.
    for p, g in grads[1].items():
        atol = 1e-5 * max(1.0, g.abs().max().item())
        torch.testing.assert_close(grads[0][p], g, rtol=1e-4, atol=atol, msg=p)
