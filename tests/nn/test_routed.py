"""``attnfx.nn.RoutedAttention`` (Routing Transformer): its semantics checked against a
per-token loop (duplicates averaged, uncovered tokens 0, causal on original positions,
shared QK not attending to oneself unless alone), the k-means state (``update_kmeans``,
``aux_loss``), and compiled with ``backend="attnfx"``: one routed site rewritten (and the
local heads' sliding-window site), outputs and every gradient within the rule against eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnfx
from attnfx.nn import RoutedAttention
from attnfx.testing import assert_attention_close

DIM, HEADS, N = 64, 2, 24


def _x(seed=0, n=N, b=2):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed))


def _module(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("window", 8)
    kw.setdefault("num_clusters", 4)
    return RoutedAttention(DIM, HEADS, **kw).eval()


def _heads(m, x):
    b, n, _ = x.shape
    hd = m.head_dim

    def heads(t):
        return t.view(b, n, m.num_heads, hd).transpose(1, 2)

    q = heads(m.to_q(x))
    k = F.normalize(q, dim=-1) if m.shared_qk else heads(m.to_k(x))
    return q, k, heads(m.to_v(x))


def _loop(m, q, k, v):
    """Routed heads' output token by token, from the members the module chooses."""
    qi = m._members(q)
    ki = qi if m.shared_qk else m._members(k)
    b, h, n, d = q.shape
    out = torch.zeros_like(v)
    for bb in range(b):
        for hh in range(h):
            acc = {t: [] for t in range(n)}
            for c in range(qi.shape[2]):
                for i in qi[bb, hh, c].tolist():
                    keys = ki[bb, hh, c].tolist()
                    vis = [j for j in keys if not (m.causal and j > i)]
                    if m.shared_qk and len(vis) > 1:
                        vis = [j for j in vis if j != i] or vis
                    # duplicates of a key in a cluster count once each
                    s = torch.stack([q[bb, hh, i] @ k[bb, hh, j] for j in vis]) * d**-0.5
                    p = s.softmax(0)
                    acc[i].append(sum(pj * v[bb, hh, j] for pj, j in zip(p, vis)))
            for t, outs in acc.items():
                if outs:
                    out[bb, hh, t] = torch.stack(outs).mean(0)
    return out, qi


@pytest.mark.parametrize("causal", [False, True])
def test_semantics_match_a_per_token_loop(causal):
    m = _module(causal=causal).double()
    x = _x().double()
    q, k, v = _heads(m, x)
    with torch.no_grad():
        got = m._routed(q, k, v)
        want, qi = _loop(m, q, k, v)
    counts = torch.stack([torch.bincount(r, minlength=N) for r in qi.reshape(-1, 32)])
    assert (counts == 0).any() and (counts > 1).any()  # uncovered and duplicated tokens
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got.reshape(-1, N, got.shape[-1])[counts == 0] == 0).all()


def test_causal_first_member_attends_to_itself_only():
    m = _module(causal=True).double()
    q, k, v = _heads(m, _x().double())
    with torch.no_grad():
        qi = m._members(q)
        out = m._routed(q, k, v)
        # a token that is the first member of its only cluster outputs its own value
        counts = torch.zeros(qi.shape[0], qi.shape[1], N, dtype=torch.long)
        counts.scatter_add_(2, qi.flatten(2), torch.ones_like(qi.flatten(2)))
        first = qi[..., 0]
        hits = 0
        for b in range(first.shape[0]):
            for h in range(first.shape[1]):
                for t in first[b, h].tolist():
                    if counts[b, h, t] == 1:
                        torch.testing.assert_close(out[b, h, t], v[b, h, t])
                        hits += 1
        assert hits


def test_causal_needs_shared_qk_and_heads_are_checked():
    with pytest.raises(ValueError, match="shared_qk"):
        RoutedAttention(DIM, HEADS, window=8, num_clusters=4, causal=True, shared_qk=False)
    with pytest.raises(ValueError):
        RoutedAttention(DIM, HEADS, window=8, num_clusters=4, local_heads=HEADS)


