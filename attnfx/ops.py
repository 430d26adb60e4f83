"""The attnfx custom ops and the functional API.

One generic op per family, registered once; the kernel is chosen by the spec string::

    attnfx::attention(q, k, v, aux[], spec) -> (out, lse)
    attnfx::attention_backward(dout, q, k, v, aux[], out, lse, spec) -> (dq, dk, dv)
    attnfx::routed_attention(q, k, v, qi, ki, spec) -> (out, slot_out, slot_lse)
    attnfx::routed_attention_backward(dout, q, k, v, qi, ki, slot_out, slot_lse, spec)

(the routed family: ``spec.routing``, below).

``q`` is (B, Hq, NQ, D), ``k`` (B, Hk, NK, D), ``v`` (B, Hk, NK, Dv), any strides; each
aux tensor is broadcast (stride-0 views) to (B, Hq, NQ, NK).  ``out`` is (B, Hq, NQ, Dv)
in the memory order the spec's ``out_layout`` names (``empty_output``); ``lse`` is the
log-sum-exp of each query row's scores (softmax), saved for the backward: float32
(B, H, NQ), or for a float32 softmax a (value, remainder) pair (B, H, NQ, 2)
(``layout.split_lse``); the gradients are contiguous.

Where the op runs:

* CUDA tensors: the generated Triton kernels.
* CPU tensors: ``attnfx.cpu`` by default — PyTorch's fused SDPA kernel where the spec
  is one SDPA expresses exactly, else ``reference_attention`` in blocks of query rows —
  or the generated Triton kernels under Triton's interpreter when ``ATTNFX_INTERPRET=1``
  (that is how the tests exercise the kernels without a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
from torch import Tensor

from attnfx.layout import (
    dtype_name,
    empty_output,
    lse_pair,
    lse_shape,
    lse_value,
    output_strides,
    torch_dtype,
)
from attnfx.reference import (
    apply_score_ops,
    probabilities,
    reference_attention,
    reference_attention_backward,
    reference_aux_gradients,
    reference_gradients,
    sink_gradient,
)
from attnfx.spec import AttentionSpec

# The reference (``attnfx.reference``) and the dtype helpers (``attnfx.layout``) are part
# of this module's API too.
__all__ = [
    "apply_score_ops",
    "attention",
    "attention_aux_backward_op",
    "attention_backward_op",
    "attention_op",
    "broadcast_aux",
    "dtype_name",
    "empty_output",
    "lower_symbolic",
    "probabilities",
    "reference_attention",
    "reference_attention_backward",
    "reference_aux_gradients",
    "reference_gradients",
    "routed_attention",
    "routed_attention_backward_op",
    "routed_attention_op",
    "site_attention",
    "sink_gradient",
    "torch_dtype",
    "use_triton",
]


def use_triton(device: torch.device) -> bool:
    """Whether the op runs the generated Triton kernels for tensors on ``device``."""
    if device.type == "cuda":
        return True
    return os.environ.get("ATTNFX_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------
# What the kernels see of a spec
# ---------------------------------------------------------------------------------------


def lower_symbolic(
    spec: AttentionSpec, aux: list[Tensor], q: Tensor, k: Tensor
) -> tuple[AttentionSpec, list[Tensor]]:
    """Turn the length-dependent scalars (``add_sym`` / ``mul_sym``) into 0-d aux tensors
    broadcast like the others, so that the kernels see only constant and aux ops and one
    compiled kernel serves every length."""
    if not any(op.entry.aux_form for op in spec.score_ops):
        return spec, aux
    lowered, sym_ops = _lowered_spec(spec.key)
    b, h, nq, _ = q.shape
    nk, device = k.shape[-2], q.device
    shape = (b, h, nq, nk)
    aux = list(aux)
    for op in sym_ops:
        val = torch.tensor(op.value_at(nq, nk), dtype=torch.float32, device=device)
        aux.append(val.expand(shape))
    return lowered, aux


@functools.lru_cache(maxsize=256)
def _lowered_spec(key: str):
    """(the spec with each symbolic scalar op read from a new float32 aux tensor, those
    ops in the order of their aux tensors): one spec object per key, so that the
    launcher's recipes (keyed by ``spec.key``) do not re-serialize it on every call."""
    spec = AttentionSpec.from_key(key)
    dts = list(spec.aux_dtypes)
    ops, sym_ops = [], []
    for op in spec.score_ops:
        if op.entry.aux_form:
            dts.append("float32")
            sym_ops.append(op)
            ops.append(type(op)(op.entry.aux_form, aux=len(dts) - 1))
        else:
            ops.append(op)
    lowered = dataclasses.replace(spec, score_ops=tuple(ops), aux_dtypes=tuple(dts))
    return lowered, tuple(sym_ops)


