"""How the op's tensors are typed and laid out: the spec's dtype names as torch dtypes,
and the output buffer in the spec's memory order.  Shared by the op, its CPU paths and
the kernel launcher."""

from __future__ import annotations

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


def output_strides(q: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[int, ...]:
    """``empty_output``'s strides, without allocating it."""
    b, h, nq, _ = q.shape
    dv = v.shape[-1]
    if spec.out_layout == "bnhd":  # (B, N, H, D) storage seen as (B, H, N, D)
        return (nq * h * dv, dv, h * dv, 1)
    return (h * nq * dv, nq * dv, dv, 1)


def split_lse(spec: AttentionSpec) -> bool:
    """Whether the op's log-sum-exp is a (value, remainder) pair: for a float32 softmax.
    The backward recomputes p = exp(s − lse); a float32 lse is off by |lse|·eps, the same
    for a whole row, which put the float32 kernels' dV at 2–4x eager's error on peaked
    rows.  The pair (B, H, NQ, 2), both float32, carries it to float64 precision: the
    backward splits value + remainder into the row max (float32, the forward's own) and
    a small rest, so s − lse loses nothing (``Plan.lse64``).  (A float64 lse was tried
    first; keeping the op's outputs float32 keeps float64 tensors out of the graph.)"""
    return spec.dtype == "float32" and spec.act.normalized


def lse_shape(spec: AttentionSpec, b: int, h: int, nq: int) -> tuple[int, ...]:
    return (b, h, nq, 2) if split_lse(spec) else (b, h, nq)


def lse_pair(lse: Tensor, spec: AttentionSpec) -> Tensor:
    """A (B, H, NQ) log-sum-exp in the op's form (``split_lse``), float32."""
    if not split_lse(spec) or lse.dim() == 4:
        return lse.float().contiguous()
    wide = lse.double()
    hi = wide.float()
    return torch.stack([hi, (wide - hi.double()).float()], dim=-1)


def lse_value(lse: Tensor) -> Tensor:
    """The op's log-sum-exp as one (B, H, NQ) float32 tensor (a pair summed)."""
    if lse.dim() == 4:
        return (lse[..., 0].double() + lse[..., 1].double()).float()
    return lse


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
