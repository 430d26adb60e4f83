"""Neighborhood sites (``attnfx.passes.recognize.neighborhood``): masks that keep, per axis
of a token grid, an interval of keys around each query are reported as kind
``"neighborhood"`` with their grid and window; other masks keep their kind."""

from __future__ import annotations

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