# ---------------------------------------------------------------------------------------
# The custom ops
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("attnfx::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str
) -> tuple[Tensor, Tensor]:
    return _forward_impl(q, k, v, aux, spec)


def _forward_impl(q, k, v, aux, spec: str) -> tuple[Tensor, Tensor]:
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
    return _as_output(out, q, v, s), lse_pair(lse, s)


def _as_output(out: Tensor, q: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """``out`` in the spec's output layout: itself when it already is a fresh tensor of
    that layout (the fused CPU kernel's contiguous result: no copy), else a copy."""
    # (compared without allocating the buffer: a second output-sized allocation on
    # every call raised the CPU forward's peak memory 1.24x over inductor's)
    if (
        out.dtype == torch_dtype(spec.out_dtype)
        and out.shape == (*q.shape[:3], v.shape[-1])
        and out.stride() == output_strides(q, v, spec)
        and out.storage_offset() == 0
        and out.untyped_storage().nbytes() == out.numel() * out.element_size()
        and all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (q, v))
    ):
        return out
    return empty_output(q, v, spec).copy_(out)


@attention_op.register_fake
def _(q, k, v, aux, spec):
    s = AttentionSpec.from_key(spec)
    b, h, nq, _ = q.shape
    return empty_output(q, v, s), q.new_empty(lse_shape(s, b, h, nq), dtype=torch.float32)


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
    return _backward_impl(dout, q, k, v, aux, out, lse, spec)


def _backward_impl(dout, q, k, v, aux, out, lse, spec: str) -> tuple[Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    if use_triton(q.device):
        from attnfx.codegen import run_backward

        ks, kaux = lower_symbolic(s, aux, q, k)
        return run_backward(ks, dout, q, k, v, kaux, out, lse)
    from attnfx import cpu

    res = cpu.backward(dout, q, k, v, aux, s, out, lse_value(lse))
    dq, dk, dv = res if res is not None else cpu.reference_backward(dout, q, k, v, aux, s)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward_op.register_fake
def _(dout, q, k, v, aux, out, lse, spec):
    # The kernels (and the reference) return contiguous gradients.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("attnfx::attention_aux_backward", mutates_args=())
def attention_aux_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    aux: list[Tensor],
    out: Tensor,
    lse: Tensor,
    spec: str,
    which: list[int],
) -> list[Tensor]:
    """Gradients of the aux tensors ``which`` (learnable score biases / multipliers,
    bias tables), each of its shape ((B, Hq, NQ, NK), a table's (B, Hq, 1, T)) in its
    dtype, summed over its broadcast dims before rounding (``concentrate_gradient``).
    Bias tables followed by additions and fills only (``plan.table_grads``), where the
    kernels run: the dQ kernel adds dS into them (``run_backward(table_grads=...)``,
    from the saved ``out`` and ``lse``).  The others: PyTorch, in blocks of query rows
    (bounded memory), on any device."""
    return _aux_backward_impl(dout, q, k, v, aux, out, lse, spec, which)


def _aux_backward_impl(dout, q, k, v, aux, out, lse, spec: str, which) -> list[Tensor]:
    from attnfx import cpu
    from attnfx.reference import broadcast_dims, concentrate_gradient

    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    grads: dict[int, Tensor] = {}
    if use_triton(q.device) and s.table_aux:
        from attnfx.codegen import make_plan, run_backward

        ks, kaux = lower_symbolic(s, aux, q, k)
        tables = [i for i in which if i in make_plan(ks).table_grads]
        if tables:
            dts = run_backward(ks, dout, q, k, v, kaux, out, lse, table_grads=tables)
            for i, dt in zip(tables, dts):
                # (B, H, T) -> the table's (B, H, 1, T), summed over its broadcast dims
                total = dt.unsqueeze(-2)
                dims = broadcast_dims(aux[i])
                total = total.sum(dim=dims, keepdim=True) if dims else total
                grads[i] = concentrate_gradient(total, aux[i])
    rest = [i for i in which if i not in grads]
    if rest:
        for i, g in zip(rest, cpu.reference_aux_backward(dout, q, k, v, aux, s, rest)):
            grads[i] = g
    return [grads[i].contiguous() for i in which]


@attention_aux_backward_op.register_fake
def _(dout, q, k, v, aux, out, lse, spec, which):
    b, h, nq, _ = q.shape
    tables = AttentionSpec.from_key(spec).table_aux
    return [
        aux[i].new_empty((b, h, 1, aux[i].shape[-1]) if i in tables else (b, h, nq, k.shape[-2]))
        for i in which
    ]


def _setup_context(ctx, inputs, output):
    q, k, v, aux, spec = inputs
    out, lse = output
    ctx.spec = spec
    ctx.n_aux = len(aux)
    ctx.aux_grad = [i for i, a in enumerate(aux) if a.requires_grad]
    ctx.sink = AttentionSpec.from_key(spec).sink
    ctx.save_for_backward(q, k, v, out, lse, *aux)


