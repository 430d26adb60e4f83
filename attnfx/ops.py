"""The attnfx custom ops and the functional API.

One generic op per family, registered once; the kernel is chosen by the spec string::

    attnfx::attention(q, k, v, aux[], spec) -> (out, lse)
    attnfx::attention_backward(dout, q, k, v, aux[], out, lse, spec) -> (dq, dk, dv)

``q`` is (B, Hq, NQ, D), ``k`` (B, Hk, NK, D), ``v`` (B, Hk, NK, Dv), any strides; each
aux tensor is broadcast (stride-0 views) to (B, Hq, NQ, NK).  ``out`` is (B, Hq, NQ, Dv)
in the memory order the spec's ``out_layout`` names (``empty_output``); ``lse`` is the
float32 log-sum-exp of each query row's scores (softmax), saved for the backward; the
gradients are contiguous.

Where the op runs:

* CUDA tensors: the generated Triton kernels.
* CPU tensors: ``attnfx.cpu`` by default — PyTorch's fused SDPA kernel where the spec
  is one SDPA expresses exactly, else ``reference_attention`` in blocks of query rows —
  or the generated Triton kernels under Triton's interpreter when ``ATTNFX_INTERPRET=1``
  (that is how the tests exercise the kernels without a GPU).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from attnfx.spec import AttentionSpec

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bool": torch.bool,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}


def empty_output(q: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """The output buffer, (B, Hq, NQ, Dv) in the spec's memory order."""
    b, h, nq, _ = q.shape
    dt = torch_dtype(spec.out_dtype)
    if spec.out_layout == "bnhd":
        return q.new_empty((b, nq, h, v.shape[-1]), dtype=dt).transpose(1, 2)
    return q.new_empty((b, h, nq, v.shape[-1]), dtype=dt)


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def use_triton(device: torch.device) -> bool:
    """Whether the op runs the generated Triton kernels for tensors on ``device``."""
    if device.type == "cuda":
        return True
    return os.environ.get("ATTNFX_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------
# PyTorch implementation of a spec (CPU default, and the readable definition of a spec)
# ---------------------------------------------------------------------------------------


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
    nq, nk = s.shape[-2], s.shape[-1]
    kept = torch.ones((), dtype=torch.bool, device=s.device)
    d = torch.ones((), dtype=s.dtype, device=s.device) if with_grad else None
    for op in spec.score_ops:
        if op.op in ("mul", "mul_aux", "mul_sym"):
            if op.op == "mul":
                m = op.value
            elif op.op == "mul_aux":
                m = aux[op.aux].to(s.dtype)
            else:
                m = op.value_at(nq, nk)
            s = s * m
            d = d * m if with_grad else d
        elif op.op == "add":
            s = s + op.value
        elif op.op == "add_aux":
            s = s + aux[op.aux].to(s.dtype)
        elif op.op == "add_sym":
            s = s + op.value_at(nq, nk)
        elif op.op == "add_pos_aux":
            s = s + aux[op.aux].to(s.dtype) * _position(op, nq, nk, s)
        elif op.op == "tanh":
            s = torch.tanh(s)
            d = d * (1 - s * s) if with_grad else d
        elif op.op in ("fill_aux", "fill_pred"):
            if op.op == "fill_aux":
                hit = aux[op.aux].to(torch.bool)
                hit = hit if op.fill_where else ~hit
            else:
                hit = ~op.predicate.materialize(nq, nk, device=s.device)
            s = torch.where(hit, torch.full_like(s, op.value), s)
            kept = kept & ~hit
            d = (
                torch.where(hit, torch.zeros((), dtype=s.dtype, device=s.device), d)
                if with_grad
                else d
            )
    return s, kept.expand_as(s), d


def _position(op, nq: int, nk: int, like: Tensor) -> Tensor:
    """The (nq, nk) position term of an ``add_pos_aux`` op, in ``like``'s dtype."""
    from attnfx.predicate import materialize_expr

    return materialize_expr(op.sym, nq, nk, device=like.device).to(like.dtype)


def lower_symbolic(
    spec: AttentionSpec, aux: list[Tensor], q: Tensor, k: Tensor
) -> tuple[AttentionSpec, list[Tensor]]:
    """Turn the length-dependent scalars (``add_sym`` / ``mul_sym``) into 0-d aux tensors
    broadcast like the others, so that the kernels see only constant and aux ops and one
    compiled kernel serves every length."""
    if not any(op.op.endswith("_sym") for op in spec.score_ops):
        return spec, aux
    import dataclasses

    b, h, nq, _ = q.shape
    nk, device = k.shape[-2], q.device
    shape = (b, h, nq, nk)

    aux = list(aux)
    dts = list(spec.aux_dtypes)
    ops = []
    for op in spec.score_ops:
        if op.op.endswith("_sym"):
            val = torch.tensor(op.value_at(nq, nk), dtype=torch.float32, device=device)
            aux.append(val.expand(shape))
            dts.append("float32")
            ops.append(type(op)(op.op.replace("_sym", "_aux"), aux=len(aux) - 1))
        else:
            ops.append(op)
    return dataclasses.replace(spec, score_ops=tuple(ops), aux_dtypes=tuple(dts)), aux


def _zero_empty_rows(p: Tensor, s: Tensor, spec: AttentionSpec) -> Tensor:
    """``fully_masked="zero"``: a query row whose scores are all -inf — every key filled
    with -inf, or biased to -inf by an additive mask — yields 0 (SDPA's semantics), not
    softmax's NaN.  Decided on the final scores, so it holds for every input, not only
    for the masks verification happened to see."""
    if spec.fully_masked != "zero":
        return p
    alive = (s != float("-inf")).any(-1, keepdim=True)
    return torch.where(alive, p, torch.zeros_like(p))


def _with_sink(s: Tensor, spec: AttentionSpec, aux: list[Tensor]) -> Tensor:
    """The logits the softmax normalizes: the scores, and the sink's column if any."""
    if spec.sink is None:
        return s
    col = aux[spec.sink][..., :1].to(s.dtype).expand(*s.shape[:-1], 1)
    return torch.cat([s, col], dim=-1)


def probabilities(s: Tensor, spec: AttentionSpec, aux: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(p, lse) of final scores ``s``: softmax over the keys (with the sink in the
    normalizer, then dropped) or sigmoid (lse 0), empty rows per ``fully_masked``."""
    if spec.activation == "softmax":
        full = _with_sink(s, spec, aux)
        p = _zero_empty_rows(torch.softmax(full, dim=-1), full, spec)
        return p[..., : s.shape[-1]], torch.logsumexp(full, dim=-1)
    p = _zero_empty_rows(torch.sigmoid(s), s, spec)
    return p, torch.zeros(s.shape[:-1], dtype=s.dtype, device=s.device)


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
    if spec.activation == "softmax":
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    else:
        ds = p * (1 - p) * dp
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
    if spec.activation == "softmax":
        return raw, p * (dp - (p * dp).sum(-1, keepdim=True))
    return raw, p * (1 - p) * dp


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
    back: an ``add_aux`` receives the gradient reaching its step, a ``mul_aux`` that times
    the scores before it; fills pass exactly 0 (as ``masked_fill``'s backward does)."""
    raw, g = _score_grad(dout, q, k, v, aux, spec)
    nq, nk = raw.shape[-2], raw.shape[-1]
    steps, s = [], raw
    for op in spec.score_ops:  # forward: the value before each step
        steps.append(s)
        s, _, _ = apply_score_ops(s, dataclasses.replace(spec, score_ops=(op,)), aux)
    grads: dict[int, Tensor] = {}
    for op, before in zip(reversed(spec.score_ops), reversed(steps)):
        if op.aux in which and op.op == "add_aux":
            grads[op.aux] = grads.get(op.aux, 0) + g
        elif op.aux in which and op.op == "add_pos_aux":
            grads[op.aux] = grads.get(op.aux, 0) + g * _position(op, nq, nk, g)
        elif op.aux in which and op.op == "mul_aux":
            grads[op.aux] = grads.get(op.aux, 0) + g * before
        if op.op in ("mul", "mul_aux", "mul_sym"):
            m = (
                op.value
                if op.op == "mul"
                else aux[op.aux].to(g.dtype)
                if op.op == "mul_aux"
                else op.value_at(nq, nk)
            )
            g = g * m
        elif op.op == "tanh":
            t = torch.tanh(before)
            g = g * (1 - t * t)
        elif op.op in ("fill_aux", "fill_pred"):
            _, kept, _ = apply_score_ops(before, dataclasses.replace(spec, score_ops=(op,)), aux)
            g = torch.where(kept, g, torch.zeros_like(g))
    shape = raw.shape
    if spec.sink is not None and spec.sink in which:
        grads[spec.sink] = sink_gradient(dout, *reference_attention(q, k, v, aux, spec), aux, spec)
    return [
        grads[i]
        if i == spec.sink
        else torch.as_tensor(grads.get(i, 0.0), dtype=raw.dtype).expand(shape)
        for i in which
    ]


def broadcast_dims(a: Tensor) -> list[int]:
    """The dims along which aux input ``a`` is a stride-0 view (``broadcast_aux``)."""
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


# ---------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("attnfx::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str
) -> tuple[Tensor, Tensor]:
    # A symbolic head dim (dynamic=True) and a scale over it are read from q and v here.
    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    _check_inputs(q, k, v, aux, s)
    if use_triton(q.device):
        from attnfx.codegen import run_forward

        ks, kaux = lower_symbolic(s, aux, q, k)
        return run_forward(ks, q, k, v, kaux)
    from attnfx import cpu

    res = cpu.forward(q, k, v, aux, s)
    out, lse = res if res is not None else cpu.reference_forward(q, k, v, aux, s)
    return empty_output(q, v, s).copy_(out), lse.contiguous()


@attention_op.register_fake
def _(q, k, v, aux, spec):
    s = AttentionSpec.from_key(spec)
    b, h, nq, _ = q.shape
    return empty_output(q, v, s), q.new_empty((b, h, nq), dtype=torch.float32)


@torch.library.custom_op("attnfx::attention_backward", mutates_args=())
def attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    aux: list[Tensor],
    out: Tensor,
    lse: Tensor,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    if use_triton(q.device):
        from attnfx.codegen import run_backward

        ks, kaux = lower_symbolic(s, aux, q, k)
        return run_backward(ks, dout, q, k, v, kaux, out, lse)
    from attnfx import cpu

    res = cpu.backward(dout, q, k, v, aux, s, out, lse)
    dq, dk, dv = res if res is not None else cpu.reference_backward(dout, q, k, v, aux, s)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _(dout, q, k, v, aux, out, lse, spec):
    # The kernels (and the reference) return contiguous gradients.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("attnfx::attention_aux_backward", mutates_args=())
def attention_aux_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str, which: list[int]
) -> list[Tensor]:
    """Gradients of the aux tensors ``which`` (learnable score biases / multipliers), each
    (B, Hq, NQ, NK) in its dtype, summed over its broadcast dims before rounding
    (``concentrate_gradient``).  PyTorch, in blocks of query rows (bounded memory), on any
    device: the kernels do not produce dS."""
    from attnfx import cpu

    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    return [g.contiguous() for g in cpu.reference_aux_backward(dout, q, k, v, aux, s, which)]


