"""Masks in Dynamo graphs read back as predicates (attnfx.passes.masks)."""

from __future__ import annotations

import operator

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfx.codegen.printer import index_expr
from attnfx.passes.masks import analyze_mask
from attnfx.predicate import NK, NQ, K, MaskPredicate, Q

NEG = float("-inf")


def _sites(fn, *inputs, dynamic=False):
    """Compile ``fn`` (a function or an nn.Module) with a capturing backend; for each
    ``torch.where(m, s, v)`` / ``s.masked_fill(m, v)`` / ``(q @ kᵀ) + m`` in graph order,
    analyze ``m`` against the scores ``s``."""
    gms = []

    def capture(gm, example_inputs):
        gms.append(gm)
        return gm.forward

    torch._dynamo.reset()
    expected = fn(*inputs)
    got = torch.compile(fn, backend=capture, dynamic=dynamic, fullgraph=True)(*inputs)
    torch.testing.assert_close(got, expected)
    (gm,) = gms
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "masked_fill":
            mask, scores = n.args[1], n.args[0]
        elif n.op == "call_function" and n.target is torch.where:
            mask, scores = n.args[0], n.args[1]
        elif n.target is operator.add and n.args[0].target is operator.matmul:
            mask, scores = n.args[1], n.args[0]  # an additive mask
        else:
            continue
        shape = scores.meta["example_value"].shape
        out.append(analyze_mask(mask, shape[-2], shape[-1]))
    return out


def _one(fn, *inputs, dynamic=False):
    (a,) = _sites(fn, *inputs, dynamic=dynamic)
    return a


def _scores(q, k):
    return q @ k.transpose(-1, -2)


def _where(keep):
    """A module body that keeps ``keep(nq, nk, q)`` (a mask builder) via torch.where."""

    def fn(q, k):
        s = _scores(q, k)
        return torch.where(keep(q.shape[-2], k.shape[-2]), s, NEG)

    return fn


def _qk(nq=6, nk=6):
    return torch.randn(2, 3, nq, 4), torch.randn(2, 3, nk, 4)


def _grid(nq, nk):
    return torch.arange(nq)[:, None], torch.arange(nk)[None, :]


def _check(a, nq, nk, expected):
    assert a.predicate is not None, a.reason
    torch.testing.assert_close(a.predicate.materialize(nq, nk), expected.expand(nq, nk))
    # the predicate survives serialization and prints as Triton
    assert MaskPredicate.from_key(a.predicate.to_key()) == a.predicate
    index_expr(a.predicate.expr)


def _ar(n):
    return torch.arange(n)


# ---------------------------------------------------------------------------------------
# causal and its spellings
# ---------------------------------------------------------------------------------------

CAUSAL = {
    "index[:,None]>=": lambda nq, nk: _ar(nq)[:, None] >= _ar(nk)[None, :],
    "unsqueeze": lambda nq, nk: _ar(nq).unsqueeze(-1) >= _ar(nk).unsqueeze(0),
    "view": lambda nq, nk: _ar(nq).view(-1, 1) >= _ar(nk).view(1, -1),
    "<= flipped": lambda nq, nk: _ar(nk)[None, :] <= _ar(nq)[:, None],
    "not >": lambda nq, nk: ~(_ar(nk)[None, :] > _ar(nq)[:, None]),
    "< + 1": lambda nq, nk: _ar(nk)[None, :] < _ar(nq)[:, None] + 1,
    "tril ones bool": lambda nq, nk: torch.tril(torch.ones(nq, nk, dtype=torch.bool)),
    "ones.tril().bool()": lambda nq, nk: torch.ones(nq, nk).tril().bool(),
    "ones.tril() == 1": lambda nq, nk: torch.ones(nq, nk).tril() == 1,
    "4d view": lambda nq, nk: torch.tril(torch.ones(nq, nk, dtype=torch.bool)).view(1, 1, nq, nk),
    "[None, None]": lambda nq, nk: (_ar(nq)[:, None] >= _ar(nk))[None, None, :, :],
    "logical_not triu": lambda nq, nk: torch.logical_not(torch.ones(nq, nk).triu(diagonal=1)),
    "triu.T": lambda nq, nk: torch.ones(nk, nq, dtype=torch.bool).triu().T,
    "expand": lambda nq, nk: (_ar(nq)[:, None] >= _ar(nk)).expand(2, 3, nq, nk),
}


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_forms(name):
    a = _one(_where(CAUSAL[name]), *_qk())
    q, k = _grid(6, 6)
    _check(a, 6, 6, k <= q)
    assert a.predicate.mask_class.describe() == "causal"
    assert a.predicate.mask_class.kind == "causal"
    assert a.value is None or a.value == 1.0