def _backward(ctx, dout, dlse, direct: bool = False):
    """The op's backward (``direct``: the implementation called without the custom op's
    dispatch, for ``_EagerAttention``)."""
    q, k, v, out, lse, *aux = ctx.saved_tensors
    dout = dout.contiguous()
    bwd = _backward_impl if direct else attention_backward_op
    dq, dk, dv = bwd(dout, q, k, v, list(aux), out, lse, ctx.spec)
    daux = [None] * ctx.n_aux
    which = [i for i in ctx.aux_grad if i != ctx.sink]
    if which:
        grads = attention_aux_backward_op(dout, q, k, v, list(aux), out, lse, ctx.spec, which)
        for i, g in zip(which, grads):
            daux[i] = g
    if ctx.sink in ctx.aux_grad:
        daux[ctx.sink] = sink_gradient(
            dout, out, lse_value(lse), list(aux), AttentionSpec.from_key(ctx.spec)
        )
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
    nq, nk = q.shape[-2], k.shape[-2]
    for op in spec.score_ops:
        if op.entry.operand == "table":
            if aux[op.aux].shape[-2] != 1:
                raise ValueError(f"the table aux{op.aux} must be broadcast to (B, H, 1, T)")
            op.entry.check_index(op, nq, nk, aux[op.aux].shape[-1])


# ---------------------------------------------------------------------------------------
# Routed sparse attention (``AttentionSpec.routing``)
# ---------------------------------------------------------------------------------------
#
#   attnfx::routed_attention(q, k, v, qi, ki, spec) -> (out, slot_out, slot_lse)
#   attnfx::routed_attention_backward(dout, q, k, v, qi, ki, slot_out, slot_lse, spec)
#       -> (dq, dk, dv)
#
# q, k, v are the tokens (B, H, N, D) — never gathered copies; qi / ki the slot → token
# indices (B, H, S[, D]) (``spec.Routing``).  ``out`` (B, H, N, Dv) is contiguous in v's
# dtype; ``slot_out`` (B, H, S, Dv) and ``slot_lse`` (B, H, S) are each query slot's
# output and log-sum-exp, float32, saved for the backward.


def _routed_forward_impl(q, k, v, qi, ki, s: AttentionSpec):
    if use_triton(q.device):
        from attnfx.codegen import routed as routed_kernels

        return routed_kernels.run_forward(s, q, k, v, qi, ki)
    from attnfx import routed

    return routed.forward(q, k, v, qi, ki, s)


@torch.library.custom_op("attnfx::routed_attention", mutates_args=())
def routed_attention_op(
    q: Tensor, k: Tensor, v: Tensor, qi: Tensor, ki: Tensor, spec: str
) -> tuple[Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    out, slot_o, slot_lse = _routed_forward_impl(q, k, v, qi, ki, s)
    return out.contiguous(), slot_o.contiguous(), slot_lse.contiguous()


@routed_attention_op.register_fake
def _(q, k, v, qi, ki, spec):
    b, h, n, _ = q.shape
    slots = qi.shape[2]
    dv = v.shape[-1]
    return (
        q.new_empty((b, h, n, dv), dtype=v.dtype),
        q.new_empty((b, h, slots, dv), dtype=torch.float32),
        q.new_empty((b, h, slots), dtype=torch.float32),
    )


@torch.library.custom_op("attnfx::routed_attention_backward", mutates_args=())
def routed_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qi: Tensor,
    ki: Tensor,
    slot_out: Tensor,
    slot_lse: Tensor,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor]:
    s = AttentionSpec.from_key(spec).resolved(q.shape[-1], v.shape[-1])
    if use_triton(q.device):
        from attnfx.codegen import routed as routed_kernels

        grads = routed_kernels.run_backward(s, dout, q, k, v, qi, ki, slot_out, slot_lse)
    else:
        from attnfx import routed

        grads = routed.backward(dout, q, k, v, qi, ki, slot_out, slot_lse, s)
    return tuple(g.contiguous() for g in grads)


@routed_attention_backward_op.register_fake
def _(dout, q, k, v, qi, ki, slot_out, slot_lse, spec):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _routed_setup_context(ctx, inputs, output):
    q, k, v, qi, ki, spec = inputs
    _, slot_o, slot_lse = output
    ctx.spec = spec
    ctx.save_for_backward(q, k, v, qi, ki, slot_o, slot_lse)


def _routed_backward(ctx, dout, dslot_o, dslot_lse):
    q, k, v, qi, ki, slot_o, slot_lse = ctx.saved_tensors
    dq, dk, dv = routed_attention_backward_op(
        dout.contiguous(), q, k, v, qi, ki, slot_o, slot_lse, ctx.spec
    )
    return dq, dk, dv, None, None, None