@attention_aux_backward_op.register_fake
def _(dout, q, k, v, aux, spec, which):
    b, h, nq, _ = q.shape
    return [aux[i].new_empty((b, h, nq, k.shape[-2])) for i in which]


def _setup_context(ctx, inputs, output):
    q, k, v, aux, spec = inputs
    out, lse = output
    ctx.spec = spec
    ctx.n_aux = len(aux)
    ctx.aux_grad = [i for i, a in enumerate(aux) if a.requires_grad]
    ctx.sink = AttentionSpec.from_key(spec).sink
    ctx.save_for_backward(q, k, v, out, lse, *aux)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *aux = ctx.saved_tensors
    dout = dout.contiguous()
    dq, dk, dv = attention_backward_op(dout, q, k, v, list(aux), out, lse, ctx.spec)
    daux = [None] * ctx.n_aux
    which = [i for i in ctx.aux_grad if i != ctx.sink]
    if which:
        grads = attention_aux_backward_op(dout, q, k, v, list(aux), ctx.spec, which)
        for i, g in zip(which, grads):
            daux[i] = g
    if ctx.sink in ctx.aux_grad:
        daux[ctx.sink] = sink_gradient(dout, out, lse, list(aux), AttentionSpec.from_key(ctx.spec))
    return dq, dk, dv, daux, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    dout, q, k, v, aux, out, lse, spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(dout, q, k, v, *aux)


