"""The readable definition of a spec, in PyTorch: ``reference_attention`` and its
gradients.

This is what every other implementation is measured against (the tests' and the
verifier's reference, float64 accumulation) and what the CPU paths build on: the score
program through the score-op table's torch references (``attnfx.score_ops``), the
probabilities and dS through the activation's (``attnfx.activation``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnfx import score_ops
from attnfx.layout import torch_dtype
from attnfx.score_ops import TorchEnv
from attnfx.spec import AttentionSpec


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The PyTorch path accumulates in float64 whatever the working dtype: on CPU it is a
    reference, so its only rounding is the output's, and the rounding a rewrite adds
    around it (a temperature moved onto q, gradients cast back to fp16) stays inside the
    equivalence rule."""
    del dtype
    return torch.float64


def apply_score_ops(
    s: Tensor, spec: AttentionSpec, aux: list[Tensor], *, with_grad: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the score program on float32 scores ``s`` (B, Hq, NQ, NK).

    Returns the scores, a bool tensor of the pairs no fill op masked out and, with
    ``with_grad``, d(scores)/d(raw scores): every op is elementwise, so the derivative is
    the product of the local ones (multipliers, ``1 − tanh²``, 0 where filled).
    """
    env = TorchEnv(aux, s.shape[-2], s.shape[-1], device=s.device)
    s, hit, d = score_ops.run(s, spec.score_ops, env, with_grad=with_grad)
    kept = torch.ones((), dtype=torch.bool, device=s.device) if hit is None else ~hit
    if with_grad:
        d = torch.as_tensor(d, dtype=s.dtype, device=s.device)
        if hit is not None:
            d = torch.where(hit, torch.zeros((), dtype=s.dtype, device=s.device), d)
    else:
        d = None
    return s, kept.expand_as(s), d


def probabilities(s: Tensor, spec: AttentionSpec, aux: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(p, lse) of final scores ``s`` by the spec's activation: softmax over the keys
    (with the sink in the normalizer, then dropped) or sigmoid (lse 0), empty rows per
    ``fully_masked``."""
    sink = None
    if spec.sink is not None:
        sink = aux[spec.sink][..., :1].to(s.dtype).expand(*s.shape[:-1], 1)
    return spec.act.probabilities(s, sink, spec.fully_masked == "zero")


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: AttentionSpec
) -> tuple[Tensor, Tensor]:
    """What the spec computes, in PyTorch: float32 scores, output in ``out_dtype``."""
    g = spec.gqa_group
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    acc = _accumulation_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1))
    s, _, _ = apply_score_ops(s, spec, aux)
    p, lse = probabilities(s, spec, aux)
    out = torch.matmul(p, v.to(acc))
    return out.to(torch_dtype(spec.out_dtype)), lse.to(torch.float32)