def test_strict_and_masked_fill_complement():
    def fn(q, k):
        s = _scores(q, k)
        n = q.shape[-2]
        s = s.masked_fill(torch.triu(torch.ones(n, n), diagonal=1).bool(), NEG)
        s = s.masked_fill(_ar(n)[:, None] < _ar(n)[None, :], NEG)
        return torch.where(_ar(n)[:, None] > _ar(n)[None, :], s, 0.0)

    a, b, c = _sites(fn, *_qk())
    q, k = _grid(6, 6)
    for x in (a, b):  # the masked-out set: strictly above the diagonal
        _check(x, 6, 6, k > q)
        assert x.predicate.mask_class.kind == "window"  # K - Q >= 1, unbounded above
    _check(c, 6, 6, k < q)
    assert c.predicate.mask_class.describe() == "causal(offset=-1)"


@pytest.mark.parametrize("diag", [-2, 0, 3])
def test_tril_triu_diagonals(diag):
    def fn(q, k):
        s = _scores(q, k)
        n = q.shape[-2]
        s = torch.where(torch.ones(n, n, dtype=torch.bool).tril(diagonal=diag), s, NEG)
        return s.masked_fill(torch.triu(torch.ones(n, n), diagonal=diag) == 0, NEG)

    a, b = _sites(fn, *_qk())
    q, k = _grid(6, 6)
    _check(a, 6, 6, k - q <= diag)
    assert a.predicate.mask_class.describe() == (
        "causal" if diag == 0 else f"causal(offset={diag})"
    )
    _check(b, 6, 6, k - q < diag)


# ---------------------------------------------------------------------------------------
# windows, boolean algebra, block masks
# ---------------------------------------------------------------------------------------


def test_sliding_window_forms():
    W = 3

    def fn(q, k):
        s = _scores(q, k)
        i = _ar(q.shape[-2])
        d = i[:, None] - i[None, :]
        s = torch.where((d >= 0) & (d < W), s, NEG)
        s = torch.where(torch.abs(i[:, None] - i[None, :]) <= W, s, NEG)
        s = s.masked_fill((d < 0) | (d >= W), NEG)
        s = torch.where(torch.logical_and(d >= 0, torch.logical_not(d >= W)), s, NEG)
        s = s.masked_fill(torch.logical_or(d < -1, d > 1), NEG)
        return s

    a, b, c, d, e = _sites(fn, *_qk(9, 9))
    q, k = _grid(9, 9)
    _check(a, 9, 9, (q - k >= 0) & (q - k < W))
    assert a.predicate.mask_class.describe() == f"window(left={W - 1}, right=0)"
    _check(b, 9, 9, (q - k).abs() <= W)
    assert b.predicate.mask_class.describe() == f"window(left={W}, right={W})"
    _check(c, 9, 9, (q - k < 0) | (q - k >= W))
    _check(d, 9, 9, (q - k >= 0) & (q - k < W))
    assert d.predicate.mask_class.describe() == f"window(left={W - 1}, right=0)"
    _check(e, 9, 9, (q - k).abs() > 1)


