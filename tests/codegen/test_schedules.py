"""Schedules: which (query tile, key tile) pairs the kernels visit.

The ``tiles`` schedule (host tile map from the mask predicate) against a brute-force
materialization of the mask, and its kernels under Triton's interpreter: equal to the
reference forward and backward, visiting exactly the non-empty tiles (counted by tracing
the interpreted inner loops), with the density the report gives.
"""

from __future__ import annotations

import collections
import contextlib
import linecache
import math
import sys

import pytest
import sympy
import torch
from test_kernels import check, make_spec

from attnfx import codegen, ops
from attnfx.codegen import tiles
from attnfx.codegen.plan import INTERPRET_CONFIG, ScheduleKind
from attnfx.predicate import NK, NQ, K, MaskPredicate, Q
from attnfx.spec import ScoreOp

NEG_INF = -math.inf


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("ATTNFX_INTERPRET", "1")
    monkeypatch.setenv("ATTNFX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnfx-cache"))


def chunked(c: int):
    """Chunked causal attention (block-diagonal causal): Q // c == K // c and K <= Q."""
    return sympy.And(sympy.Eq(sympy.floor(Q / c), sympy.floor(K / c)), sympy.Le(K, Q))


def sinks_window(n_sinks: int, window: int):
    """The first keys (attention sinks) for every query, besides a causal window."""
    return sympy.Or(sympy.Lt(K, n_sinks), sympy.And(sympy.Le(K, Q), sympy.Lt(Q - K, window)))


def _spec(pred, **kw):
    key = MaskPredicate(pred).to_key()
    return make_spec(
        score_ops=[ScoreOp("mul", 0.25), ScoreOp("fill_pred", NEG_INF, pred=key)], **kw
    )