def test_update_kmeans_and_commitment_loss():
    m = _module(shared_qk=True).train()  # records q only (with separate keys: q and k)
    before = m.means.clone()
    m.update_kmeans()  # nothing recorded: nothing moves
    assert torch.equal(m.means, before)
    m(_x())
    assert m.aux_loss is not None and m.aux_loss.requires_grad and m.aux_loss > 0
    m(_x(seed=1, n=16, b=1))  # the last forward's vectors count
    m.ema_decay = 0.0  # the new centroids: the normalized mean of their members
    q = _heads(m, _x(seed=1, n=16, b=1))[0].detach().transpose(0, 1).reshape(HEADS, -1, 32)
    xn = F.normalize(q, dim=-1)
    nearest = torch.einsum("hmd,hcd->hmc", xn, before).argmax(-1)
    m.update_kmeans()
    assert m._recorded is None
    for h in range(HEADS):
        for c in range(4):
            members = xn[h][nearest[h] == c]
            want = F.normalize(members.sum(0), dim=0) if len(members) else before[h, c]
            torch.testing.assert_close(m.means[h, c], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.means.norm(dim=-1), torch.ones(HEADS, 4))


def _check_compiled(m, x, kinds):
    m = m.eval()
    base_m, gold_m = copy.deepcopy(m), copy.deepcopy(m).double()
    chosen = []
    real = base_m._members

    def record(t):
        idx = real(t)
        chosen.append(idx)
        return idx

    base_m._members = record
    replay = iter(chosen)
    gold_m._members = lambda t: next(replay)  # gold on the members eager chose
    # inductor compiles the rewritten graph in tests/passes/test_recognize_routed.py
    cm = torch.compile(m, backend="attnfx", options={"inner": "eager"})
    xc, xb = (x.detach().clone().requires_grad_(True) for _ in range(2))
    xg = x.detach().double().requires_grad_(True)
    cand = cm(xc)
    counters = dict(attnfx.counters)
    for kind, count in kinds.items():
        assert counters.get(f"rewritten.{kind}") == count, counters
    assert not [k for k in counters if k.startswith("kept.")], counters
    base = base_m(xb)
    gold = gold_m(xg)
    assert_attention_close(cand, base, gold, context="output")
    cot = torch.randn(cand.shape, generator=torch.Generator().manual_seed(7))
    for o in (cand, base, gold):
        o.backward(cot.to(o.dtype))
    assert_attention_close(xc.grad, xb.grad, xg.grad, grad=True, context="grad x")
    named = zip(m.named_parameters(), base_m.parameters(), gold_m.parameters(), strict=True)
    for (name, pc), pb, pg in named:
        assert_attention_close(pc.grad, pb.grad, pg.grad, grad=True, context=f"grad {name}")


@pytest.mark.parametrize(
    "kw,kinds",
    [
        ({"causal": True}, {"routed": 1}),
        ({"causal": False, "local_heads": 1, "local_window": 8}, {"routed": 1, "neighborhood": 1}),
    ],
)
def test_compiled_module(kw, kinds):
    _check_compiled(_module(seed=3, **kw), _x(seed=4), kinds)


def test_training_steps_compile_once_and_update_the_centroids():
    m = _module(seed=5, causal=True).train()
    cm = torch.compile(m, backend="attnfx", options={"inner": "eager"}, dynamic=True)
    for n in (24, 32, 24):
        x = _x(seed=n, n=n).requires_grad_(True)
        (cm(x).square().mean() + m.aux_loss).backward()
        before = m.means.clone()
        m.update_kmeans()
        assert not torch.equal(m.means, before)
    counters = dict(attnfx.counters)
    assert counters.get("rewritten.routed") == 1, counters  # no recompile per step or length
    assert not [k for k in counters if k.startswith("kept.")], counters
