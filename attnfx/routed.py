"""Routed sparse attention, in PyTorch: what a ``Routing`` spec computes (the readable
definition, the tests' reference) and the op's CPU path.

Clusters are processed a block at a time (bounded memory: the gathered rows of one block
of clusters at once), accumulating in float64 (the only rounding is the result's).  The outputs are combined
*deterministically*: the flat token indices are sorted once (a stable argsort), the slot
outputs are summed per token in that order (``segment_reduce``), and the backward sums
dq, dk and dv through the same sorted index — no atomics, the same bits on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnfx.spec import AttentionSpec, Routing

_CLUSTER_ELEMS = 1 << 22  # score elements (clusters × w × wk) a block of clusters holds

_RELATIONS = {
    "lt": torch.lt,
    "le": torch.le,
    "eq": torch.eq,
    "ne": torch.ne,
    "ge": torch.ge,
    "gt": torch.gt,
}


def flat_index(idx: Tensor) -> Tensor:
    """(B, H, S) token indices from an index as the op receives it: (B, H, S), or with a
    trailing (stride-0) dim, as a ``gather`` index of (B, H, S, D) rows is."""
    if idx.dim() == 4:
        idx = idx[..., 0]
    if idx.dim() != 3:
        raise ValueError(f"a routed index must be (B, H, S[, D]), got {tuple(idx.shape)}")
    return idx.long()


def check(q: Tensor, k: Tensor, v: Tensor, qi: Tensor, ki: Tensor, spec: AttentionSpec) -> None:
    r = spec.routing
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attnfx::routed_attention expects 4-D q, k, v")
    if q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError("routed attention: q, k, v must have the same heads")
    s, sk = qi.shape[-1], ki.shape[-1]
    if s % r.window or sk % r.key_window or s // r.window != sk // r.key_window:
        raise ValueError(
            f"routed attention: {s} query slots and {sk} key slots are not the same number of "
            f"clusters of {r.window} and {r.key_window}"
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 accumulation whatever the working dtype, as the other CPU paths: the
    only rounding is the result's."""
    del dtype
    return torch.float64


def _rows(t: Tensor, idx: Tensor, dt: torch.dtype) -> Tensor:
    """t (B, H, N, D) rows at idx (B, H, M) → (B, H, M, D) in ``dt``."""
    return t.gather(2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1])).to(dt)


def _scores(qg: Tensor, kg: Tensor, qpos: Tensor, kpos: Tensor, spec: AttentionSpec):
    """Scores of a block of clusters (B, H, c, w, wk) and the mask of filled entries."""
    s = qg @ kg.transpose(-1, -2)
    for op in spec.score_ops:
        if op.op == "mul":
            s = s * op.value
        elif op.op == "add":
            s = s + op.value
        else:
            raise ValueError(f"routed attention: score op {op.op} not supported")
    filled = None
    for rel, value in spec.routing.fills:
        m = _RELATIONS[rel](qpos.unsqueeze(-1), kpos.unsqueeze(-2))
        s = s.masked_fill(m, value)
        filled = m if filled is None else filled | m
    return s, filled


