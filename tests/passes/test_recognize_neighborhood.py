"""Neighborhood sites (``attnfx.passes.recognize.neighborhood``): masks that keep, per axis
of a token grid, an interval of keys around each query are reported as kind
``"neighborhood"`` with their grid and window; other masks keep their kind."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn as nn

import attnfx
from attnfx.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnfx.passes.recognize.neighborhood import Axis, classify
from attnfx.predicate import K, MaskPredicate, Q
from attnfx.testing import assert_rewrites_match_eager

NEG = float("-inf")


def _key(expr) -> str:
    return MaskPredicate(expr).to_key()


# ---------------------------------------------------------------------------------------
# Reading predicates
# ---------------------------------------------------------------------------------------


def test_sliding_window_is_one_axis():
    nb = classify(_key(sympy.And(K <= Q, K > Q - 4)), 32)
    assert nb.axes == (Axis(32, 4, 1, True),)
    nb = classify(_key(sympy.Abs(Q - K) <= 2), 32)
    assert nb.axes == (Axis(32, 5, 1, False),)


def test_chunks_are_a_grid_of_blocks():
    """``Q // 8 == K // 8``: a 4 x 8 grid, one block per query on the outer axis, the whole
    block on the inner one."""
    nb = classify(_key(sympy.Eq(sympy.floor(Q / 8), sympy.floor(K / 8))), 32)
    assert nb.axes == (Axis(4, 1, 1, False), Axis(8, 8, 1, False))
    assert nb.describe() == "neighborhood 2-D 4x8 k=(1,8)"


def test_truncated_band_as_wide_as_the_sequence_is_a_window():
    """``|Q - K| <= 2`` over 5 tokens keeps 3 keys in the border rows: a window, though
    2w+1 = N (fuzz: the band was labelled softmax); ``<= 4`` keeps every pair."""
    assert classify(_key(sympy.Abs(Q - K) <= 2), 5).axes == (Axis(5, 5, 1, False),)
    assert classify(_key(sympy.Abs(Q - K) <= 4), 5) is None
    assert classify(_key(sympy.And(K <= Q, K > Q - 4)), 5).axes == (Axis(5, 4, 1, True),)
    assert classify(_key(sympy.And(K <= Q, K > Q - 5)), 5) is None  # the whole past


def test_chunks_with_a_shorter_last_chunk():
    """``Q // 19 == K // 19`` over 24 tokens: chunks of 19 and 5 (fuzz: labelled softmax,
    the grid wanted 19 to divide 24); the ragged grid takes no tiled order."""
    nb = classify(_key(sympy.Eq(sympy.floor(Q / 19), sympy.floor(K / 19))), 24)
    assert nb.axes == (Axis(2, 1, 1, False), Axis(19, 19, 1, False))


@pytest.mark.parametrize(
    "expr",
    [
        sympy.Le(K, Q),  # causal: the whole past, not a window
        sympy.Eq(sympy.Mod(Q + K, 3), 0),  # not an interval per query
        sympy.Ne(Q, K),  # a hole in each row
        sympy.true,
    ],
    ids=["causal", "mod-sum", "not-self", "none"],
)
def test_other_predicates_are_not_neighborhoods(expr):
    assert classify(_key(expr), 32) is None


def test_non_separable_grid_predicate_is_refused():
    """Divisions by 8 make a 4 x 8 grid, but the predicate couples the axes."""
    expr = sympy.Le(sympy.floor(K / 8) + sympy.Mod(K, 8), sympy.floor(Q / 8) + sympy.Mod(Q, 8))
    assert classify(_key(expr), 32) is None


# ---------------------------------------------------------------------------------------
# Sites in models
# ---------------------------------------------------------------------------------------

C, H = 32, 2


def _explain(m, *inputs):
    return attnfx.explain(m.eval(), *inputs, options={"cpu": "always"})


@pytest.mark.parametrize(
    "cls, shape, kw, want",
    [
        (NeighborhoodAttention1D, (24,), dict(kernel_size=5), "neighborhood 1-D 24 k=(5)"),
        (
            NeighborhoodAttention1D,
            (32,),
            dict(kernel_size=5, dilation=2),
            "neighborhood 1-D 32 k=(5) d=(2)",
        ),
        (NeighborhoodAttention2D, (8, 6), dict(kernel_size=3), "neighborhood 2-D 8x6 k=(3,3)"),
        (
            NeighborhoodAttention2D,
            (8, 8),
            dict(kernel_size=(5, 3), stride=2, is_causal=(True, False)),
            "neighborhood 2-D 8x8 k=(5,3) causal=(1,0)",
        ),
        (
            NeighborhoodAttention3D,
            (4, 4, 4),
            dict(kernel_size=3, is_causal=(True, False, False)),
            "neighborhood 3-D 4x4x4 k=(3,3,3) causal=(1,0,0)",
        ),
    ],
    ids=["1d", "1d-dilated", "2d", "2d-gna-causal", "3d-causal"],
)
def test_reference_modules_are_neighborhood_sites(cls, shape, kw, want):
    torch.manual_seed(0)
    m = cls(C, H, **kw)
    x = torch.randn(2, *shape, C)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(m, [x], kind="neighborhood", options={"cpu": "always"})
    rep = _explain(m, x)
    (site,) = rep.rewritten
    assert site.kind == "neighborhood" and site.spec.kind == "neighborhood"
    assert site.mask == want, str(rep)
    assert want in str(rep) and rep.to_dict()["sites"][0]["mask"] == want


class Local(nn.Module):
    """A sliding window the way decoder code writes it (Mistral: causal and within W)."""

    def __init__(self, window=4, activation="softmax"):
        super().__init__()
        self.window, self.activation = window, activation

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        i = torch.arange(q.shape[-2], device=q.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
        s = s.masked_fill(~keep, NEG)
        p = torch.sigmoid(s) if self.activation == "sigmoid" else s.softmax(-1)
        return p @ v


def _qkv(n=32, d=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, 2, n, d, generator=g) for _ in range(3)]


def test_sliding_window_site():
    rep = _explain(Local(), *_qkv())
    (site,) = rep.rewritten
    assert site.kind == "neighborhood" and site.mask == "neighborhood 1-D 32 k=(4) causal=(1)"
    assert attnfx.counters.get("rewritten.neighborhood", 0) == 0  # explain counts apart
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(Local(), _qkv(), kind="neighborhood", options={"cpu": "always"})
    assert attnfx.counters["rewritten.neighborhood"] == 1


def test_sigmoid_window_stays_sigmoid():
    (site,) = _explain(Local(activation="sigmoid"), *_qkv()).rewritten
    assert site.kind == "sigmoid" and site.mask is None


class Causal(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        i = torch.arange(q.shape[-2], device=q.device)
        return s.masked_fill(i[None, :] > i[:, None], NEG).softmax(-1) @ v


def test_causal_and_tensor_masks_stay_softmax():
    (site,) = _explain(Causal(), *_qkv()).rewritten
    assert site.kind == "softmax"

    class TensorMask(nn.Module):
        def forward(self, q, k, v, keep):
            return (q @ k.transpose(-2, -1)).masked_fill(~keep, NEG).softmax(-1) @ v

    keep = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5
    keep |= torch.eye(32, dtype=torch.bool)
    rep = attnfx.explain(TensorMask(), *_qkv(), keep, options={"cpu": "always"})
    assert rep.rewritten[0].kind == "softmax"


# ---------------------------------------------------------------------------------------
# The tiled token order (multi-dimensional tiles)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, tile", [((8, 16), (4, 8)), ((4, 8, 6), (2, 4, 3))])
def test_layout_index_and_permutations_agree(lengths, tile):
    """``Layout.index`` (what the predicate is rewritten with) is the order the graph's
    unflatten/permute/flatten puts tokens in, and ``to_row_major`` undoes it."""
    from attnfx.passes.recognize.neighborhood import Layout

    lay = Layout(lengths, tile)
    n = math.prod(lengths)
    x = torch.arange(n).view(1, 1, n, 1)
    sizes, perm = lay.to_tiled()
    tiled = x.unflatten(2, sizes).permute(perm).flatten(2, 1 + len(sizes))
    assert torch.equal(tiled.flatten(), lay.index(torch.arange(n)))
    sizes, perm = lay.to_row_major()
    back = tiled.unflatten(2, sizes).permute(perm).flatten(2, 1 + len(sizes))
    assert torch.equal(back, x)
    i = sympy.Symbol("i", integer=True, nonnegative=True)
    expr = lay.index(i)
    assert [int(expr.subs(i, v)) for v in range(n)] == lay.index(torch.arange(n)).tolist()


def test_tiled_order_visits_exactly_the_2d_tile_pairs(monkeypatch):
    """A wide grid (8 x 64, k=5): in row-major order a 64-query kernel tile is one image
    row and its keys span 5 rows; in the tiled order it is an 8 x 8 block.  Where the op
    runs the generated kernels the site takes the tiled order: its density is the exact
    count of (8x8 query block, 8x8 key block) pairs with a kept pair, and the rewritten
    graph (q, k, v reordered, the predicate rewritten, the output put back) computes
    eager's output.  (The CPU path runs here, as if it were the kernels': the interpreter
    takes minutes on this predicate.)"""
    from attnfx.codegen.plan import configs
    from attnfx.nn.neighborhood import neighborhood_mask
    from attnfx.passes.recognize import neighborhood

    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(C, H, 5).eval()
    x = torch.randn(1, 8, 64, C)
    with torch.no_grad():
        attnfx.reset_counters()
        torch._dynamo.reset()
        assert_rewrites_match_eager(m, [x], kind="neighborhood")
        rep = attnfx.explain(m, x)
    (site,) = rep.rewritten
    assert site.mask == "neighborhood 2-D 8x64 k=(5,5)"
    cfg = configs(site.spec.resolved(C // H, C // H))["fwd"][0]
    bm, bn = cfg.BLOCK_M, cfg.BLOCK_N
    # the exact count, independently: tokens in 8x8 blocks, then kernel tiles of that order
    n = 8 * 64
    order = torch.arange(n).view(1, 8, 8, 8).permute(0, 2, 1, 3).flatten()
    keep = neighborhood_mask((8, 64), 5)
    pairs = keep[order][:, order].view(n // bm, bm, n // bn, bn).any(3).any(1)
    assert site.density == pytest.approx(pairs.float().mean().item())
    raster = keep.view(n // bm, bm, n // bn, bn).any(3).any(1)
    assert site.density < 0.75 * raster.float().mean().item()
    # without the kernels (the CPU paths), the program's order
    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: False)
    with torch.no_grad():
        (plain,) = attnfx.explain(m, x).rewritten
    assert plain.density == pytest.approx(raster.float().mean().item())


def test_ragged_grid_keeps_row_major_order(monkeypatch):
    """A 5 x 5 window over rows of 64 tokens, 504 tokens (the last row 56 long): an
    8 x 64 grid with a short last row.  The tiled order (whole 8x8 blocks) would visit
    fewer tiles but does not apply: the site runs in the program's order (reordering 504
    tokens as 512 failed inside the compiled graph)."""
    from attnfx.passes.recognize import neighborhood

    class Window(nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[-2])
            r, c = i // 64, i % 64
            keep = ((r[:, None] - r[None, :]).abs() <= 2) & ((c[:, None] - c[None, :]).abs() <= 2)
            s = (q @ k.transpose(-2, -1)).masked_fill(~keep, NEG)
            return s.softmax(-1) @ v

    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    q, k, v = (torch.randn(1, 1, 504, 16) for _ in range(3))
    with torch.no_grad():
        torch._dynamo.reset()
        assert_rewrites_match_eager(Window(), [q, k, v], kind="neighborhood")
        (site,) = attnfx.explain(Window(), q, k, v).rewritten
    assert site.mask == "neighborhood 2-D 8x64 k=(5,5)"


def test_grid_past_the_mask_verification_limit_is_a_neighborhood(monkeypatch):
    """The issue's shapes (2-D 128x128: 2^28 (query, key) pairs) are past the size at
    which a static mask used to be verified whole; it was refused ("mask too large to
    verify") and the site ran dense with an N² mask tensor.  With the limit lowered to
    make a 12 x 10 grid that large, the site is still read as a neighborhood."""
    from attnfx.passes import masks

    monkeypatch.setattr(masks, "_VERIFY_MAX_NUMEL", 1 << 10)
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(C, H, 5)
    x = torch.randn(1, 12, 10, C)
    torch._dynamo.reset()
    (site,) = _explain(m, x).rewritten
    assert site.mask == "neighborhood 2-D 12x10 k=(5,5)"


def test_relative_position_bias_takes_the_tiled_order(monkeypatch):
    """NAT's relative position bias (a (H, N, N) gather of its (H, 2k-1, 2k-1) table) is
    put in the tiled order with q, k, v (both of its token dims), so a site with one
    visits the 2-D tiles too; outputs and the gradients of the inputs and of the table
    match eager's."""
    from attnfx.passes.recognize import neighborhood

    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(C, H, 5, rel_pos_bias=True)
    with torch.no_grad():
        m.rpb.normal_()  # (a bias that matters: the init's std 0.02 barely moves scores)
    x = torch.randn(1, 8, 64, C)
    attnfx.reset_counters()
    torch._dynamo.reset()
    # (inner "eager": inductor's order of the projections' sums is not under test)
    assert_rewrites_match_eager(
        m, [x], kind="neighborhood", grad=True, grad_idx=(0,), params=True,
        options={"inner": "eager"},
    )  # fmt: skip
    with torch.no_grad():
        (site,) = attnfx.explain(m, x).rewritten
    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: False)
    with torch.no_grad():
        (plain,) = attnfx.explain(m, x).rewritten
    assert site.density < 0.75 * plain.density  # the tiled order was taken
    assert any(op.op == "add_table_aux" for op in site.spec.score_ops)  # with the bias


