"""``--to routed``: routing attention's centroids (Roy et al., "Efficient Content-Based
Sparse Attention with Routing Transformers", TACL 2021, arXiv 2003.05997), initialized by
k-means on calibration activations.

Per layer and head, the queries and keys the source model computes on the calibration
batch (unit-normalized, as the routing compares directions) are clustered into
``clusters`` centroids by k-means (k-means++ seeding, Lloyd iterations, seeded): the
layer gains ``centroids`` (H, C, D).  A loaded layer routes each head's tokens to its
centroids and attends within clusters of ceil(N / C) tokens (``attnfx.convert.hf``), the
form the routed recognizer rewrites; the drift is large until the model is fine-tuned.
"""

from __future__ import annotations

import torch

from attnfx.convert.base import ConvertError, Plan, Source


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 25) -> torch.Tensor:
    """(k, D) centroids of the rows of ``x`` (M, D); deterministic given ``seed``."""
    x = x.double()
    m = x.shape[0]
    if m < k:
        raise ConvertError(
            f"k-means: {m} calibration vectors for {k} clusters (use a larger --calib)"
        )
    g = torch.Generator().manual_seed(seed)
    first = int(torch.randint(m, (1,), generator=g))
    cents = [x[first]]
    d2 = ((x - cents[0]) ** 2).sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            idx = int(torch.randint(m, (1,), generator=g))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=g))
        cents.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(-1))
    c = torch.stack(cents)
    for _ in range(iters):
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ c.T + (c * c).sum(-1)
        onehot = torch.nn.functional.one_hot(d2.argmin(-1), k).to(x.dtype)  # (M, k)
        new = onehot.T @ x
        count = onehot.sum(0)
        empty = count == 0
        new = torch.where(empty[:, None], c, new / count.clamp(min=1)[:, None])
        if torch.equal(new, c):
            break
        c = new
    return c.float()


def centroids(qk: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """(H, C, D) from (H, M, D) calibration queries and keys, each head on its own."""
    unit = torch.nn.functional.normalize(qk.double(), dim=-1)
    return torch.stack([kmeans(unit[h], clusters, seed + h) for h in range(qk.shape[0])])


def plan(src: Source) -> Plan:
    clusters = src.options.get("clusters")
    if not clusters or clusters < 1:
        raise ConvertError("--to routed needs --clusters N (N >= 1)")
    acts = src.options.get("activations")
    if acts is None:
        raise ConvertError("--to routed needs calibration activations (--calib)")
    p = Plan(kind="routed", site_kind="routed", layers=src.layers, needs_finetuning=True)
    for i in src.layers:
        p.added[f"layers.{i}.centroids"] = centroids(acts[i], clusters, src.seed + 1000 * i)
    p.attnfx = {"layers": {str(i): {"clusters": clusters} for i in src.layers}}
    p.notes.append("centroids from k-means on the calibration batch; fine-tune the routing")
    return p
