"""Neighborhood attention, 1-D/2-D/3-D (Hassani et al., "Neighborhood Attention
Transformer", CVPR 2023, arXiv 2204.07143; dilation: "Dilated Neighborhood Attention
Transformer", arXiv 2209.15001; stride: "Generalized Neighborhood Attention", arXiv
2504.16922), with NATTEN's window semantics.

Tokens sit on a grid (L_1, …, L_n), flattened row-major.  Per axis, with kernel size
``k``, dilation ``d``, stride ``s`` and ``causal``:

* a query at coordinate ``i`` only sees keys of its dilation group (``j % d == i % d``);
  in group coordinates (``i // d``, over the group's length ``L_g``) its window is
* non-causal: the ``k`` positions around the query's stride-group leader
  (``(i//d // s)·s + s//2``, at most ``L_g − 1``): ``k//2`` before it, ``k − 1 − k//2``
  after; **shifted inward** at the borders, not truncated, so every query sees exactly
  ``k`` keys per axis when ``L_g ≥ k``;
* causal: the ``k`` positions ending at the leader ``(i//d // s)·s + s − 1`` (at most
  ``L_g − 1``), truncated at the start and never past the query itself;
* a window larger than the axis (``k > L_g``) clamps to the whole axis.

A 2-D/3-D neighborhood is the AND of the per-axis conditions.  Edge semantics: every query
keeps at least one key (non-causal: its window has ``min(k, L_g)`` keys; causal: the window
ends at the query), so no row is fully masked; masked pairs are filled with ``-inf``.  The
optional relative position bias (NAT/DiNAT's RPB) is a learnable (H, 2k_1 − 1, …) table,
indexed per axis by the key's offset from the query in group coordinates
(``j//d − i//d + k − 1``, always within ``[0, 2k − 2]``).

The modules compute attention densely (an N×N masked score matrix), the way a researcher
would write it first: they are the references that attnfx recognizes and verifies against.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _tuple(x, n: int, name: str) -> tuple[int, ...]:
    t = tuple(x) if isinstance(x, (tuple, list)) else (x,) * n
    if len(t) != n:
        raise ValueError(f"{name} needs {n} values, got {t}")
    return t


def _bools(x, n: int) -> tuple[bool, ...]:
    return tuple(bool(b) for b in _tuple(x, n, "is_causal"))


def window(
    i: torch.Tensor, length: int, kernel_size: int, dilation: int = 1, stride: int = 1,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """[start, end) of each query coordinate ``i``'s window on one axis, in its dilation
    group's coordinates (key ``j`` is a neighbor iff ``j % d == i % d`` and
    ``start ≤ j // d < end``)."""
    k, d, s = kernel_size, dilation, stride
    g = i % d
    lg = (length - g + d - 1) // d  # the dilation group's length
    ii = i // d
    if causal:
        lead = torch.minimum((ii // s) * s + s - 1, lg - 1)
        start = (lead - (k - 1)).clamp(min=0)
        end = torch.minimum(ii + 1, lg)
        return start, end
    lead = torch.minimum((ii // s) * s + s // 2, lg - 1)
    start = torch.minimum((lead - k // 2).clamp(min=0), (lg - k).clamp(min=0))
    end = torch.minimum(start + k, lg)
    return start, end


def coordinates(shape: tuple[int, ...], device=None) -> list[torch.Tensor]:
    """Per axis, the coordinate of each flattened (row-major) position."""
    n = math.prod(shape)
    flat = torch.arange(n, device=device)
    out, step = [], n
    for length in shape:
        step //= length
        out.append((flat // step) % length)
    return out


def neighborhood_mask(
    shape: tuple[int, ...], kernel_size, dilation=1, stride=1, is_causal=False, device=None
) -> torch.Tensor:
    """(N, N) bool: query (row) and key (column) are neighbors; N = prod(shape)."""
    n = len(shape)
    ks, ds, ss = (_tuple(x, n, nm) for x, nm in ((kernel_size, "kernel_size"),
                  (dilation, "dilation"), (stride, "stride")))  # fmt: skip
    cs = _bools(is_causal, n)
    keep = torch.ones((), dtype=torch.bool, device=device)
    for c, length, k, d, s, causal in zip(coordinates(shape, device), shape, ks, ds, ss, cs):
        start, end = window(c, length, k, d, s, causal)
        qi, kj = c[:, None], c[None, :]
        keep = keep & (kj % d == qi % d)
        keep = keep & (kj // d >= start[:, None]) & (kj // d < end[:, None])
    return keep


def relative_index(shape: tuple[int, ...], kernel_size, dilation=1) -> torch.Tensor:
    """(N, N) int64 index into a flattened (2k_1 − 1, …) position-bias table: per axis the
    key's offset from the query in dilation-group coordinates, plus k − 1 (meaningful where
    the pair is in the neighborhood; clamped into the table elsewhere)."""
    n = len(shape)
    ks, ds = _tuple(kernel_size, n, "kernel_size"), _tuple(dilation, n, "dilation")
    idx = torch.zeros((), dtype=torch.long)
    for c, k, d in zip(coordinates(shape), ks, ds):
        rel = (c[None, :] // d - c[:, None] // d + k - 1).clamp(0, 2 * k - 2)
        idx = idx * (2 * k - 1) + rel
    return idx


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood self-attention over a ``dims``-dimensional token grid:
    input (B, *spatial, C), output the same shape."""

    dims = 0

    def __init__(
        self, dim: int, num_heads: int, kernel_size=7, dilation=1, stride=1, is_causal=False,
        rel_pos_bias: bool = False, qkv_bias: bool = True,
    ):  # fmt: skip
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        n = self.dims
        self.kernel_size = _tuple(kernel_size, n, "kernel_size")
        self.dilation = _tuple(dilation, n, "dilation")
        self.stride = _tuple(stride, n, "stride")
        self.is_causal = _bools(is_causal, n)
        for name, vals in (("kernel_size", self.kernel_size), ("dilation", self.dilation),
                           ("stride", self.stride)):  # fmt: skip
            if any(v < 1 for v in vals):
                raise ValueError(f"{name} must be >= 1, got {vals}")
        if rel_pos_bias and any(self.is_causal):
            raise ValueError("a relative position bias is defined for non-causal windows")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rpb = None
        if rel_pos_bias:
            table = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = nn.Parameter(torch.zeros(table))
            nn.init.trunc_normal_(self.rpb, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, c = x.shape
        if len(spatial) != self.dims:
            raise ValueError(f"expected (B, {self.dims} spatial dims, C), got {tuple(x.shape)}")
        shape = tuple(spatial)
        n = math.prod(shape)
        q, k, v = (
            self.qkv(x.reshape(b, n, c))
            .view(b, n, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if self.rpb is not None:
            idx = relative_index(shape, self.kernel_size, self.dilation).to(x.device)
            scores = scores + self.rpb.flatten(1)[:, idx]
        keep = neighborhood_mask(
            shape, self.kernel_size, self.dilation, self.stride, self.is_causal, x.device
        )
        scores = scores.masked_fill(~keep, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, *shape, c))


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over a sequence: (B, L, C)."""

    dims = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """Neighborhood attention over an image: (B, H, W, C)."""

    dims = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over a video or volume: (B, T, H, W, C)."""

    dims = 3
