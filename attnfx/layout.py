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


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
