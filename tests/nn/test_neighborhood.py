"""``attnfx.nn`` neighborhood attention: the window rule against a brute-force reading of
NATTEN's semantics (shifted inward when non-causal, truncated when causal, dilation groups,
strides, windows larger than the axis), on every combination of a small grid, and the
modules against a per-query loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from attnfx.nn import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnfx.nn.neighborhood import neighborhood_mask, relative_index


def _brute_axis(i: int, length: int, k: int, d: int, s: int, causal: bool) -> set[int]:
    """The neighbors of coordinate ``i`` on one axis, by enumeration: the query's dilation
    group, its stride-group leader; non-causal: of all runs of k consecutive group
    positions that contain the leader, the one placing it nearest offset k//2 (the whole
    group when it is shorter than k); causal: the k group positions ending at the leader,
    none past the query."""
    group = list(range(i % d, length, d))
    lg, ii = len(group), i // d
    if causal:
        lead = min((ii // s) * s + s - 1, lg - 1)
        return {group[j] for j in range(lg) if lead - k + 1 <= j <= lead and j <= ii}
    lead = min((ii // s) * s + s // 2, lg - 1)
    if k >= lg:
        return set(group)
    runs = [a for a in range(lg - k + 1) if a <= lead < a + k]
    best = min(runs, key=lambda a: abs((lead - a) - k // 2))
    return {group[j] for j in range(best, best + k)}


def _brute_mask(shape, ks, ds, ss, cs) -> torch.Tensor:
    n = math.prod(shape)
    coords = list(itertools.product(*(range(L) for L in shape)))
    keep = torch.zeros(n, n, dtype=torch.bool)
    for qi, qc in enumerate(coords):
        sets = [
            _brute_axis(c, L, k, d, s, cz) for c, L, k, d, s, cz in zip(qc, shape, ks, ds, ss, cs)
        ]
        for kj, kc in enumerate(coords):
            keep[qi, kj] = all(c in st for c, st in zip(kc, sets))
    return keep


def _windows(length, **kw):
    m = neighborhood_mask((length,), **kw)
    return [m[i].nonzero().flatten().tolist() for i in range(length)]


def test_hand_examples():
    """NATTEN's documented behaviour on an axis of 8."""
    assert _windows(8, kernel_size=3) == [
        [0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7], [5, 6, 7],
    ]  # fmt: skip
    even = _windows(8, kernel_size=4)  # 2 before, 1 after; shifted at the borders
    assert even[0] == [0, 1, 2, 3] and even[3] == [1, 2, 3, 4] and even[7] == [4, 5, 6, 7]
    dil = _windows(8, kernel_size=3, dilation=2)
    assert dil[0] == [0, 2, 4] and dil[6] == [2, 4, 6] and dil[3] == [1, 3, 5]
    causal = _windows(8, kernel_size=3, is_causal=True)
    assert causal[0] == [0] and causal[1] == [0, 1] and causal[5] == [3, 4, 5]
    strided = _windows(8, kernel_size=3, stride=2)  # pairs share their leader's window
    assert strided[2] == strided[3] == [2, 3, 4]
    assert _windows(4, kernel_size=7) == [[0, 1, 2, 3]] * 4  # larger than the axis


@pytest.mark.parametrize("length", [1, 5, 8, 13])
def test_1d_every_combination_matches_brute_force(length):
    for k, d, s, causal in itertools.product(
        (1, 2, 3, 4, 5, 7), (1, 2, 3), (1, 2, 3), (False, True)
    ):
        if s > k:
            continue  # GNA requires stride <= kernel size
        got = neighborhood_mask((length,), k, d, s, causal)
        want = _brute_mask((length,), (k,), (d,), (s,), (causal,))
        assert torch.equal(got, want), (length, k, d, s, causal)
        assert got.any(-1).all()  # no row is fully masked
        if not causal:  # exactly min(k, group length) keys per query
            sizes = [len(range(i % d, length, d)) for i in range(length)]
            assert got.sum(-1).tolist() == [min(k, g) for g in sizes]