def test_position_expression_takes_the_tiled_order(monkeypatch):
    """An ALiBi-style bias (per-head slope times K - Q, an index expression: no N×N
    tensor) on a 2-D window: in the tiled order its expression is rewritten on the
    permuted indices like the predicate (left as it was, the verifier rejects the
    site)."""
    from attnfx.passes.recognize import neighborhood

    class Window(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("slopes", torch.tensor([0.5, 0.25]).view(1, 2, 1, 1))

        def forward(self, q, k, v):
            i = torch.arange(q.shape[-2])
            r, c = i // 64, i % 64
            keep = ((r[:, None] - r[None, :]).abs() <= 2) & ((c[:, None] - c[None, :]).abs() <= 2)
            s = q @ k.transpose(-2, -1) + self.slopes * (i[None, :] - i[:, None])
            return s.masked_fill(~keep, NEG).softmax(-1) @ v

    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    torch._dynamo.reset()
    assert_rewrites_match_eager(Window(), [q, k, v], kind="neighborhood")
    with torch.no_grad():
        (site,) = attnfx.explain(Window(), q, k, v).rewritten
    assert any(op.op == "add_pos_aux" for op in site.spec.score_ops)
    (pos,) = [op for op in site.spec.score_ops if op.op == "add_pos_aux"]
    assert pos.expr != MaskPredicate(K - Q).to_key()  # on tiled positions


def test_tile_shaped_like_the_window(monkeypatch):
    """A window much taller than wide ((15, 3) on 32x128) takes blocks shaped like it
    (16x4, ``shaped_tile``) when they visit fewer tile pairs than 8x8 blocks; a square
    window keeps 8x8.  Outputs and gradients match eager in that order."""
    from attnfx.passes.recognize import neighborhood

    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    torch.manual_seed(0)
    m = NeighborhoodAttention2D(C, H, (15, 3))
    x = torch.randn(1, 32, 128, C)
    torch._dynamo.reset()
    with torch.no_grad():
        (site,) = attnfx.explain(m, x).rewritten
    monkeypatch.setattr(neighborhood, "shaped_tile", lambda nb: None)
    torch._dynamo.reset()
    with torch.no_grad():
        (square,) = attnfx.explain(m, x).rewritten
    assert site.density < 0.9 * square.density, (site.density, square.density)
    monkeypatch.undo()
    monkeypatch.setattr(neighborhood, "_runs_kernels", lambda device: True)
    seen = []
    real = neighborhood._choose_layout

    def spy(s, nb):
        real(s, nb)
        seen.append(s.layout)

    monkeypatch.setattr(neighborhood, "_choose_layout", spy)
    attnfx.reset_counters()
    torch._dynamo.reset()
    assert_rewrites_match_eager(
        m, [x], kind="neighborhood", grad=True, grad_idx=(0,), options={"inner": "eager"}
    )
    assert seen and all(lay is not None and lay.tile == (16, 4) for lay in seen)
    nb = neighborhood.Neighborhood(tuple(neighborhood.Axis(96, 13, 1, False) for _ in range(2)))
    assert neighborhood.shaped_tile(nb) is None  # a square window: 8x8