def reference_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: AttentionSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference_gradients`` rounded to the dtypes of q, k and v."""
    dq, dk, dv = reference_gradients(dout, q, k, v, aux, spec)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def reference_gradients(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: AttentionSpec
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``reference_attention``'s output, written out (the op runs below
    autograd, so it cannot differentiate itself)::

        dv = pᵀ·dO          dp = dO·vᵀ
        ds = p ⊙ (dp − rowsum(p ⊙ dp))      (softmax)     ds = p ⊙ (1 − p) ⊙ dp   (sigmoid)
        ds_raw = ds ⊙ f     (f: the score program's derivative)
        dq = ds_raw·k       dk = ds_rawᵀ·q

    For GQA the key/value gradients of the query heads sharing one kv head are summed.
    """
    g = spec.gqa_group
    acc = _accumulation_dtype(q.dtype)
    kk = k.repeat_interleave(g, dim=1).to(acc) if g > 1 else k.to(acc)
    vv = v.repeat_interleave(g, dim=1).to(acc) if g > 1 else v.to(acc)
    qq, do = q.to(acc), dout.to(acc)
    s, kept, factor = apply_score_ops(
        torch.matmul(qq, kk.transpose(-2, -1)), spec, aux, with_grad=True
    )
    # With a sink, p sums to less than 1 over the keys; the softmax formula below still
    # holds (the sink's column has dp = 0: it never reaches the output).
    p, _ = probabilities(s, spec, aux)
    dv = torch.matmul(p.transpose(-2, -1), do)
    dp = torch.matmul(do, vv.transpose(-2, -1))
    ds = spec.act.ds(p, dp)
    # Filled scores get exactly zero gradient (as masked_fill's backward gives), even where
    # the row's probabilities are NaN.
    ds = torch.where(kept, ds * factor, torch.zeros_like(ds))
    dq = torch.matmul(ds, kk)
    dk = torch.matmul(ds.transpose(-2, -1), qq)
    if g > 1:
        b, h, n, _ = dk.shape
        dk = dk.view(b, h // g, g, n, -1).sum(2)
        dv = dv.view(b, h // g, g, n, -1).sum(2)
    return dq, dk, dv  # in the accumulation dtype


def _score_grad(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: AttentionSpec
) -> tuple[Tensor, Tensor]:
    """(raw scores, dL/d(final scores)) in the accumulation dtype."""
    g = spec.gqa_group
    acc = _accumulation_dtype(q.dtype)
    kk = k.repeat_interleave(g, dim=1).to(acc) if g > 1 else k.to(acc)
    vv = v.repeat_interleave(g, dim=1).to(acc) if g > 1 else v.to(acc)
    raw = torch.matmul(q.to(acc), kk.transpose(-2, -1))
    s, _, _ = apply_score_ops(raw, spec, aux)
    p, _ = probabilities(s, spec, aux)
    dp = torch.matmul(dout.to(acc), vv.transpose(-2, -1))
    return raw, spec.act.ds(p, dp)


def reference_aux_gradients(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    aux: list[Tensor],
    spec: AttentionSpec,
    which: list[int],
) -> list[Tensor]:
    """Gradients of the aux tensors ``which`` (a learnable bias or multiplier), each of
    the scores' shape (B, Hq, NQ, NK) in the accumulation dtype (``concentrate_gradient``
    rounds them to the tensor's dtype).  The score program is run forward, then
    back: each op's aux tensor receives what its table entry says (``aux_grad``: an
    ``add_aux`` the gradient reaching its step, a ``mul_aux`` that times the scores
    before it); fills pass exactly 0 (as ``masked_fill``'s backward does)."""
    raw, g = _score_grad(dout, q, k, v, aux, spec)
    env = TorchEnv(aux, raw.shape[-2], raw.shape[-1], device=raw.device)
    steps, s = [], raw
    for op in spec.score_ops:  # forward: each step's input, output and filled pairs
        out, hit = op.entry.apply(s, op, env)
        steps.append((s, out, hit))
        s = out
    grads: dict[int, Tensor] = {}
    for op, (before, out, hit) in zip(reversed(spec.score_ops), reversed(steps)):
        if op.aux in which:
            ga = op.entry.aux_grad(g, before, op, env)
            if ga is not None:
                grads[op.aux] = grads.get(op.aux, 0) + ga
        f = op.entry.derivative(out, op, env)
        g = g if f is None else g * f
        if hit is not None:
            g = torch.where(hit, torch.zeros_like(g), g)
    shape = raw.shape
    if spec.sink is not None and spec.sink in which:
        grads[spec.sink] = sink_gradient(dout, *reference_attention(q, k, v, aux, spec), aux, spec)
    return [
        grads[i]
        if i == spec.sink
        else torch.as_tensor(grads.get(i, 0.0), dtype=raw.dtype).expand(
            aux[i].shape if i in spec.table_aux else shape
        )
        for i in which
    ]


def broadcast_dims(a: Tensor) -> list[int]:
    """The dims along which aux input ``a`` is a stride-0 view (``ops.broadcast_aux``)."""
    return [d for d in range(a.dim()) if a.stride(d) == 0 and a.shape[d] > 1]


def concentrate_gradient(total: Tensor, a: Tensor) -> Tensor:
    """Aux input ``a``'s gradient, of ``a``'s shape and dtype, from ``total``: the
    gradient already summed over ``broadcast_dims(a)`` (kept as size 1) in the
    accumulation dtype.  ``a`` reaches the op as a stride-0 view (a per-query temperature
    (B, H, NQ, 1) read as (B, H, NQ, NK)) and autograd sums the op's gradient over those
    dims in ``a``'s dtype: rounding each of the NK terms to float16 first made a
    temperature's gradient several times less accurate than eager's.  So the sum is
    rounded once and put at index 0 of every broadcast dim, zeros elsewhere: the sum
    autograd then takes is that value, exactly."""
    dims = broadcast_dims(a)
    if not dims:
        return total.to(a.dtype)
    out = torch.zeros(a.shape, dtype=a.dtype, device=a.device)
    out[tuple(slice(0, 1) if d in dims else slice(None) for d in range(a.dim()))] = total
    return out


def sink_gradient(
    dout: Tensor, out: Tensor, lse: Tensor, aux: list[Tensor], spec: AttentionSpec
) -> Tensor:
    """Gradient of the sink logits, (B, Hq, NQ, 1) in the sink's dtype.

    The sink's probability is ``exp(sink − lse)`` and its column never reaches the
    output, so ``d sink = −exp(sink − lse) · rowsum(dO ⊙ O)`` — O(N·D) from the saved
    output and log-sum-exp, no scores needed.  A row with lse = -inf (every logit
    -inf, ``fully_masked="zero"``) gets 0."""
    sink = aux[spec.sink][..., :1]
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
    lse = lse.to(acc).unsqueeze(-1)
    p_sink = torch.where(lse == float("-inf"), 0.0, torch.exp(sink.to(acc) - lse))
    return (-p_sink * delta).to(sink.dtype)