@pytest.mark.parametrize(
    "shape,ks,ds,ss,cs",
    [
        ((6, 7), (3, 5), (1, 1), (1, 1), (False, False)),
        ((6, 7), (3, 4), (2, 1), (1, 2), (False, True)),
        ((5, 9), (7, 3), (1, 3), (1, 1), (True, False)),  # a window larger than an axis
        ((3, 4, 5), (3, 3, 3), (1, 2, 1), (1, 1, 2), (False, False, True)),
        ((4, 4, 4), (2, 5, 3), (1, 1, 1), (2, 1, 3), (True, False, False)),
    ],
)
def test_multi_dim_is_the_and_of_axes(shape, ks, ds, ss, cs):
    got = neighborhood_mask(shape, ks, ds, ss, cs)
    assert torch.equal(got, _brute_mask(shape, ks, ds, ss, cs))


def test_relative_index_within_the_table():
    shape, ks, ds = (7, 6), (3, 5), (1, 2)
    keep = neighborhood_mask(shape, ks, ds)
    idx = relative_index(shape, ks, ds)
    assert int(idx[keep].min()) >= 0 and int(idx[keep].max()) < (2 * 3 - 1) * (2 * 5 - 1)
    # the query itself is offset 0 on every axis: the table's centre
    centre = (3 - 1) * (2 * 5 - 1) + (5 - 1)
    assert (idx.diagonal() == centre).all()


def _loop_reference(mod, x):
    """Per query: softmax over its neighbor set only (no mask), in float64."""
    mod = mod.double()
    b, *spatial, c = x.shape
    shape, n = tuple(spatial), math.prod(spatial)
    h, dh = mod.num_heads, mod.head_dim
    qkv = mod.qkv(x.double().reshape(b, n, c)).view(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    keep = _brute_mask(shape, mod.kernel_size, mod.dilation, mod.stride, mod.is_causal)
    idx = relative_index(shape, mod.kernel_size, mod.dilation)
    out = torch.zeros_like(q)
    for i in range(n):
        js = keep[i].nonzero().flatten()
        s = (q[:, :, i : i + 1] @ k[:, :, js].transpose(-1, -2)) * dh**-0.5
        if mod.rpb is not None:
            s = s + mod.rpb.flatten(1)[:, idx[i, js]][None, :, None, :]
        out[:, :, i] = (s.softmax(-1) @ v[:, :, js])[:, :, 0]
    return mod.proj(out.transpose(1, 2).reshape(b, *shape, c))


@pytest.mark.parametrize(
    "cls,shape,kw",
    [
        (NeighborhoodAttention1D, (11,), dict(kernel_size=5, dilation=2)),
        (NeighborhoodAttention1D, (9,), dict(kernel_size=4, stride=2, is_causal=True)),
        (NeighborhoodAttention2D, (5, 6), dict(kernel_size=3, rel_pos_bias=True)),
        (NeighborhoodAttention2D, (6, 4), dict(kernel_size=(3, 5), is_causal=(True, False))),
        (NeighborhoodAttention3D, (3, 4, 4), dict(kernel_size=3, dilation=(1, 2, 1))),
    ],
)
def test_module_matches_a_per_query_loop(cls, shape, kw):
    torch.manual_seed(0)
    mod = cls(16, 2, **kw)
    x = torch.randn(2, *shape, 16)
    out = mod(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.double(), _loop_reference(mod, x), rtol=1e-5, atol=1e-5)


def test_module_gradients_and_bad_arguments():
    mod = NeighborhoodAttention2D(16, 2, kernel_size=3, rel_pos_bias=True)
    mod(torch.randn(1, 5, 5, 16)).sum().backward()
    assert mod.rpb.grad is not None and mod.rpb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="2 values"):
        NeighborhoodAttention2D(16, 2, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match=">= 1"):
        NeighborhoodAttention1D(16, 2, kernel_size=0)
    with pytest.raises(ValueError, match="multiple"):
        NeighborhoodAttention1D(15, 2, kernel_size=3)
    with pytest.raises(ValueError, match="spatial"):
        NeighborhoodAttention2D(16, 2, kernel_size=3)(torch.randn(1, 5, 16))