def _brute_states(pred, nq, nk, bm, bn) -> torch.Tensor:
    kept = MaskPredicate(pred).materialize(nq, nk)
    rows, cols = -(-nq // bm), -(-nk // bn)
    out = torch.empty((rows, cols), dtype=torch.int8)
    for r in range(rows):
        for c in range(cols):
            t = kept[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn]
            out[r, c] = tiles.FULL if t.all() else tiles.PARTIAL if t.any() else tiles.EMPTY
    return out


PREDICATES = {
    "chunked64": chunked(64),
    "chunked24": chunked(24),
    "sinks_window": sinks_window(4, 256),
    "sinks_window40": sinks_window(4, 40),
    "bottom_right": sympy.Le(K, Q + NK - NQ),
    "mod": sympy.Eq(sympy.Mod(Q, 3), sympy.Mod(K, 3)),
    "abs": sympy.Le(sympy.Abs(Q - K), 37),
    "block_causal": sympy.Le(sympy.floor(K / 4), sympy.floor(Q / 4)),
    "not_or": sympy.Not(sympy.Or(sympy.Gt(K, Q), sympy.Lt(K, Q - 50))),
    "min_max": sympy.Le(sympy.Max(K, 10), sympy.Min(Q + 5, NK - 3)),
}


@pytest.mark.parametrize("name", sorted(PREDICATES))
@pytest.mark.parametrize(
    "nq,nk,bm,bn", [(300, 300, 16, 16), (257, 513, 64, 32), (100, 37, 128, 64), (1, 1, 16, 16)]
)
def test_tile_states_are_exact(name, nq, nk, bm, bn):
    pred = PREDICATES[name]
    got = tiles.tile_states(MaskPredicate(pred).to_key(), nq, nk, bm, bn)
    assert torch.equal(got, _brute_states(pred, nq, nk, bm, bn))


@pytest.mark.parametrize("transposed", [False, True])
def test_tile_lists_partial_then_full_ascending(transposed):
    pred = chunked(24)
    nq, nk, bm, bn = 150, 140, 16, 32
    states = _brute_states(pred, nq, nk, bm, bn)
    lists = tiles.tile_lists(MaskPredicate(pred).to_key(), nq, nk, bm, bn, transposed)
    if transposed:
        states, (n_cols, b_cols) = states.t(), (nq, bm)
    else:
        n_cols, b_cols = nk, bn
    off, idx = lists.off.tolist(), lists.idx.tolist()
    assert lists.off.dtype == lists.idx.dtype == torch.int32
    assert len(off) == 2 * states.shape[0] + 1
    for r in range(states.shape[0]):
        partial, full = idx[off[2 * r] : off[2 * r + 1]], idx[off[2 * r + 1] : off[2 * r + 2]]
        assert partial == sorted(partial) and full == sorted(full)
        ragged = n_cols % b_cols != 0
        want_full = [
            c
            for c in range(states.shape[1])
            if states[r, c] == tiles.FULL and not (ragged and c == states.shape[1] - 1)
        ]
        assert full == want_full  # a full tile past the length is walked as partial
        nonempty = [c for c in range(states.shape[1]) if states[r, c] != tiles.EMPTY]
        assert sorted(partial + full) == nonempty


def test_tile_states_long_sequences_are_cheap():
    # interval arithmetic decides the tiles off the chunk boundaries at once
    key = MaskPredicate(sinks_window(4, 256)).to_key()
    states = tiles.tile_states(key, 65536, 65536, 128, 64)
    assert states.shape == (512, 1024)
    band = (states != tiles.EMPTY).sum().item()
    assert band < 512 * 8  # sinks + the window's few tiles per query tile


# -- which schedule -------------------------------------------------------------------------


def test_plan_chooses_tiles_for_other_predicates():
    for pred in (chunked(64), sinks_window(4, 256)):
        plan = codegen.make_plan(_spec(pred))
        assert plan.schedule.kind is ScheduleKind.TILES and plan.can_skip
        src = codegen.generate_source(_spec(pred), "fwd")
        assert "_tile_range(TileOff, pid_m)" in src and "_block_range(" not in src


def test_band_specs_keep_the_band():
    causal = sympy.Le(K, Q)
    stream = sympy.And(sympy.Le(K, Q), sympy.Or(sympy.Gt(K, Q - 256), sympy.Lt(K, 4)))
    for pred in (causal, stream, sympy.And(sympy.Ge(K, Q - 3), sympy.Le(K, Q + 2))):
        plan = codegen.make_plan(_spec(pred))
        assert plan.schedule.kind is ScheduleKind.BAND and plan.can_skip
    plain = codegen.make_plan(make_spec())
    assert plain.schedule.kind is ScheduleKind.BAND and not plain.can_skip


def test_finite_fill_predicate_is_not_skipped():
    # a finite fill keeps rows that lose every key uniform: skipping would change them
    key = MaskPredicate(chunked(64)).to_key()
    spec = make_spec(score_ops=[ScoreOp("fill_pred", -1e30, pred=key)])
    assert codegen.make_plan(spec).schedule.kind is ScheduleKind.BAND
    assert not codegen.make_plan(spec).can_skip


# -- the kernels visit exactly the non-empty tiles ----------------------------------------------

_LOOPS = {  # inner function -> its per-tile first line (the tile's offsets)
    "_attn_fwd_inner": ("offs_n = start_n", "offs_m", "start_n"),
    "_attn_bwd_dq_inner": ("offs_n = start_n", "offs_m", "start_n"),
    "_attn_bwd_dkdv_inner": ("offs_m = start_m", "offs_n", "start_m"),
}


@contextlib.contextmanager
def visited_tiles():
    """Record, per inner function, the (row tile start, column tile start) of every tile
    the interpreted kernels walk (one line event per visit)."""
    seen: dict[str, list] = collections.defaultdict(list)

    def in_loop(frame, event, arg):
        if event == "line":
            name = frame.f_code.co_name
            head, rows, col = _LOOPS[name]
            text = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if text.startswith(head):
                row0 = int(frame.f_locals[rows].handle.data.reshape(-1)[0])
                col0 = int(frame.f_locals[col].handle.data.reshape(-1)[0])
                seen[name].append((row0, col0))
        return in_loop

    def on_call(frame, event, arg):
        return in_loop if frame.f_code.co_name in _LOOPS else None

    old = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield seen
    finally:
        sys.settrace(old)


def _nonempty(pred, nq, nk, bm, bn) -> list[tuple[int, int]]:
    st = _brute_states(pred, nq, nk, bm, bn)
    return sorted((int(r) * bm, int(c) * bn) for r, c in torch.nonzero(st).tolist())


CASES = {
    "chunked64": (chunked(64), 150, 150),
    "chunked24": (chunked(24), 100, 90),
    "sinks_window40": (sinks_window(4, 40), 130, 130),
    "sinks_window_cross": (sinks_window(5, 20), 70, 100),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiles_kernels_match_reference_and_visit_nonempty_tiles(name):
    pred, nq, nk = CASES[name]
    spec = _spec(pred, group=2)
    assert codegen.make_plan(spec).schedule.kind is ScheduleKind.TILES
    with visited_tiles() as seen:
        check(spec, b=1, hk=1, nq=nq, nk=nk)
    bm, bn = INTERPRET_CONFIG.BLOCK_M, INTERPRET_CONFIG.BLOCK_N
    want = _nonempty(pred, nq, nk, bm, bn)
    heads = spec.gqa_group  # the forward and dQ run per query head; dK/dV loop over them
    assert sorted(seen["_attn_fwd_inner"]) == sorted(want * heads)
    assert sorted(seen["_attn_bwd_dq_inner"]) == sorted(want * heads)
    assert sorted((m, n) for n, m in seen["_attn_bwd_dkdv_inner"]) == sorted(want * heads)
    n_tiles = -(-nq // bm) * -(-nk // bn)
    assert tiles.visited(spec, nq, nk, bm, bn) == (len(want), n_tiles)
    assert tiles.density(spec, nq, nk, bm, bn) == len(want) / n_tiles
    assert len(want) < n_tiles  # something was skipped


def test_tiles_fp16_sigmoid_and_aux():
    # the schedule with an aux bias, fp16, and the sigmoid activation (exact 0 at -inf)
    key = MaskPredicate(chunked(24)).to_key()
    ops_ = [
        ScoreOp("mul", 0.25),
        ScoreOp("add_aux", aux=0),
        ScoreOp("fill_pred", NEG_INF, pred=key),
    ]
    spec = make_spec(dtype="float16", score_ops=ops_, aux_dtypes=("float16",))
    assert codegen.make_plan(spec).schedule.kind is ScheduleKind.TILES
    bias = torch.randn(1, 1, 60, 50, generator=torch.Generator().manual_seed(3)).half()
    check(spec, nq=60, nk=50, aux=[bias])
    sig = make_spec(score_ops=[ScoreOp("fill_pred", NEG_INF, pred=key)], act="sigmoid")
    assert codegen.make_plan(sig).schedule.kind is ScheduleKind.TILES
    check(sig, nq=60, nk=50)


def test_tiles_with_a_learned_sink():
    # gpt-oss style: each head's sink logit starts the online softmax; rows that keep no
    # key (queries < 20) attend to the sink alone
    key = MaskPredicate(sympy.And(sympy.Ge(Q, 20), chunked(16))).to_key()
    ops_ = [ScoreOp("mul", 0.25), ScoreOp("fill_pred", NEG_INF, pred=key)]
    spec = make_spec(score_ops=ops_, aux_dtypes=["float32"], group=2, sink=0)
    assert codegen.make_plan(spec).schedule.kind is ScheduleKind.TILES
    sinks = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(5)) * 3
    check(spec, hk=1, nq=45, nk=40, aux=[sinks])


def test_tiles_fully_masked_rows():
    # rows that keep no key: NaN (preserve) or 0 (zero), with their tiles never visited
    pred = sympy.And(sympy.Ge(Q, 20), chunked(16))
    check(_spec(pred), nq=50, nk=50)
    check(_spec(pred, fm="zero"), nq=50, nk=50)
    # nothing kept at all: empty lists, no tile visited
    nothing = sympy.And(sympy.Gt(K, Q + 100), sympy.Eq(sympy.Mod(K, 2), 0))
    assert tiles.tile_lists(MaskPredicate(nothing).to_key(), 30, 30, 16, 16).visited == 0
    with visited_tiles() as seen:
        check(_spec(nothing), nq=30, nk=30)
        check(_spec(nothing, fm="zero"), nq=30, nk=30)
    assert not seen


def test_band_visits_match_the_count():
    # the band's host count (the report's density) is what the kernels walk
    causal = sympy.Le(K, Q)
    stream = sympy.And(sympy.Le(K, Q), sympy.Or(sympy.Gt(K, Q - 40), sympy.Lt(K, 3)))
    bm, bn = INTERPRET_CONFIG.BLOCK_M, INTERPRET_CONFIG.BLOCK_N
    for pred, nq, nk in ((causal, 70, 70), (stream, 100, 100)):
        spec = _spec(pred)
        with visited_tiles() as seen:
            check(spec, nq=nq, nk=nk, bwd=False)
        fwd = seen["_attn_fwd_inner"]
        assert len(set(fwd)) == len(fwd)
        assert tiles.visited(spec, nq, nk, bm, bn)[0] == len(fwd)
        assert set(_nonempty(pred, nq, nk, bm, bn)) <= set(fwd)


def test_density_reported_for_causal_and_chunked():
    causal = _spec(sympy.Le(K, Q), d=64, dtype="float16")
    d = tiles.density(causal, 4096, 4096)
    assert 0.5 < d < 0.6
    # block-diagonal chunks of C = 256 keys: C / N of the tiles; causal inside the chunks
    # (128 x 64 tiles): 6 of each chunk's 8 tiles
    block_diag = _spec(sympy.Eq(sympy.floor(Q / 256), sympy.floor(K / 256)), d=64, dtype="float16")
    assert tiles.density(block_diag, 4096, 4096) == 256 / 4096
    chunk = _spec(chunked(256), d=64, dtype="float16")
    assert tiles.density(chunk, 4096, 4096) == 0.75 * 256 / 4096
    assert tiles.density(make_spec(d=64, dtype="float16"), 4096, 4096) == 1.0


def test_op_runs_tiles_schedule_through_autograd():
    spec = _spec(chunked(24))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=g).requires_grad_() for _ in range(3))
    before = dict(codegen.LAUNCHES)
    out = ops.attention(q, k, v, spec)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert codegen.LAUNCHES["bwd_dkdv"] == before.get("bwd_dkdv", 0) + 1  # the kernels ran
    ref = ops.reference_attention(q, k, v, [], spec)[0]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    want = ops.reference_attention_backward(dout, q, k, v, [], spec)
    for got, w in zip(grads, want, strict=True):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-3)