def _blocks(r: Routing, clusters: int, bh: int):
    per = max(1, _CLUSTER_ELEMS // max(1, bh * r.window * r.key_window))
    for c0 in range(0, clusters, per):
        c1 = min(clusters, c0 + per)
        yield c0, c1


def segment_sum(values: Tensor, idx: Tensor, n: int) -> Tensor:
    """values (B, H, M, D) summed onto n tokens by idx (B, H, M) → (B, H, n, D):
    a stable sort of the flat indices, then one segment sum per token in that order."""
    b, h, m, d = values.shape
    base = torch.arange(b * h, device=idx.device).view(b, h, 1) * n
    flat = (idx + base).reshape(-1)
    order = torch.argsort(flat, stable=True)
    lengths = torch.bincount(flat, minlength=b * h * n)
    out = torch.segment_reduce(
        values.reshape(-1, d)[order], "sum", lengths=lengths, axis=0, unsafe=True
    )
    return out.view(b, h, n, d)


def combine(slot_o: Tensor, qi: Tensor, n: int, spec: AttentionSpec) -> Tensor:
    """Slot outputs (B, H, S, Dv) onto the n tokens: summed per token through the sorted
    indices, divided by the count (``Routing.eps``); in slot_o's dtype."""
    den = denominator(qi, n, spec.routing, slot_o.dtype)
    return segment_sum(slot_o, qi, n) / den.unsqueeze(-1)


def slot_gradient(dout: Tensor, qi: Tensor, n: int, r: Routing) -> Tensor:
    """dO of each query slot (B, H, S, Dv), float32: the token's dO divided by its count."""
    do = dout.float() / denominator(qi, n, r, torch.float32).unsqueeze(-1)
    return _rows(do, qi, torch.float32).contiguous()


def denominator(qi: Tensor, n: int, r: Routing, dt: torch.dtype) -> Tensor:
    """(B, H, n): what each token's summed outputs are divided by."""
    b, h, _ = qi.shape
    base = torch.arange(b * h, device=qi.device).view(b, h, 1) * n
    count = torch.bincount((qi + base).reshape(-1), minlength=b * h * n).view(b, h, n).to(dt)
    return count + r.eps if r.eps is not None else count.clamp(min=1)


def forward(q: Tensor, k: Tensor, v: Tensor, qi: Tensor, ki: Tensor, spec: AttentionSpec):
    """(out (B, H, N, Dv) in v's dtype, slot outputs (B, H, S, Dv) float32, slot lse
    (B, H, S) float32)."""
    qi, ki = flat_index(qi), flat_index(ki)
    check(q, k, v, qi, ki, spec)
    r = spec.routing
    b, h, n, _ = q.shape
    dt = _work_dtype(q.dtype)
    clusters = qi.shape[-1] // r.window
    slot_o, slot_lse = [], []
    for c0, c1 in _blocks(r, clusters, b * h):
        qidx = qi[..., c0 * r.window : c1 * r.window]
        kidx = ki[..., c0 * r.key_window : c1 * r.key_window]
        cb = c1 - c0
        qg = _rows(q, qidx, dt).unflatten(2, (cb, r.window))
        kg = _rows(k, kidx, dt).unflatten(2, (cb, r.key_window))
        vg = _rows(v, kidx, dt).unflatten(2, (cb, r.key_window))
        s, _ = _scores(
            qg, kg, qidx.unflatten(2, (cb, r.window)), kidx.unflatten(2, (cb, r.key_window)), spec
        )
        lse = torch.logsumexp(s, dim=-1)
        o = torch.softmax(s, dim=-1) @ vg
        slot_o.append(o.flatten(2, 3))
        slot_lse.append(lse.flatten(2, 3))
    o = torch.cat(slot_o, dim=2)
    lse = torch.cat(slot_lse, dim=2)
    out = combine(o, qi, n, spec)
    return out.to(v.dtype), o.float(), lse.float()


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qi: Tensor,
    ki: Tensor,
    slot_o: Tensor,
    slot_lse: Tensor,
    spec: AttentionSpec,
):
    """(dq, dk, dv), contiguous, in q's, k's and v's dtypes: dO gathered to the slots and
    divided by the count, the softmax backward per cluster (its row sums as eager's
    softmax backward forms them, rowsum(p·dP), not from the float32 ``slot_o``), and dq / dk / dv summed back
    onto the tokens through the sorted indices."""
    qi, ki = flat_index(qi), flat_index(ki)
    r = spec.routing
    b, h, n, _ = q.shape
    nk = k.shape[2]
    dt = _work_dtype(q.dtype)
    do = dout.to(dt) / denominator(qi, n, r, dt).unsqueeze(-1)
    clusters = qi.shape[-1] // r.window
    scale = spec.scale
    dqs, dks, dvs = [], [], []
    for c0, c1 in _blocks(r, clusters, b * h):
        qs = slice(c0 * r.window, c1 * r.window)
        ks = slice(c0 * r.key_window, c1 * r.key_window)
        qidx, kidx = qi[..., qs], ki[..., ks]
        cb = c1 - c0
        qg = _rows(q, qidx, dt).unflatten(2, (cb, r.window))
        kg = _rows(k, kidx, dt).unflatten(2, (cb, r.key_window))
        vg = _rows(v, kidx, dt).unflatten(2, (cb, r.key_window))
        dog = _rows(do, qidx, dt).unflatten(2, (cb, r.window))
        s, filled = _scores(
            qg, kg, qidx.unflatten(2, (cb, r.window)), kidx.unflatten(2, (cb, r.key_window)), spec
        )
        p = torch.softmax(s, dim=-1)
        dp = dog @ vg.transpose(-1, -2)
        # rowsum(p·dP) (= rowsum(dO·O)), as eager's softmax backward forms it: a row whose
        # weight is all on one key then gets exactly dS = 0 there, as in eager
        delta = (p * dp).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        if filled is not None:
            ds = ds.masked_fill(filled, 0.0)  # a filled score has no gradient
        ds = ds * scale
        dqs.append((ds @ kg).flatten(2, 3))
        dks.append((ds.transpose(-1, -2) @ qg).flatten(2, 3))
        dvs.append((p.transpose(-1, -2) @ dog).flatten(2, 3))
    dq = segment_sum(torch.cat(dqs, dim=2), qi, n)
    dk = segment_sum(torch.cat(dks, dim=2), ki, nk)
    dv = segment_sum(torch.cat(dvs, dim=2), ki, nk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference(q: Tensor, k: Tensor, v: Tensor, qi: Tensor, ki: Tensor, spec: AttentionSpec):
    """The spec's output as a differentiable PyTorch function of (q, k, v), in the
    inputs' dtype (the tests' reference; float64 inputs give a gold)."""
    qi, ki = flat_index(qi), flat_index(ki)
    r = spec.routing
    b, h, n, d = q.shape
    c = qi.shape[-1] // r.window
    qg = _rows(q, qi, q.dtype).unflatten(2, (c, r.window))
    kg = _rows(k, ki, k.dtype).unflatten(2, (c, r.key_window))
    vg = _rows(v, ki, v.dtype).unflatten(2, (c, r.key_window))
    s, _ = _scores(qg, kg, qi.unflatten(2, (c, r.window)), ki.unflatten(2, (c, r.key_window)), spec)
    o = (torch.softmax(s, dim=-1) @ vg).flatten(2, 3)
    out = torch.zeros(b, h, n, v.shape[-1], dtype=o.dtype, device=o.device).index_put(
        (
            torch.arange(b, device=qi.device).view(b, 1, 1),
            torch.arange(h, device=qi.device).view(1, h, 1),
            qi,
        ),
        o,
        accumulate=True,
    )
    return out / denominator(qi, n, r, o.dtype).unsqueeze(-1)