def test_block_local_floordiv_and_mod():
    C = 4

    def fn(q, k):
        s = _scores(q, k)
        i = _ar(q.shape[-2])
        s = torch.where(i[:, None] // C == i[None, :] // C, s, NEG)
        s = torch.where(
            (i[:, None] // C >= i[None, :] // C) & (i[:, None] % 2 == i[None, :] % 2), s, NEG
        )
        s = torch.where(
            torch.div(i[:, None] + 1, C, rounding_mode="floor") == torch.remainder(i[None, :], 3),
            s,
            NEG,
        )
        return s

    a, b, c = _sites(fn, *_qk(11, 11))
    q, k = _grid(11, 11)
    _check(a, 11, 11, q // C == k // C)
    assert a.predicate.mask_class.kind == "predicate"
    assert a.predicate.expr == sympy.Eq(sympy.floor(Q / C), sympy.floor(K / C))
    _check(b, 11, 11, (q // C >= k // C) & (q % 2 == k % 2))
    _check(c, 11, 11, (q + 1) // C == k % 3)
    # indices are never negative: floored and truncating division agree, and by a power
    # of two it is a shift (the floor fix stays for terms that may be negative)
    assert index_expr(c.predicate.expr) == "(((1 + offs_m[:, None]) >> 2) == (offs_n[None, :] % 3))"
    assert "_floordiv" in index_expr(sympy.floor((K - Q) / C))


def test_clamp_and_xor():
    def fn(q, k):
        s = _scores(q, k)
        i = _ar(q.shape[-2])
        s = torch.where(i[None, :] <= torch.clamp(i[:, None], min=2, max=5), s, NEG)
        s = torch.where((i[:, None] >= i[None, :]) ^ (i[None, :] == 0), s, NEG)
        return s

    a, b = _sites(fn, *_qk(8, 8))
    q, k = _grid(8, 8)
    _check(a, 8, 8, k <= q.clamp(2, 5))
    _check(b, 8, 8, (q >= k) ^ (k == 0))


def test_additive_float_mask():
    def fn(q, k):
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        bias = torch.zeros(n, n).masked_fill(~causal, NEG)
        return _scores(q, k) + bias  # bias != 0: the masked-out set

    _, a = _sites(fn, *_qk())
    q, k = _grid(6, 6)
    _check(a, 6, 6, k > q)
    assert a.value == NEG


# ---------------------------------------------------------------------------------------
# query and key lengths that differ; symbolic sizes
# ---------------------------------------------------------------------------------------


def _bottom_right(q, k):
    s = _scores(q, k)
    nq, nk = q.shape[-2], k.shape[-2]
    s = torch.where(_ar(nk)[None, :] <= _ar(nq)[:, None] + (nk - nq), s, NEG)
    s = s.masked_fill(torch.ones(nq, nk).tril(diagonal=nk - nq) == 0, NEG)
    s = torch.where(torch.arange(nk - nq, nk)[:, None] >= _ar(nk)[None, :], s, NEG)
    return s


@pytest.mark.parametrize("dynamic", [False, True])
def test_bottom_right_causal(dynamic):
    a, b, c = _sites(_bottom_right, *_qk(5, 9), dynamic=dynamic)
    q, k = _grid(5, 9)
    for x in (a, c):
        _check(x, 5, 9, k <= q + 4)
        offset = NK - NQ if dynamic else 4
        assert x.predicate.mask_class == x.predicate.mask_class.__class__("causal", None, offset)
    _check(b, 5, 9, k > q + 4)
    if dynamic:
        for x in (a, b, c):
            assert x.predicate.expr.free_symbols == {Q, K, NQ, NK}
            # exact at other sizes too
            qq, kk = _grid(3, 10)
            torch.testing.assert_close(x.predicate.materialize(3, 10), (kk <= qq + 7) ^ (x is b))


def test_dynamic_arange_of_shape():
    def fn(x):
        s = x @ x.transpose(-1, -2)
        i = torch.arange(x.shape[1])
        j = torch.arange(0, x.shape[1], 1)
        s = torch.where(i[:, None] >= j[None, :], s.unsqueeze(0), NEG)
        return s

    a = _one(fn, torch.randn(2, 7, 4), dynamic=True)
    assert a.predicate is not None, a.reason
    assert a.predicate.expr.free_symbols <= {Q, K, NQ, NK}
    assert a.predicate.mask_class.describe() == "causal"
    names = {n.name for n in a.nodes}
    assert {"i", "j"} <= names
    assert all(n.op != "placeholder" for n in a.nodes)


def test_arange_start_step_symbolic():
    def fn(q, k):
        s = _scores(q, k)
        nq, nk = q.shape[-2], k.shape[-2]
        qpos = torch.arange(nk - nq, nk)  # query positions at the end of the keys
        kpos = torch.arange(0, 2 * nk, 2)  # even positions
        s = torch.where(kpos[None, :] <= 2 * qpos[:, None] - nk // 2, s, NEG)
        s = torch.where(torch.arange(3, nq + 3)[:, None] > torch.arange(nk)[None, :], s, NEG)
        return s

    a, b = _sites(fn, *_qk(4, 10), dynamic=True)
    for x in (a, b):
        assert x.predicate is not None, x.reason
        assert x.predicate.expr.free_symbols <= {Q, K, NQ, NK}
    q, k = _grid(4, 10)
    _check(a, 4, 10, 2 * k <= 2 * (q + 6) - 5)
    _check(b, 4, 10, q + 3 > k)
    # and at another size, by the formula (checked eagerly only at the traced size)
    q, k = _grid(6, 13)
    torch.testing.assert_close(a.predicate.materialize(6, 13), 2 * k <= 2 * (q + 7) - 6)


def test_key_padding_style_rank1():
    def fn(q, k):
        s = _scores(q, k)
        return torch.where(_ar(k.shape[-2]) < 4, s, NEG)

    a = _one(fn, *_qk(3, 7))
    q, k = _grid(3, 7)
    _check(a, 3, 7, k < 4)


def test_slicing_a_big_causal_mask():
    def fn(q, k):
        n = q.shape[-2]
        big = torch.tril(torch.ones(16, 16, dtype=torch.bool))
        return torch.where(big[None, None, 2 : 2 + n, :n], _scores(q, k), NEG)

    a = _one(fn, *_qk())
    q, k = _grid(6, 6)
    _check(a, 6, 6, k <= q + 2)


def test_dead_nodes():
    def fn(q, k):
        s = _scores(q, k)
        i = _ar(q.shape[-2])
        causal = i[:, None] >= i[None, :]
        s = torch.where(causal, s, NEG)
        return s + i.float().sum()  # i stays alive

    a = _one(fn, *_qk())
    names = {n.name for n in a.nodes}
    assert "causal" in names and "i" not in names


# ---------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------


def test_refuses_tensor_input_mask():
    def fn(q, k, mask):
        return _scores(q, k).masked_fill(~mask, NEG)

    a = _one(fn, *_qk(), torch.rand(6, 6) > 0.5)
    assert a.predicate is None and "L_mask_" in a.reason


def test_refuses_buffer_mask():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.tril(torch.ones(6, 6, dtype=torch.bool)))

        def forward(self, q, k):
            return _scores(q, k).masked_fill(~self.bias, NEG)

    a = _one(M(), *_qk())
    assert a.predicate is None and "bias" in a.reason


def test_refuses_mixed_with_tensor():
    def fn(q, k, lengths):
        i = _ar(k.shape[-2])
        keep = (i[None, None, :] < lengths[:, None, None]) & (i[:, None] >= i[None, :])
        return torch.where(keep[:, None], _scores(q, k), NEG)

    a = _one(fn, *_qk(), torch.tensor([3, 6]))
    assert a.predicate is None and "L_lengths_" in a.reason


def test_refuses_batch_dependent():
    def fn(q, k):
        i = _ar(q.shape[-2])
        b = _ar(q.shape[0]).view(-1, 1, 1, 1)
        return torch.where(i[:, None] + b >= i[None, :], _scores(q, k), NEG)

    a = _one(fn, *_qk())
    assert a.predicate is None and "batch/head" in a.reason


def test_refuses_unknown_op_and_foreign_size():
    def fn(q, k, x):
        i = _ar(q.shape[-2])
        s = _scores(q, k)
        s = torch.where(torch.cumsum(i, 0)[:, None] >= i[None, :], s, NEG)
        s = torch.where(i[:, None] >= i[None, :] - x.shape[0], s, NEG)
        return s

    a, b = _sites(fn, *_qk(), torch.randn(3), dynamic=True)
    assert a.predicate is None and "cumsum" in a.reason
    assert b.predicate is None and "neither" in b.reason


def test_refuses_in_place_mutation_seen_elsewhere():
    def fn(q, k):
        n = q.shape[-2]
        m = torch.ones(n, n, dtype=torch.bool)
        keep = m & m
        m.tril_()
        return torch.where(keep & m, _scores(q, k), NEG)

    a = _one(fn, *_qk())
    assert a.predicate is None and "in place" in a.reason


def test_verification_catches_a_wrong_reading(monkeypatch):
    import attnfx.passes.masks as masks

    def fn(q, k):
        i = _ar(q.shape[-2])
        return torch.where(i[:, None] >= i[None, :], _scores(q, k), NEG)

    monkeypatch.setitem(masks._RELS, "ge", sympy.Gt)  # a deliberately wrong semantics
    a = _one(fn, *_qk())
    assert a.predicate is None and a.reason == "predicate disagrees with materialized mask"


# ---------------------------------------------------------------------------------------
# property test: random compositions, checked exhaustively on small grids
# ---------------------------------------------------------------------------------------

_LEAVES = [
    lambda i, j, n, m: i[:, None] >= j[None, :],
    lambda i, j, n, m: torch.tril(torch.ones(n, m, dtype=torch.bool), diagonal=1),
    lambda i, j, n, m: torch.ones(n, m).triu(-1) > 0,
    lambda i, j, n, m: (i[:, None] - j[None, :]).abs() <= 2,
    lambda i, j, n, m: i[:, None] // 3 == j[None, :] // 3,
    lambda i, j, n, m: (i[:, None] + j[None, :]) % 4 != 1,
    lambda i, j, n, m: j[None, :] < torch.clamp(i[:, None] * 2 - 1, min=0),
    lambda i, j, n, m: torch.where(i[:, None] > 2, j[None, :] >= 1, j[None, :] == i[:, None]),
]
_BINOPS = [operator.and_, operator.or_, operator.xor, torch.logical_and, torch.logical_or]


@st.composite
def _programs(draw):
    def tree(depth):
        if depth == 0 or draw(st.booleans()):
            leaf = draw(st.integers(0, len(_LEAVES) - 1))
            return ("leaf", leaf, draw(st.booleans()))
        return ("op", draw(st.integers(0, len(_BINOPS) - 1)), tree(depth - 1), tree(depth - 1))

    return tree(2), draw(st.integers(1, 7)), draw(st.integers(1, 7))


def _build(prog, i, j, n, m):
    if prog[0] == "leaf":
        x = _LEAVES[prog[1]](i, j, n, m)
        return ~x if prog[2] else x
    return _BINOPS[prog[1]](_build(prog[2], i, j, n, m), _build(prog[3], i, j, n, m))


@settings(max_examples=30, deadline=None)
@given(_programs())
def test_random_compositions_match_eager(args):
    prog, nq, nk = args

    def fn(q, k):
        mask = _build(prog, _ar(q.shape[-2]), _ar(k.shape[-2]), q.shape[-2], k.shape[-2])
        return torch.where(mask, _scores(q, k), NEG)

    a = _sites(fn, *_qk(nq, nk))[-1]  # leaves may hold a torch.where of their own
    assert a.predicate is not None, a.reason
    expected = _build(prog, _ar(nq), _ar(nk), nq, nk)
    # exhaustive on the grid (independent of the analysis' own verification)
    torch.testing.assert_close(a.predicate.materialize(nq, nk), expected.expand(nq, nk))


def test_module_with_kv_cache_bottom_right():
    """An nn.Module whose key length is a sum of sizes (cache + new): NK = s0 + s1."""

    class Attn(torch.nn.Module):
        def forward(self, q, past, new):
            k = torch.cat([past, new], dim=-2)
            nq, nk = q.shape[-2], k.shape[-2]
            s = q @ k.transpose(-1, -2)
            m = torch.arange(nk)[None, :] <= torch.arange(nk - nq, nk)[:, None]
            return torch.where(m[None, None], s, NEG).softmax(-1)

    q, past, new = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 3, 4)
    a = _one(Attn(), q, past, new, dynamic=True)
    assert a.predicate is not None, a.reason
    assert a.predicate.mask_class.describe() == "causal(offset=NK - NQ)"
    qq, kk = _grid(3, 8)
    _check(a, 3, 8, kk <= qq + 5)


# ---------------------------------------------------------------------------------------
# static masks larger than the verification limit: checked a block of rows at a time
# ---------------------------------------------------------------------------------------


def _small_limit(monkeypatch, numel=256):
    """The size limit lowered, so that a (40, 40) mask takes the row-blocked check."""
    from attnfx.passes import masks

    monkeypatch.setattr(masks, "_VERIFY_MAX_NUMEL", numel)
    return masks


@pytest.mark.parametrize("name", [n for n in CAUSAL if n != "triu.T"])
def test_large_static_masks_are_checked_by_row_blocks(monkeypatch, name):
    """Static sizes past the limit used to be refused ("mask too large to verify"): the
    site then ran with an N² mask tensor.  Each causal spelling (fills, tril/triu, casts,
    views, expands over the large tensor) is now run in blocks of query rows.  (A
    transposed large tensor is not row-wise: ``triu.T`` stays refused, with the reason.)"""
    masks = _small_limit(monkeypatch)
    calls = []
    real = masks._compare_rows
    monkeypatch.setattr(masks, "_compare_rows", lambda *a: calls.append(a[2]) or real(*a))
    a = _one(_where(CAUSAL[name]), *_qk(40, 40))
    q, k = _grid(40, 40)
    _check(a, 40, 40, k <= q)
    rows = torch.cat(calls)
    assert len(calls) > 1 and torch.equal(rows, torch.arange(40))  # every row, in blocks


def test_very_large_static_masks_check_the_edges_and_a_draw_of_rows(monkeypatch):
    """Past the all-rows budget, the first and last rows and a seeded draw of the others
    are checked (each block against the predicate)."""
    masks = _small_limit(monkeypatch)
    monkeypatch.setattr(masks, "_VERIFY_ALL_ROWS_PAIRS", 1000)
    monkeypatch.setattr(masks, "_VERIFY_EDGE_ROWS", 4)
    monkeypatch.setattr(masks, "_VERIFY_SAMPLED_ROWS", 6)
    calls = []
    real = masks._compare_rows
    monkeypatch.setattr(masks, "_compare_rows", lambda *a: calls.append(a[2]) or real(*a))
    a = _one(_where(CAUSAL["ones.tril().bool()"]), *_qk(40, 40))
    _check(a, 40, 40, _grid(40, 40)[1] <= _grid(40, 40)[0])
    rows = set(torch.cat(calls).tolist())
    assert {0, 1, 2, 3, 36, 37, 38, 39} <= rows and 8 < len(rows) <= 14


def test_large_static_window_of_coordinates_is_checked(monkeypatch):
    """A 2-D window over an 8 x 5 grid, built from ``//`` and ``%`` coordinates."""
    _small_limit(monkeypatch)

    def keep(nq, nk):
        i = _ar(nq)
        r, c = i // 5, i % 5
        return ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 2)

    a = _one(_where(keep), *_qk(40, 40))
    _check(a, 40, 40, keep(40, 40))


def test_row_blocked_check_refuses_a_wrong_predicate(monkeypatch):
    """The check is real: a symbolic reading made wrong (tril read one diagonal off) is
    refused on the row blocks, as the whole-tensor check refuses it."""
    masks = _small_limit(monkeypatch)
    real = masks._HANDLERS["tril"]

    def off_by_one(name, args, kwargs, shape, dtype):
        return real(name, args, {**kwargs, "diagonal": 1}, shape, dtype)

    monkeypatch.setitem(masks._HANDLERS, "tril", off_by_one)
    a = _one(_where(CAUSAL["tril ones bool"]), *_qk(40, 40))
    assert a.predicate is None and a.reason == "predicate disagrees with materialized mask"


def test_row_blocked_check_refuses_what_is_not_row_wise(monkeypatch):
    """A large tensor reduced along the query axis, or transposed, is not row-wise over
    a block of rows: that mask stays a tensor, with the reason."""
    _small_limit(monkeypatch)
    a = _one(_where(CAUSAL["triu.T"]), *_qk(40, 40))
    assert a.predicate is None and a.reason == "mask too large to verify"

    def keep(nq, nk):
        wide = _ar(nq)[:, None] >= _ar(nk)[None, :]
        return wide & wide.any(-2, keepdim=True)

    a = _one(_where(keep), *_qk(40, 40))
    assert a.predicate is None
    assert "too large to verify" in a.reason or "not understood" in a.reason