def test_aux_operands_are_read_as_they_vary():
    """The launcher reads each aux tensor's broadcast from its strides (a per-query
    temperature, a key-padding mask, a length scalar, a full bias), and the kernels load a
    vector where it is one: a row of repeated values per score was as costly as the scores
    (static report: the temperature forward at 2.2x the softmax bound, 1 CTA per SM)."""
    import torch

    from attnfx import ops
    from attnfx.codegen import cache
    from attnfx.codegen.launch import aux_broadcast, with_aux_broadcast
    from attnfx.spec import AttentionSpec, ScoreOp

    q, k = torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 7, 8)
    shapes = {"row": (2, 3, 5, 1), "col": (2, 1, 1, 7), "one": (), "full": (1, 1, 5, 7)}
    spec = AttentionSpec(
        score_ops=tuple(ScoreOp("add_aux", aux=i) for i in range(4)),
        aux_dtypes=("float32",) * 4,
        head_dim=8,
        head_dim_v=8,
    )
    aux = ops.broadcast_aux(q, k, [torch.zeros(s) for s in shapes.values()], spec)
    assert [aux_broadcast(a) for a in aux] == list(shapes)
    spec = with_aux_broadcast(spec, aux)
    assert spec.aux_bcast == tuple(shapes)
    assert AttentionSpec.from_key(spec.key) == spec
    src = cache.get_source(spec, "fwd")
    assert "a0 = tl.load(A0 + offs_m[:, None] * stride_a0m, mask" in src
    assert "a1 = tl.load(A1 + offs_n[None, :] * stride_a1n, mask" in src
    assert "a2 = tl.load(A2)" in src
    assert "a3 = tl.load(A3 + offs_m[:, None] * stride_a3m + offs_n[None, :] * stride_a3n" in src
    with pytest.raises(ValueError, match="one pattern per aux"):
        AttentionSpec(aux_dtypes=("float32",), aux_bcast=("row", "col"))


