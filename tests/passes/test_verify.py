"""The verify pass: the site's subgraph against its candidate, on real and random inputs."""

import dataclasses
import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

import attnfx
from attnfx.passes import graph as G
from attnfx.passes import rewrite, verify
from attnfx.passes.canonicalize import canonicalize
from attnfx.passes.match import Operand
from attnfx.passes.recognize import find_sites


class Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def _qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 9, 16, generator=g) for _ in range(3)]


def _prepare():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    inputs = _qkv()
    torch.compile(Attn(), backend=backend)(*inputs)
    gm, ex = graphs[0]
    canonicalize(gm)
    (site,) = find_sites(gm)
    gnx = G.to_networkx(gm.graph)
    return gm, ex, site, gnx


def test_correct_rewrite_is_accepted():
    gm, ex, site, gnx = _prepare()
    orig, cand, ext = verify.build_graphs(gm, gnx, site)
    assert len(ext) == 3  # q, k, v: the region reads nothing else
    captured = verify.capture_inputs(gm, ex, set(ext))
    v = verify.verify_site(gm, gnx, site, captured)
    assert v.ok and v.max_rel_err < 1e-5


def test_wrong_rewrite_is_rejected(monkeypatch):
    from attnfx import ops

    gm, ex, site, gnx = _prepare()
    real = ops.site_attention
    monkeypatch.setattr(ops, "site_attention", lambda *a: real(*a) * 1.001)
    captured = verify.capture_inputs(gm, ex, set(verify.build_graphs(gm, gnx, site)[2]))
    v = verify.verify_site(gm, gnx, site, captured)
    assert not v.ok and "max rule" in v.message


