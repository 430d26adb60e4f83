"""Sigmoid self-attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices
for Sigmoid Self-Attention", arXiv 2409.04431).

``out = σ(q·kᵀ/√d + b)·v`` with the bias ``b = −log n`` (n: the number of keys) that the
paper recommends to keep the attention norm of a sigmoid row comparable to softmax's at
initialization.  Edge semantics: no normalization, so a query row whose keys are all
masked (causal rows never are) outputs 0; the bias depends on the sequence length and is
computed from it at every call (as ``-log(tensor(n))``, which Dynamo keeps symbolic, so a
compiled model does not recompile per length).
"""

from __future__ import annotations

import torch
from torch import nn


class SigmoidAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        bias: float | None = None,
        qkv_bias: bool = True,
    ):
        """``bias=None`` uses ``−log n``; a float fixes the bias."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.bias = bias
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            self.qkv(x)
            .view(b, n, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
        if self.bias is None:
            scores = scores - torch.log(torch.tensor(n, dtype=torch.float32))
        else:
            scores = scores + self.bias
        if self.causal:
            i = torch.arange(n, device=x.device)
            scores = scores.masked_fill(i[None, :] > i[:, None], float("-inf"))
        out = torch.sigmoid(scores) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
