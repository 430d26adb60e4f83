"""Routed sparse attention (Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based
Sparse Attention with Routing Transformers", TACL 2021, arXiv 2003.05997).

Queries and keys are routed to ``C`` clusters by online spherical k-means over
L2-normalized vectors: each routed head keeps ``C`` centroids (a buffer, not a
parameter).  Every cluster takes the ``w`` tokens most similar to its centroid (top-w:
the clusters are balanced, every one has exactly ``w`` members, sorted by position),
and attends within itself::

    members_c = topk(⟨x̂, μ_c⟩ over tokens, w)                  sorted by position
    s       = q[members_c] · k[members_c]ᵀ / √d                 (w × w per cluster)
    s       = -inf where pos_q < pos_k                          (causal, original positions)
    s       = -5e4 where pos_q == pos_k                         (shared QK: not oneself,
                                                                 unless nothing else)
    o_c     = softmax(s) · v[members_c]
    out[t]  = mean of o_c over the clusters that chose t;  0 when none did

Edge semantics, as this module computes them (and the ``routed`` rewrite preserves):

* **Duplicates**: a token chosen by several clusters gets the mean of their outputs
  (``scatter_add`` of the outputs divided by the number of clusters that chose it).
* **Uncovered tokens**: a token chosen by no cluster gets exactly 0 from the routed heads
  (the local heads, when there are any, still see it).  Its q/k/v get no gradient from
  the routed heads.
* **Fully masked rows**: none.  With ``shared_qk`` (the default when ``causal``) every
  query is among its own cluster's keys, so a causal row always keeps itself (its -5e4
  fill is finite: alone, it takes all the weight; beside any visible key, none).  Causal
  routing with separate query and key clusters could leave a query with no visible key
  (the reference code prepends learned memory keys for that); this module refuses it.
* Routing is not differentiable: the gradient flows through the gathered q, k, v only.
  In training the module records its routed vectors; ``update_kmeans()``, called outside
  the compiled forward (after each ``backward``, like the optimizer step), moves each centroid
  by an exponential moving average toward the normalized mean of the vectors assigned to
  it (nearest centroid).  ``aux_loss`` holds the commitment loss of the last training
  forward (``commitment · MSE(x̂, sg(μ_assigned))``), to be added to the model's loss.
* Membership is not causal (top-w compares a token with the whole sequence), as in the
  paper's training setup; only the attention inside a cluster is masked.

``local_heads`` of the heads are local instead (the paper mixes both): causal or
symmetric sliding windows of ``local_window`` keys, written as a masked softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_SELF_VALUE = -5e4  # the shared-QK self score (Reformer's value)


def cluster_members(x: torch.Tensor, means: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, C, w): each centroid's ``window`` most similar tokens (cosine), in position
    order.  ``x``: (B, H, N, D); ``means``: (H, C, D)."""
    xn = F.normalize(x.detach(), dim=-1)
    sim = torch.einsum("bhnd,hcd->bhcn", xn, means.to(xn.dtype))
    return sim.topk(window, dim=-1).indices.sort(dim=-1).values


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qi: torch.Tensor,
    ki: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    self_value: float | None = None,
) -> torch.Tensor:
    """Attention within clusters, written as the Routing Transformer's code writes it:
    rows of q (``qi``) and of k, v (``ki``), (B, H, C, w) indices, gathered; scores
    ``scale``-d, filled with -inf where a query comes before its key (``causal``) and with
    ``self_value`` where they are the same token; softmax, ``@ v``; outputs
    ``scatter_add``-ed back to the query rows and divided by how many clusters chose each
    (1 for none: an unchosen token is 0)."""
    b, h, n, _ = q.shape
    c, w = qi.shape[-2], qi.shape[-1]

    def gather(t, idx):
        flat = idx.reshape(b, h, c * w, 1).expand(b, h, c * w, t.shape[-1])
        return t.gather(2, flat).reshape(b, h, c, w, t.shape[-1])

    s = gather(q, qi) @ gather(k, ki).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(qi.unsqueeze(-1) < ki.unsqueeze(-2), float("-inf"))
    if self_value is not None:
        s = s.masked_fill(qi.unsqueeze(-1) == ki.unsqueeze(-2), self_value)
    o = s.softmax(dim=-1) @ gather(v, ki)  # (B, H, C, w, Dv)
    flat = qi.reshape(b, h, c * w)
    dv = v.shape[-1]
    out = torch.zeros_like(v).scatter_add(
        2, flat.unsqueeze(-1).expand(b, h, c * w, dv), o.reshape(b, h, c * w, dv)
    )
    count = torch.zeros(b, h, n, dtype=v.dtype, device=v.device).scatter_add(
        2, flat, torch.ones_like(flat, dtype=v.dtype)
    )
    return out / count.clamp(min=1).unsqueeze(-1)


class RoutedAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window: int | None = None,
        num_clusters: int = 4,
        causal: bool = False,
        shared_qk: bool | None = None,
        local_heads: int = 0,
        local_window: int = 64,
        ema_decay: float = 0.999,
        commitment: float = 1e-4,
        qkv_bias: bool = False,
    ):
        """``window``: members per cluster (w; None: ceil(N / num_clusters) for a sequence
        of N tokens, balanced clusters that cover it on average); ``shared_qk=None``:
        shared when causal."""
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        if not 0 <= local_heads < num_heads:
            raise ValueError(f"local_heads must be in [0, {num_heads}), got {local_heads}")
        shared_qk = causal if shared_qk is None else shared_qk
        if causal and not shared_qk:
            raise ValueError(
                "causal routing with separate query and key clusters can leave a query with "
                "no visible key; use shared_qk=True"
            )
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.window, self.num_clusters = window, num_clusters
        self.causal, self.shared_qk = causal, shared_qk
        self.local_heads, self.local_window = local_heads, local_window
        self.ema_decay, self.commitment = ema_decay, commitment
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = None if shared_qk else nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        routed = num_heads - local_heads
        means = F.normalize(torch.randn(routed, num_clusters, self.head_dim), dim=-1)
        self.register_buffer("means", means)
        self.aux_loss: torch.Tensor | None = None
        self._recorded: torch.Tensor | None = None  # the last training forward's vectors

    # -- k-means ---------------------------------------------------------------------------
    def _members(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hr, C, w): each cluster's top-w tokens, in position order."""
        n = x.shape[-2]
        w = self.window if self.window else -(-n // self.num_clusters)
        return cluster_members(x, self.means, w)

    @torch.no_grad()
    def update_kmeans(self) -> None:
        """One EMA step of every routed head's centroids toward the vectors the last training
        forward recorded (its routed queries, and keys unless shared); call it outside the
        compiled forward, after each backward.  A no-op when nothing was recorded since."""
        if self._recorded is None:
            return
        hr, c, d = self.means.shape
        # the recorded (B, Hr, N, D) as (Hr, B·N, D)
        x = self._recorded.transpose(0, 1).reshape(hr, -1, d)
        x = F.normalize(x.float(), dim=-1)
        self._recorded = None
        idx = torch.einsum("hmd,hcd->hmc", x, self.means.float()).argmax(dim=-1)  # nearest
        sums = torch.zeros(hr, c, d, dtype=torch.float32, device=x.device)
        sums.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), x)
        used = torch.zeros(hr, c, dtype=torch.float32, device=x.device)
        used.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        new = F.normalize(sums, dim=-1)
        keep = (used == 0).unsqueeze(-1)  # a centroid nobody chose stays where it is
        new = torch.where(keep, self.means.float(), new)
        m = self.means.float() * self.ema_decay + new * (1 - self.ema_decay)
        self.means.copy_(F.normalize(m, dim=-1).to(self.means.dtype))

    # -- attention --------------------------------------------------------------------------
    def _routed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qi = self._members(q)
        ki = qi if self.shared_qk else self._members(k)
        self_value = TOKEN_SELF_VALUE if self.shared_qk else None
        scale = q.shape[-1] ** -0.5
        return routed_attention(q, k, v, qi, ki, scale, causal=self.causal, self_value=self_value)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        rel = i[:, None] - i[None, :]  # query minus key position
        if self.causal:
            hide = (rel < 0) | (rel >= self.local_window)
        else:
            hide = rel.abs() > self.local_window // 2
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return s.masked_fill(hide, float("-inf")).softmax(dim=-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        hd, nh = self.head_dim, self.num_heads

        def heads(t):
            return t.view(b, n, nh, hd).transpose(1, 2)

        q = heads(self.to_q(x))
        k = F.normalize(q, dim=-1) if self.shared_qk else heads(self.to_k(x))
        v = heads(self.to_v(x))
        lh = self.local_heads
        routed_q, routed_k = q[:, lh:], k[:, lh:]
        if self.training:
            xr = torch.cat([routed_q, routed_k], dim=2) if not self.shared_qk else routed_q
            # one attribute replaced per forward (a growing list would be a guard that
            # recompiles the compiled forward at every step)
            self._recorded = xr.detach()
            xn = F.normalize(xr, dim=-1)
            sim = torch.einsum("bhnd,hcd->bhnc", xn.detach(), self.means.to(xn.dtype))
            nearest = self.means.to(xn.dtype)[
                torch.arange(self.means.shape[0], device=x.device)[None, :, None],
                sim.argmax(dim=-1),
            ]
            self.aux_loss = F.mse_loss(xn, nearest) * self.commitment
        out = self._routed(routed_q, routed_k, v[:, lh:])
        if lh:
            out = torch.cat([self._local(q[:, :lh], k[:, :lh], v[:, :lh]), out], dim=1)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))