def test_capture_does_not_mutate_inputs():
    class Mut(nn.Module):
        def forward(self, x, buf):
            buf.add_(1.0)
            return x * 2

    graphs = []
    torch._dynamo.reset()
    torch.compile(Mut(), backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(
        torch.ones(2), torch.zeros(2)
    )
    gm, ex = graphs[0]
    before = [t.clone() for t in ex if isinstance(t, torch.Tensor)]
    verify.capture_inputs(gm, ex, set(gm.graph.nodes))
    after = [t for t in ex if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------
# Bounded work: (batch, head) slices, query rows, reduced-length random trials
# ---------------------------------------------------------------------------------------

SB, SH, SN, SD = 3, 4, 32, 16  # big enough, with the bounds below, for every cut to bite


@pytest.fixture
def small_bounds(monkeypatch):
    monkeypatch.setattr(verify, "ROWS", 8)
    monkeypatch.setattr(verify, "EDGE_ROWS", 2)
    monkeypatch.setattr(verify, "RANDOM_LENGTH", 12)


@pytest.fixture
def runs(monkeypatch):
    """Every subgraph run of the verifier: (is the candidate, float64, output shape)."""
    from attnfx import ops

    seen = []
    real = verify._run

    def recording(mod, inputs, grad_idx, cot, f64):
        out = real(mod, inputs, grad_idx, cot, f64)
        is_cand = any(n.target is ops.site_attention for n in mod.graph.nodes)
        seen.append((is_cand, f64, tuple(out[0].shape)))
        return out

    monkeypatch.setattr(verify, "_run", recording)
    return seen


@pytest.fixture
def verdicts(monkeypatch):
    seen = []
    real = verify.verify_site

    def recording(*a, **kw):
        v = real(*a, **kw)
        seen.append(v)
        return v

    monkeypatch.setattr(verify, "verify_site", recording)
    return seen


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _qkv_s(h=SH, hk=None):
    return [_rand(SB, h, SN, SD, seed=0), _rand(SB, hk or h, SN, SD, seed=1)] + [
        _rand(SB, hk or h, SN, SD, seed=2)
    ]


def causal_tril(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def gqa_repeat(q, k, v):
    # HF's repeat_kv: expand + reshape with the sizes baked in by Dynamo.
    b, hk, n, d = k.shape
    g = q.shape[1] // hk
    k = k[:, :, None].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)
    v = v[:, :, None].expand(b, hk, g, n, d).reshape(b, hk * g, n, d)
    return torch.softmax(q @ k.transpose(-2, -1) * d**-0.5, dim=-1) @ v


def _compile(fn, *inputs, **options):
    options.setdefault("verify", "always")
    return torch.compile(Fn(fn), backend="attnfx", options=options)(*inputs)


def test_sliced_check_runs_bounded_work(small_bounds, runs, verdicts):
    """The original subgraph runs on 2 of 3 batches, 2 of 4 heads and 8 of 32 query rows
    (a causal mask built inside it from tril is cut the same way), the candidate on the
    same slices with all rows; the random trial at length 12."""
    q, k, v = _qkv_s()
    out = _compile(causal_tril, q, k, v)
    assert attnfx.counters["rewritten.softmax"] == 1
    torch.testing.assert_close(out, causal_tril(q, k, v))
    (vd,) = verdicts
    assert vd.ok, vd.message
    assert "real inputs: B 2/3, H 2/4, Q 8/32" in vd.checked
    assert "random inputs #0: B 2/3, H 2/4, Q 8/32, K 12/32, length 12" in vd.checked
    region = {shape for cand, _, shape in runs if not cand}
    cand = {shape for cand, _, shape in runs if cand}
    assert region == {(2, 2, 8, SD)}  # base, gold: never the full (3, 4, 32, 16)
    assert any(f64 for cand_, f64, _ in runs if not cand_)
    assert cand == {(2, 2, SN, SD), (2, 2, 12, SD)}


def _plant(monkeypatch, where):
    """A candidate wrong only at ``where`` of its output (whatever runs the op)."""
    from attnfx import ops

    real = ops.site_attention

    def wrong(*a):
        out = real(*a).clone()
        out[where] += 1e-2
        return out

    monkeypatch.setattr(ops, "site_attention", wrong)


@pytest.mark.parametrize(
    "where",
    [
        (-1, -1),  # the last batch's last head only
        (slice(None), slice(None), -1),  # the last query row only
        (slice(None), slice(None), 0),  # the first query row only
        (Ellipsis, 0),  # one output channel
    ],
    ids=["last-head", "last-row", "first-row", "one-channel"],
)
def test_sliced_check_rejects_planted_errors(small_bounds, verdicts, monkeypatch, where):
    _plant(monkeypatch, where)
    q, k, v = _qkv_s()
    _compile(causal_tril, q, k, v)
    (vd,) = verdicts
    assert not vd.ok and "max rule" in vd.message
    assert "B 2/3, H 2/4, Q 8/32" in vd.message  # rejected by the sliced check
    assert attnfx.counters["kept.verifier rejected the rewrite"] == 1


def test_masks_and_biases_are_sliced_consistently(small_bounds, verdicts):
    """A bias and a keep mask that differ per (batch, head) and row, and a per-row
    temperature: cut with the same indices as q, k, v, or the rewrite would be rejected."""
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(SB, SH, SN, SN, generator=g)
    keep = (torch.rand(SB, 1, SN, SN, generator=g) > 0.3) | torch.eye(SN, dtype=torch.bool)
    tau = 0.5 + torch.rand(SB, SH, SN, 1, generator=g)

    def fn(q, k, v, bias, keep, tau):
        s = (q @ k.transpose(-2, -1)) * tau + bias
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v

    q, k, v = _qkv_s()
    out = _compile(fn, q, k, v, bias, keep, tau)
    (vd,) = verdicts
    assert vd.ok, vd.message
    assert "real inputs: B 2/3, H 2/4, Q 8/32" in vd.checked and "length 12" in vd.checked
    torch.testing.assert_close(out, fn(q, k, v, bias, keep, tau))


def test_sdpa_masks_sliced_and_causal_keeps_rows(small_bounds, verdicts):
    import torch.nn.functional as F

    q, k, v = _qkv_s()
    mask = _rand(SB, SH, SN, SN, seed=4)
    _compile(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    torch._dynamo.reset()
    _compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    masked, causal = verdicts
    assert masked.ok and "real inputs: B 2/3, H 2/4, Q 8/32" in masked.checked
    # is_causal places rows by their index: a subset of rows would move the diagonal,
    # so the real inputs are checked on every row of the (batch, head) slices.
    assert causal.ok and "real inputs: B 2/3, H 2/4;" in causal.checked


def test_baked_sizes_slice_in_place(small_bounds, verdicts, runs, monkeypatch):
    """GQA through expand/reshape with the sizes baked in: k and v cannot enter sliced
    (the reshape would not fit), so the region slices the repeated k and v where they
    meet the sliced q — the query heads of the kept kv heads, in the region's own order."""
    q, k, v = _qkv_s(h=8, hk=4)
    out = _compile(gqa_repeat, q, k, v)
    torch.testing.assert_close(out, gqa_repeat(q, k, v))
    (vd,) = verdicts
    assert vd.ok, vd.message
    assert "real inputs: B 2/3, H 4/8, Hk 2/4, Q 8/32 (k, v, aux sliced in place)" in vd.checked
    assert {s for c, _, s in runs if not c} == {(2, 4, 8, SD)}
    verdicts.clear()
    torch._dynamo.reset()
    _plant(monkeypatch, (-1, -1))
    _compile(gqa_repeat, q, k, v)
    (vd,) = verdicts
    assert not vd.ok and "sliced in place" in vd.message


def test_wrong_gqa_grouping_is_rejected_when_sliced(small_bounds):
    """A matcher bug, planted: ``k.repeat`` tiles kv heads (query head h reads kv head
    h % Hk) but is read as GQA groups (h // g).  The sliced check keeps each kept kv
    head with its group and slices the region's own repeat where it meets q: it sees the
    difference."""

    def tiled(q, k, v):
        k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v

    graphs = []
    q, k, v = _qkv_s(h=8, hk=4)
    torch.compile(Fn(tiled), backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(q, k, v)
    gm, ex = graphs[0]
    canonicalize(gm)
    (site,) = find_sites(gm)
    assert site.k.node.target == "repeat" and site.spec.gqa_group == 1
    site.k = Operand(site.k.node.args[0], site.k.permute)
    site.v = Operand(site.v.node.args[0], site.v.permute)
    site.spec = dataclasses.replace(site.spec, gqa_group=2)
    gnx = G.to_networkx(gm.graph)
    captured = verify.capture_inputs(gm, ex, set(rewrite.site_inputs(gnx, site)[1]))
    vd = verify.verify_site(gm, gnx, site, captured)
    assert not vd.ok and "B 2/3, H 4/8, Hk 2/4, Q 8/32" in vd.message


def test_unknown_op_falls_back_to_full_size(small_bounds, verdicts, runs, monkeypatch):
    """An op the slicer does not know (here: softmax, struck off its list) means no
    slicing: the check runs at full size, and still rejects a wrong rewrite."""
    monkeypatch.setattr(verify, "_SOFTMAX", frozenset())
    monkeypatch.setattr(verify, "_REDUCE_METHOD", frozenset())
    q, k, v = _qkv_s()
    _compile(causal_tril, q, k, v)
    (vd,) = verdicts
    assert vd.ok and vd.checked == "real inputs: full size; random inputs #0: full size"
    assert {s for c, _, s in runs if not c} == {(SB, SH, SN, SD)}
    verdicts.clear()
    torch._dynamo.reset()
    _plant(monkeypatch, (-1, -1))
    _compile(causal_tril, q, k, v)
    (vd,) = verdicts
    assert not vd.ok and "full size" in vd.message


def test_slicer_refuses_size_read_of_sliced_dim():
    """A length read from a sliced value (``s.size(-2)`` once rows are cut) would build
    the wrong mask: the slicer refuses instead of guessing."""
    g = fx.Graph()
    s = g.placeholder("s")
    n = g.call_method("size", (s, -2))
    out = g.call_function(torch.mul, (s, n))
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    shapes = {s: (2, 4, 32, 32), n: None, out: (2, 4, 32, 32)}
    full = {"B": 2, "H": 4, "Q": 32, "K": 32}
    label = [["B", "H", "Q", "K"]]
    with pytest.raises(verify._Unsliceable, match="size of a sliced dim"):
        verify._Slicer(gm, {n, out}, [s], out, label, [True], {"Q": [0, 5, 31]}, full, shapes)
    # Reading an unsliced dim is fine.
    sl = verify._Slicer(gm, {n, out}, [s], out, label, [True], {"H": [0, 3]}, full, shapes)
    assert sl.out_state == (None, "H", None, None)


def test_capture_runs_only_what_the_sites_read():
    """Capturing q, k, v does not compute the attention itself (no N² scores)."""

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.matmul:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    gm, ex, site, gnx = _prepare()
    ext = verify.build_graphs(gm, gnx, site)[2]
    with Count():
        captured = verify.capture_inputs(gm, ex, set(ext))
    assert Count.calls == 0 and set(captured) == set(ext)


def test_capture_sees_inplace_updates():
    """A value updated in place after it is made (``q.mul_(3)``) is captured as the site
    reads it."""

    class M(nn.Module):
        def forward(self, x, k, v):
            q = x.clone()
            q.mul_(3.0)
            return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    graphs = []
    torch._dynamo.reset()
    x, k, v = (_rand(1, 2, 9, 16, seed=i) for i in range(3))
    torch.compile(M(), backend=lambda gm, ex: graphs.append((gm, ex)) or gm)(x, k, v)
    gm, ex = graphs[0]
    canonicalize(gm)
    (site,) = find_sites(gm)
    captured = verify.capture_inputs(gm, ex, {site.q.node})
    torch.testing.assert_close(captured[site.q.node], x * 3.0)


# ---------------------------------------------------------------------------------------
# Gradients of every input that requires grad
# ---------------------------------------------------------------------------------------


class LearnedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(0.5 * _rand(2, 9, 9, seed=7))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25 + self.bias
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("sdpa", [False, True])
def test_learnable_bias_losing_its_gradient_is_rejected(monkeypatch, verdicts, sdpa):
    """Planted: the op's bias gradient is lost (zeros); verification is the guard."""
    import torch.nn.functional as F

    from attnfx import ops

    real = ops.attention_aux_backward_op
    monkeypatch.setattr(
        ops,
        "attention_aux_backward_op",
        lambda dout, q, k, v, aux, out, lse, spec, which: [torch.zeros_like(aux[i]) for i in which],
    )
    m = LearnedBias()
    if sdpa:
        m.forward = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m.bias)
    q, k, v = _qkv()
    out = torch.compile(m, backend="attnfx")(q, k, v)
    (vd,) = verdicts
    assert not vd.ok and "gradient of" in vd.message and "bias" in vd.message
    assert attnfx.counters["kept.verifier rejected the rewrite"] == 1
    assert attnfx.counters["rewritten.softmax"] == 0
    # Kept as written, the bias gets its gradient.
    (gb,) = torch.autograd.grad(out.sum(), [m.bias])
    (want,) = torch.autograd.grad(m(q, k, v).sum(), [m.bias])
    torch.testing.assert_close(gb, want)
    # The same site with the op's real bias gradient is rewritten.
    verdicts.clear()
    torch._dynamo.reset()
    monkeypatch.setattr(ops, "attention_aux_backward_op", real)
    torch.compile(m, backend="attnfx")(q, k, v)
    assert verdicts[-1].ok and attnfx.counters["rewritten.softmax"] == 1


class RowTemperature(nn.Module):
    def forward(self, q, k, v, tau):
        return torch.softmax((q @ k.transpose(-2, -1)) * tau, dim=-1) @ v


def _tau():
    return 0.5 + torch.rand(1, 2, 9, 1, generator=torch.Generator().manual_seed(4))


def test_temperature_gradient_is_checked_and_accepted(monkeypatch, verdicts):
    contexts = []
    real = verify.compare

    def recording(*a, **kw):
        r = real(*a, **kw)
        contexts.append((kw.get("context", ""), r.ok))
        return r

    monkeypatch.setattr(verify, "compare", recording)
    tau = _tau().requires_grad_(True)
    torch.compile(RowTemperature(), backend="attnfx")(*_qkv(), tau)
    (vd,) = verdicts
    assert vd.ok and attnfx.counters["rewritten.temperature"] == 1
    assert any(ctx.startswith("gradient of l_tau_") and ok for ctx, ok in contexts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_temperature_gradient_dropped_is_rejected(monkeypatch, verdicts, dtype):
    """A candidate that detaches the temperature (kept on the scores as an aux tensor in
    every dtype: ``temperature.MOVE_ONTO_Q``) loses its gradient."""
    real = rewrite.emit_call
    moved = []

    def detaching(graph, site, lookup):
        tau = {m.node for m in site.q_mul} | {a.node for a in site.aux}
        moved.append(bool(site.q_mul))

        def look(n):
            x = lookup(n)
            return graph.call_method("detach", (x,)) if n in tau else x

        return real(graph, site, look)

    monkeypatch.setattr(rewrite, "emit_call", detaching)
    tau = _tau().to(dtype).requires_grad_(True)
    torch.compile(RowTemperature(), backend="attnfx")(*(t.to(dtype) for t in _qkv()), tau)
    assert moved and not any(moved)
    (vd,) = verdicts
    assert not vd.ok and "gradient of l_tau_" in vd.message
    assert attnfx.counters["kept.verifier rejected the rewrite"] == 1


# ---------------------------------------------------------------------------------------
# Default-mode verification and random trials
# ---------------------------------------------------------------------------------------


def test_verify_first_verifies_each_new_site_exactly_once(verdicts):
    from attnfx import backend

    assert not backend._verified  # reset before each test (tests/conftest.py)
    q, k, v = _qkv()
    for _ in range(2):
        torch._dynamo.reset()
        torch.compile(Attn(), backend="attnfx")(q, k, v)
    assert len(verdicts) == 1
    for _ in range(2):  # a new spec is a new site: verified once too
        torch._dynamo.reset()
        torch.compile(Fn(causal_tril), backend="attnfx")(q, k, v)
    assert len(verdicts) == 2 and all(vd.ok for vd in verdicts)
    assert attnfx.counters["rewritten.softmax"] == 4


def test_verified_set_starts_empty():
    """Runs after a test that verified sites: the per-process set does not leak."""
    from attnfx import backend

    assert not backend._verified


@pytest.mark.parametrize("trials", [0, 2])
def test_random_trials_run(monkeypatch, trials):
    checks = []
    real = verify._check

    def recording(plan, sets, r_in, c_in, grad_idx, site, label, names):
        checks.append(label)
        return real(plan, sets, r_in, c_in, grad_idx, site, label, names)

    monkeypatch.setattr(verify, "_check", recording)
    torch.compile(Attn(), backend="attnfx", options={"random_trials": trials})(*_qkv())
    assert [c.split(" (")[0] for c in checks] == ["real inputs"] + [
        f"random inputs #{t}" for t in range(trials)
    ]


@pytest.mark.parametrize("trials,ok", [(0, True), (1, False)])
def test_random_trial_catches_what_real_inputs_miss(monkeypatch, verdicts, trials, ok):
    """A candidate wrong only for large scores: the real inputs (small q) never show it,
    a random trial does."""
    from attnfx import ops

    real = ops.site_attention

    def wrong_when_large(q, k, v, aux, spec):
        out = real(q, k, v, aux, spec)
        return out * 1.01 if q.abs().max() > 0.5 else out

    monkeypatch.setattr(ops, "site_attention", wrong_when_large)
    q, k, v = _qkv()
    torch.compile(Attn(), backend="attnfx", options={"random_trials": trials})(0.01 * q, k, v)
    (vd,) = verdicts
    assert vd.ok is ok
    assert ok or "random inputs #0" in vd.message


def band_and(q, k, v):
    """A band mask combined with ``&`` (``operator.and_``: not an in-place op)."""
    n = q.shape[-2]
    i = torch.arange(n)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 5)
    s = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_masks_combined_with_and_do_not_run_the_whole_graph():
    """``a & b`` of two masks is ``operator.and_``, whose trailing underscore read as an
    in-place op: the capture then ran the whole graph (every neighborhood site's N²
    scores, 2 s at 96x96).  Now it runs only what q, k, v need."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    torch.compile(Fn(band_and), backend=backend)(*_qkv_s())
    gm, ex = graphs[0]
    assert any(n.target is operator.and_ for n in gm.graph.nodes)
    assert not verify._mutates(gm)
    and_node = next(n for n in gm.graph.nodes if n.target is operator.and_)
    assert G.written_tensor(and_node) is False
    canonicalize(gm)
    (site,) = find_sites(gm)
    ext = verify.build_graphs(gm, G.to_networkx(gm.graph), site)[2]

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.matmul, torch.softmax, torch.Tensor.masked_fill):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        verify.capture_inputs(gm, ex, set(ext))
    assert Count.calls == 0
    # an in-place op still makes the capture run whole
    x = fx.Graph()
    a = x.placeholder("a")
    x.output(x.call_method("add_", (a, 1)))
    assert verify._mutates(fx.GraphModule(nn.Module(), x))


@pytest.fixture
def hoist_small(monkeypatch):
    monkeypatch.setattr(verify, "_HOIST_ELEMENTS", 16)
    hoisted = []
    real = verify._hoist_constants

    def recording(nodes, ext):
        out = real(nodes, ext)
        hoisted.append(out[2])
        return out

    monkeypatch.setattr(verify, "_hoist_constants", recording)
    return hoisted


def test_constant_mask_is_built_once_and_sliced(small_bounds, verdicts, runs, hoist_small):
    """A mask built from ``arange`` inside the region is computed once and enters the
    region as an input (each trial used to rebuild it: seconds for a large grid); the
    check stays sliced, and the mask rows it reads are the sliced rows'."""
    q, k, v = _qkv_s()
    out = _compile(band_and, q, k, v)
    torch.testing.assert_close(out, band_and(q, k, v))
    (vd,) = verdicts
    assert vd.ok and "Q 8/32" in vd.checked, vd.checked
    ((value,),) = [list(h.values()) for h in hoist_small]
    assert value.dtype == torch.bool and value.shape == (SN, SN)
    assert {shape for cand, _, shape in runs if not cand} == {(2, 2, 8, SD)}


@pytest.mark.parametrize(
    "where",
    [(slice(None), slice(None), 0), (slice(None), slice(None), -1)],
    ids=["first-row", "last-row"],
)
def test_hoisted_mask_check_rejects_planted_errors(
    small_bounds, verdicts, hoist_small, monkeypatch, where
):
    _plant(monkeypatch, where)
    _compile(band_and, *_qkv_s())
    (vd,) = verdicts
    assert not vd.ok and "max rule" in vd.message
    assert hoist_small and hoist_small[0]


def test_hoisted_mask_reuses_the_mask_pass_value(small_bounds, verdicts, hoist_small, monkeypatch):
    """The mask pass ran the program's mask whole to check its predicate; verification
    takes that value instead of running the mask subgraph again, and the kept values are
    dropped once the graph's sites are verified."""
    from attnfx.passes import masks

    masks._RAN.clear()  # (graphs other tests ran find_sites on directly)
    ran = []
    real = masks.run_constant_nodes

    def recording(nodes, known=None):
        ran.append((list(nodes), dict(known or {})))
        return real(nodes, known)

    monkeypatch.setattr(masks, "run_constant_nodes", recording)
    _compile(band_and, *_qkv_s())
    (vd,) = verdicts
    assert vd.ok, vd.message
    ((nodes, known),) = ran
    assert nodes == [] and len(known) == 1  # nothing recomputed
    (value,) = known.values()
    assert value.dtype == torch.bool and value.shape == (SN, SN)
    assert len(masks._RAN) == 0


def test_no_hoisting_where_the_region_writes_in_place(monkeypatch):
    """A constant of a region that also writes in place is left in the region: a hoisted
    input written in place would carry the write into the next trial."""
    monkeypatch.setattr(verify, "_HOIST_ELEMENTS", 16)

    def region(write: bool):
        g = fx.Graph()
        x = g.placeholder("x")
        x.meta["example_value"] = torch.zeros(8, 8)
        a = g.call_function(torch.arange, (64,))
        a.meta["example_value"] = torch.arange(64)
        m = g.call_method("view", (a, 8, 8))
        m.meta["example_value"] = torch.zeros(8, 8, dtype=torch.long)
        keep = g.call_function(operator.gt, (m, 5))
        keep.meta["example_value"] = torch.zeros(8, 8, dtype=torch.bool)
        y = g.call_method("add_", (x, 1)) if write else g.call_method("add", (x, 1))
        y.meta["example_value"] = torch.zeros(8, 8)
        out = g.call_method("masked_fill", (y, keep, 0.0))
        out.meta["example_value"] = torch.zeros(8, 8)
        g.output(out)
        return {a, m, keep, y, out}, [x], keep

    nodes, ext, keep = region(write=False)
    kept, ext2, values = verify._hoist_constants(nodes, ext)
    assert keep in values and keep in ext2 and keep not in kept
    assert torch.equal(values[keep], torch.arange(64).view(8, 8) > 5)
    nodes, ext, keep = region(write=True)
    assert verify._hoist_constants(nodes, ext) == (nodes, ext, {})


def test_hoisted_constants_go_to_the_region_device():
    """Hoisted constants are computed on the CPU (``masks.run_constant_nodes``); the
    region runs where its tensors live, so each value goes to its node's device (on a
    GPU, a CPU mask beside CUDA scores made every neighborhood site fail verification)."""
    import torch.fx as fx

    from attnfx.passes import verify

    g = fx.Graph()
    n = g.placeholder("mask")
    n.meta["example_value"] = torch.empty(4, 4, dtype=torch.bool, device="meta")
    moved = verify._on_device(torch.ones(4, 4, dtype=torch.bool), n)
    assert moved.device.type == "meta" and moved.dtype == torch.bool
    assert verify._on_device(3, n) == 3  # (a Python value stays as it is)