def _double_backward(ctx, gdq, gdk, gdv):
    """Backward of the backward (a gradient of a gradient: gradient penalties, Hessian-
    vector products), through the reference math: (dq, dk, dv) are recomputed as
    differentiable functions of (dout, q, k, v, aux) in float64 PyTorch and
    differentiated once more.  Bounded by the N×N scores, like eager; out and lse get
    no gradient of their own (the recomputation goes through q, k, v)."""
    dout, q, k, v, *aux = ctx.saved_tensors
    spec = AttentionSpec.from_key(ctx.spec).resolved(q.shape[-1], v.shape[-1])
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (dout, q, k, v)]
        aux_l = [a.detach().requires_grad_() if a.is_floating_point() else a.detach() for a in aux]
        do, qq, kk, vv = leaves
        out, _ = reference_attention(qq, kk, vv, aux_l, spec)
        first = torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype), create_graph=True)
        cot = [
            torch.zeros_like(f) if g is None else g.to(f.dtype)
            for f, g in zip(first, (gdq, gdk, gdv))
        ]
        wrt = leaves + [a for a in aux_l if a.requires_grad]
        grads = torch.autograd.grad(first, wrt, cot, allow_unused=True)
    grads = [None if g is None else g.to(w.dtype) for g, w in zip(grads, wrt)]
    g_aux = iter(grads[4:])
    daux = [next(g_aux) if a.requires_grad else None for a in aux_l]
    return grads[0], grads[1], grads[2], grads[3], daux, None, None, None