def test_a_constant_and_a_vector_multiplier_multiply_the_tile_once():
    """``s * c * tau`` with tau per query: the product c * tau (and log2(e)) is taken on
    the vector; the tile is multiplied once."""
    from attnfx.codegen import cache
    from attnfx.spec import AttentionSpec, ScoreOp

    for order in (
        (ScoreOp("mul", 0.125), ScoreOp("mul_aux", aux=0)),
        (ScoreOp("mul_aux", aux=0), ScoreOp("mul", 0.125)),
    ):
        spec = AttentionSpec(score_ops=order, aux_dtypes=("float32",), aux_bcast=("row",))
        src = cache.get_source(spec, "fwd")
        assert "s = s * (a0.to(tl.float32) * 0.18033688011112042)" in src, src
        assert "s = s * 0.18033688011112042" not in src
        full = cache.get_source(AttentionSpec(score_ops=order, aux_dtypes=("float32",)), "fwd")
        assert "s = s * (a0" not in full  # a tile of aux values: two multiplies, as before


# -- neighborhood attention in the tiled token order ----------------------------------------


def _natten(lengths, k):
    """NATTEN's window over a row-major grid (borders shifted inward), as a predicate."""
    from attnfx.nn.neighborhood import neighborhood_mask

    conds, stride = [], 1
    for ln in reversed(lengths):
        q, kk = sympy.Mod(sympy.floor(Q / stride), ln), sympy.Mod(sympy.floor(K / stride), ln)
        start = sympy.Min(ln - k, sympy.Max(0, q - k // 2))
        conds += [sympy.Ge(kk, start), sympy.Lt(kk, start + k)]
        stride *= ln
    pred = sympy.And(*conds)
    n = math.prod(lengths)
    assert torch.equal(MaskPredicate(pred).materialize(n, n), neighborhood_mask(lengths, k))
    return MaskPredicate(pred).to_key()


def _tiled(lengths, k):
    from attnfx.passes.recognize.neighborhood import TILE, Layout

    return MaskPredicate.from_key(Layout(lengths, TILE[len(lengths)]).permuted(_natten(lengths, k)))


def test_tiled_neighborhood_predicate_is_simplified_and_its_tile_map_exact():
    """In the tiled order the coordinates of a 64-token tile are an 8x8 box.  The
    permuted predicate, simplified inside the grid (``within_lengths``), reads each
    coordinate as a ``//`` and ``%`` of the position: the kernel's partial tiles print
    less integer code than ``P(index(Q), index(K))`` as substituted (40% fewer sympy
    ops), and the tile map (full tiles decided by interval arithmetic) is exact."""
    from attnfx.codegen.printer import index_expr
    from attnfx.passes.recognize.neighborhood import Layout

    pred = _tiled((64, 64), 21)
    n = 64 * 64
    lay = Layout((64, 64), (8, 8))
    plain = MaskPredicate.from_key(_natten((64, 64), 21)).expr
    plain = plain.xreplace({Q: lay.index(Q), K: lay.index(K)})
    got = tiles.tile_states(pred.to_key(), n, n, 64, 64)
    assert torch.equal(got, _brute_states(pred.expr, n, n, 64, 64))
    assert torch.equal(got, tiles.tile_states(MaskPredicate(plain).to_key(), n, n, 64, 64))
    assert (got == tiles.FULL).sum() > 0
    assert sympy.count_ops(pred.expr) < 0.65 * sympy.count_ops(plain)  # 79 against 131
    assert len(index_expr(pred.expr)) < 0.7 * len(index_expr(plain))


def test_tiled_neighborhood_kernels_visit_exactly_the_nonempty_tiles(monkeypatch):
    """The issue's check: 2-D 32x32, k=7, 8x8 tiles (64-token kernel tiles of the tiled
    order).  The interpreted forward, dQ and dK/dV walk exactly the (query tile, key
    tile) pairs with a kept pair, their results equal the reference, and the density
    the report gives is that count over all pairs."""
    from attnfx.codegen import plan as plan_mod

    monkeypatch.setattr(plan_mod, "INTERPRET_CONFIG", plan_mod.Config(64, 64, 1, 1))
    pred = _tiled((32, 32), 7)
    spec = _spec(pred.expr)
    assert codegen.make_plan(spec).schedule.kind is ScheduleKind.TILES
    n = 32 * 32
    with visited_tiles() as seen:
        check(spec, nq=n, nk=n)
    want = _nonempty(pred.expr, n, n, 64, 64)
    assert sorted(seen["_attn_fwd_inner"]) == want
    assert sorted(seen["_attn_bwd_dq_inner"]) == want
    assert sorted((m, k) for k, m in seen["_attn_bwd_dkdv_inner"]) == want
    assert tiles.density(spec, n, n, 64, 64) == len(want) / 256


def test_causal_bands_start_with_the_heaviest_query_tiles():
    """Under a band open to the left a query tile's work grows with its index: forward and
    dQ programs take the query tiles last to first (the interpreter runs programs in id
    order, as a GPU starts them); dK/dV's key tiles, heaviest first already, and bands
    closed on both sides keep the natural order."""
    from attnfx.codegen import emit

    nq = nk = 70
    window = sympy.And(sympy.Ge(K, Q - 20), sympy.Le(K, Q))
    for pred, reversed_ in ((sympy.Le(K, Q), True), (sympy.Le(K, Q + NK - NQ), True),
                            (window, False), (sinks_window(3, 20), False)):  # fmt: skip
        spec = _spec(pred)
        plan = codegen.make_plan(spec)
        assert emit.heavy_last(spec, plan) is reversed_, pred
        with visited_tiles() as seen:
            check(spec, nq=nq, nk=nk)
        for name in ("_attn_fwd_inner", "_attn_bwd_dq_inner"):
            rows = [r for r, _ in seen[name]]
            first_rows = list(dict.fromkeys(rows))  # query tiles in the order first walked
            want = sorted(first_rows, reverse=reversed_)
            assert first_rows == want, (pred, name, first_rows)
        keys = list(dict.fromkeys(n for n, _ in seen["_attn_bwd_dkdv_inner"]))
        assert keys == sorted(keys), (pred, keys)
    # a forward over 64 head dims keeps the natural order (at its register cap the
    # reversed index spilled); its dQ does not
    wide = _spec(sympy.Le(K, Q), d=128)
    reverse = "pid_m = tl.num_programs(0) - 1 - tl.program_id(0)"
    assert reverse not in emit.source(wide, "fwd") and reverse in emit.source(wide, "bwd")
