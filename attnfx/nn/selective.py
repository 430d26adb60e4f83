"""Selective attention (Zhang et al., NeurIPS 2024, "Selective Attention: Enhancing
Transformer through Principled Context Control", arXiv 2411.12892).

Softmax attention whose queries (and, optionally, values) are scaled per token by a
temperature ``τ`` made of a token term and a position term::

    τ_q = 1 + tanh(W_q·x) + λ_q·log(1 + i)        (per head; i: the query position)
    out = softmax((τ_q ⊙ q)·kᵀ/√d, masked) · (τ_v ⊙ v)

Initialization gives ``τ ≡ 1`` (``W = 0``, ``λ = 0``), so the module can be grafted onto a
softmax checkpoint without changing its outputs.  Edge semantics: ``τ`` may become ≤ 0
during training; it is applied as written (a negative temperature flips the ranking, as
it would in eager).  A causal row always keeps its own key, so no row is fully masked.
"""

from __future__ import annotations

import torch
from torch import nn


class SelectiveAttention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, *, causal: bool = True, value_temperature: bool = False
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.tau_q = nn.Linear(dim, num_heads, bias=False)
        self.pos_q = nn.Parameter(torch.zeros(num_heads))
        self.tau_v = nn.Linear(dim, num_heads, bias=False) if value_temperature else None
        nn.init.zeros_(self.tau_q.weight)
        if self.tau_v is not None:
            nn.init.zeros_(self.tau_v.weight)

    def temperature(
        self, x: torch.Tensor, proj: nn.Linear, pos: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, H, N, 1): 1 + tanh(W·x) [+ λ·log(1 + i)]."""
        t = 1 + torch.tanh(proj(x))  # (B, N, H)
        if pos is not None:
            i = torch.arange(x.shape[1], device=x.device, dtype=x.dtype)
            t = t + pos * torch.log1p(i)[:, None]
        return t.transpose(1, 2).unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, n, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        q = q * self.temperature(x, self.tau_q, self.pos_q)
        if self.tau_v is not None:
            v = v * self.temperature(x, self.tau_v, None)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        if self.causal:
            i = torch.arange(n, device=x.device)
            scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