routed_attention_op.register_autograd(_routed_backward, setup_context=_routed_setup_context)


def routed_attention(
    q: Tensor, k: Tensor, v: Tensor, qi: Tensor, ki: Tensor, spec: AttentionSpec
) -> Tensor:
    """Run a routed ``spec`` on (B, H, N, D) tokens and (B, H, S) slot indices."""
    out, _, _ = routed_attention_op(q, k, v, qi, ki, spec.key)
    return out


# ---------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------


def attention(
    q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, aux: list[Tensor] | None = None
) -> Tensor:
    """Run ``spec`` on (B, H, N, D) tensors through the attnfx custom op (in eager code
    on plain tensors: its implementation under a ``torch.autograd.Function``, see
    ``_EagerAttention``)."""
    aux = broadcast_aux(q, k, _for_dtensors(q, aux or []), spec)
    if _plain_eager(q, k, v, *aux):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *aux)):
            out, _ = _EagerAttention.apply(spec.key, q, k, v, *aux)
        else:  # nothing to differentiate: the implementation alone
            out, _ = _forward_impl(q, k, v, aux, spec.key)
        return out
    out, _ = attention_op(q, k, v, aux, spec.key)
    return out


def _plain_eager(*tensors: Tensor) -> bool:
    """Whether the op may be run without torch's custom-op dispatch: eager code (not
    traced or compiled), no Python dispatch or torch-function mode (a FLOP counter, a
    fake or functional mode must see the op), plain tensors (no subclass, no DTensor,
    none wrapped by torch.func's vmap or grad)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if _current_dispatch_mode() is not None:
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(type(t) is Tensor and not is_wrapped(t) for t in tensors)


def _current_dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


class _EagerAttention(torch.autograd.Function):
    """``attnfx::attention`` with its registered autograd, for eager calls on plain
    tensors: the same forward and backward implementations, called directly.  Torch's
    custom-op dispatch and its Python autograd wrapper cost several times attnfx's own
    host time per call (``benchmarks/bench_host.py``: a no-op custom op of the same
    signature takes ~50 µs per forward and ~400 µs per forward + backward on a 2-core
    CPU), which bounds the throughput of every launch smaller than that.  A backward that
    builds a graph (``create_graph=True``: gradient penalties) goes through the backward
    op, whose own autograd gives the double backward."""

    @staticmethod
    def forward(ctx, spec: str, q, k, v, *aux):
        out, lse = _forward_impl(q, k, v, list(aux), spec)
        _setup_context(ctx, (q, k, v, list(aux), spec), (out, lse))  # as the op's
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        dq, dk, dv, daux, _ = _backward(ctx, dout, dlse, direct=not torch.is_grad_enabled())
        return None, dq, dk, dv, *daux


def _for_dtensors(q: Tensor, aux: list[Tensor]) -> list[Tensor]:
    """On DTensors (tensor parallelism): the ops' sharding rules registered, and a plain
    one-element aux tensor (a 0-d scalar DTensor accepts beside DTensors) made a
    replicated DTensor, which its broadcast to the scores' shape no longer is."""
    from attnfx import distributed

    if not distributed.is_dtensor(q):
        return aux
    distributed.register()
    from torch.distributed.tensor import DTensor, Replicate

    mesh = q.device_mesh
    return [
        DTensor.from_local(a, mesh, [Replicate()] * mesh.ndim, run_check=False)
        if not distributed.is_dtensor(a) and a.numel() == 1
        else a
        for a in aux
    ]


def broadcast_aux(q: Tensor, k: Tensor, aux: list[Tensor], spec: AttentionSpec) -> list[Tensor]:
    """Each aux tensor as a stride-0 view of the scores' shape (B, Hq, NQ, NK); the
    sink's of (B, Hq, NQ, 1), a table's of (B, Hq, 1, T)."""
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    tables = spec.table_aux
    return [
        a.expand(b, h, 1, a.shape[-1])
        if i in tables
        else a.expand(b, h, nq, 1 if i == spec.sink else nk)
        for i, a in enumerate(aux)
    ]


def site_attention(q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str) -> Tensor:
    """What a rewritten site calls: broadcast the aux tensors (stride-0 views) to the
    scores' shape and run the op; returns only the output.  A routed spec's aux tensors
    are its slot indices: the routed op."""
    if AttentionSpec.from_key(spec).routing is not None:
        out, _, _ = routed_attention_op(q, k, v, aux[0], aux[1], spec)
        return out
    aux = broadcast_aux(q, k, _for_dtensors(q, aux), AttentionSpec.from_key(spec))
    out, _ = attention_op(q, k, v, aux, spec)
    return out