attention_backward_op.register_autograd(_double_backward, setup_context=_setup_backward_context)


def _check_inputs(q, k, v, aux, spec: AttentionSpec):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attnfx::attention expects 4-D q, k, v; got {q.dim()}, {k.dim()}, {v.dim()}"
        )
    if q.shape[1] != k.shape[1] * spec.gqa_group:
        raise ValueError(
            f"q has {q.shape[1]} heads, k {k.shape[1]}, spec says group {spec.gqa_group}"
        )
    for i, a in enumerate(aux):
        if a.dim() != 4:
            raise ValueError(f"aux tensor {i} must be broadcast to 4-D, got shape {tuple(a.shape)}")
    if spec.sink is not None and aux[spec.sink].shape[-1] != 1:
        raise ValueError(f"the sink (aux tensor {spec.sink}) must be broadcast to (B, H, NQ, 1)")


# ---------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------


def attention(
    q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, aux: list[Tensor] | None = None
) -> Tensor:
    """Run ``spec`` on (B, H, N, D) tensors through the attnfx custom op."""
    out, _ = attention_op(q, k, v, broadcast_aux(q, k, aux or [], spec), spec.key)
    return out


def broadcast_aux(q: Tensor, k: Tensor, aux: list[Tensor], spec: AttentionSpec) -> list[Tensor]:
    """Each aux tensor as a stride-0 view of the scores' shape (B, Hq, NQ, NK); the
    sink's of (B, Hq, NQ, 1)."""
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    return [a.expand(b, h, nq, 1 if i == spec.sink else nk) for i, a in enumerate(aux)]


def site_attention(q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str) -> Tensor:
    """What a rewritten site calls: broadcast the aux tensors (stride-0 views) to the
    scores' shape and run the op; returns only the output."""
    aux = broadcast_aux(q, k, aux, AttentionSpec.from_key(spec))
    out, _ = attention_op(q, k, v, aux, spec)
    return out
