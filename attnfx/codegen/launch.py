"""Launching the generated kernels: ``run_forward`` / ``run_backward``.

Semantics are exactly those of ``attnfx.ops.reference_attention`` and
``reference_attention_backward``.  CPU tensors run under Triton's interpreter (the op
only calls us on CPU when ``ATTNFX_INTERPRET=1``); CUDA tensors run the compiled kernels.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import triton

from attnfx.codegen import cache
from attnfx.codegen.plan import Config, Plan, configs, make_plan, skip_bounds
from attnfx.spec import AttentionSpec

# How many times each kernel was launched (tests assert the Triton path ran).
LAUNCHES: collections.Counter = collections.Counter()

_TORCH_TO_TRITON = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.int8: "i8",
}


def _interpret(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def tanh_impl(spec: AttentionSpec, interpret: bool) -> int:
    """0: exp formula (interpreter), 1: libdevice tanh, 2: tanh.approx.f32.

    The approximate MUFU tanh (max rel. error ~2^-11) is far below bf16 resolution; fp16
    and fp32 use the accurate libdevice tanh."""
    if interpret:
        return 0
    return 2 if spec.dtype == "bfloat16" else 1


def _aux_arg(a: torch.Tensor) -> torch.Tensor:
    # Triton takes no bool pointers: read the same bytes as uint8
    return a.view(torch.uint8) if a.dtype == torch.bool else a


def _aux_lists(plan: Plan, aux: list[torch.Tensor]):
    ptrs, strides = [], []
    for i in plan.aux_used:
        a = _aux_arg(aux[i])
        ptrs.append(a)
        strides.append(tuple(a.stride()))
    return ptrs, strides


def _check(spec: AttentionSpec, q, k, v):
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] != spec.head_dim or v.shape[-1] != spec.head_dim_v:
        raise ValueError(
            f"head dims {q.shape[-1]}/{v.shape[-1]} do not match the spec's "
            f"{spec.head_dim}/{spec.head_dim_v}"
        )


def _cfg(spec: AttentionSpec, kernel: str, interpret: bool) -> Config:
    return configs(spec, interpret)[kernel][0]


def run_forward(spec: AttentionSpec, q, k, v, aux) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, Hq, NQ, Dv) in ``spec.out_dtype``, laid out in memory as
    ``spec.out_layout`` says (``attnfx.ops.empty_output``); lse (B, Hq, NQ) float32."""
    from attnfx.ops import empty_output

    _check(spec, q, k, v)
    interpret = _interpret(q)
    plan = make_plan(spec)
    mod = cache.load_module(spec, "fwd", interpret)
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    # the output in the spec's memory order (bhnd or bnhd); the kernel writes through
    # its strides
    out = empty_output(q, v, spec)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if B * H * NQ == 0:
        return out, lse
    bounds = skip_bounds(spec, plan, NQ, NK)
    cfg = _cfg(spec, "fwd", interpret)
    aux_ptrs, aux_strides = _aux_lists(plan, aux)
    grid = (triton.cdiv(NQ, cfg.BLOCK_M), B * H)
    extra = {"TANH_IMPL": tanh_impl(spec, interpret)} if plan.uses_tanh else {}
    mod._attn_fwd[grid](
        q, k, v, out, lse, *aux_ptrs,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *[s for st in aux_strides for s in st],
        H, NQ, NK, *bounds,
        GROUP=spec.gqa_group,
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim_v,
        BLOCK_D=plan.block_d,
        BLOCK_DV=plan.block_dv,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        **extra,
        **cfg.launch_kwargs(interpret),
    )  # fmt: skip
    LAUNCHES["fwd"] += 1
    return out, lse


def run_backward(spec: AttentionSpec, dout, q, k, v, aux, out, lse):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    _check(spec, q, k, v)
    interpret = _interpret(q)
    plan = make_plan(spec)
    mod = cache.load_module(spec, "bwd", interpret)
    B, H, NQ, _ = q.shape
    HK, NK = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H * NQ == 0 or NK == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bounds = skip_bounds(spec, plan, NQ, NK)
    aux_ptrs, aux_strides = _aux_lists(plan, aux)
    aux_flat = [s for st in aux_strides for s in st]
    consts = dict(
        GROUP=spec.gqa_group,
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim_v,
        BLOCK_D=plan.block_d,
        BLOCK_DV=plan.block_dv,
    )
    extra = {"TANH_IMPL": tanh_impl(spec, interpret)} if plan.uses_tanh else {}
    softmax = spec.activation == "softmax"
    zero = spec.fully_masked == "zero"
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    m_row = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    # row_norm: log(l) of the rows whose huge float32 lse lost it (0 elsewhere)
    lg = [torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)] if plan.row_norm else []
    if softmax or zero:
        cfg = _cfg(spec, "bwd_pre", interpret)
        rn_args, rn_consts = [], {}
        if plan.row_norm:
            rn_args = [*lg, q, k]
            rn_consts = dict(
                GROUP=spec.gqa_group, HEAD_DIM=spec.head_dim, BLOCK_D=plan.block_d, **extra
            )
        mod._attn_bwd_preprocess[(triton.cdiv(NQ, cfg.BLOCK_M), B * H)](
            out, dout, lse, delta, m_row, *rn_args, *aux_ptrs,
            *out.stride(), *dout.stride(),
            *((*q.stride(), *k.stride()) if plan.row_norm else ()),
            *aux_flat,
            H, NQ, NK,
            HEAD_DIM_V=spec.head_dim_v,
            BLOCK_DV=plan.block_dv,
            BLOCK_M=cfg.BLOCK_M,
            BLOCK_N=cfg.BLOCK_N,
            **rn_consts,
            **cfg.launch_kwargs(interpret),
        )  # fmt: skip
        LAUNCHES["bwd_pre"] += 1
    else:
        delta.zero_()
        m_row.zero_()
    dead = []
    if plan.can_skip and softmax and not zero:
        dead = [torch.isneginf(lse).any(-1).to(torch.int32).contiguous()]

    cfg = _cfg(spec, "bwd_dkdv", interpret)
    mod._attn_bwd_dkdv[(triton.cdiv(NK, cfg.BLOCK_N), B * HK)](
        q, k, v, dout, m_row, delta, dk, dv, *lg, *aux_ptrs, *dead,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *dk.stride(), *dv.stride(), *aux_flat,
        H, NQ, NK, *bounds,
        **consts,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        **extra,
        **cfg.launch_kwargs(interpret),
    )  # fmt: skip
    LAUNCHES["bwd_dkdv"] += 1

    cfg = _cfg(spec, "bwd_dq", interpret)
    mod._attn_bwd_dq[(triton.cdiv(NQ, cfg.BLOCK_M), B * H)](
        q, k, v, dout, m_row, delta, dq, *lg, *aux_ptrs,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *dq.stride(), *aux_flat,
        H, NQ, NK, *bounds,
        **consts,
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        **extra,
        **cfg.launch_kwargs(interpret),
    )  # fmt: skip
    LAUNCHES["bwd_dq"] += 1
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# Ahead-of-time compile targets (tests/codegen/test_aot_sm90.py, benchmarks)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelTarget:
    """One generated kernel with a full signature, ready for ``triton.compile``."""

    name: str  # "fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"
    fn: object  # a real triton JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    config: Config
    attrs: dict = dataclasses.field(default_factory=dict)
    index: int = 0  # position of ``config`` in the kernel's candidate list (0: the default)

    def source(self):
        from triton.compiler import ASTSource

        return ASTSource(
            fn=self.fn, signature=self.signature, constexprs=self.constexprs, attrs=self.attrs
        )


def _tt(name: str) -> str:
    from attnfx.ops import torch_dtype

    dt = torch_dtype(name)
    return _TORCH_TO_TRITON[torch.uint8 if dt == torch.bool else dt]


def kernel_targets(spec: AttentionSpec, candidates: bool = True) -> list[KernelTarget]:
    """(kernel fn, signature, constexprs, config) for every GPU kernel of ``spec`` and,
    with ``candidates``, every candidate launch config an autotuner may pick (else only
    the default), as launched on contiguous (B, H, N, D) inputs (unit innermost strides
    are specialized to the constant 1, as the launcher's JIT does)."""
    plan = make_plan(spec)
    fwd = cache.load_module(spec, "fwd", interpret=False)
    bwd = cache.load_module(spec, "bwd", interpret=False)
    cfgs = configs(spec, interpret=False)
    dt, odt = _tt(spec.dtype), _tt(spec.out_dtype)
    tanh = {"TANH_IMPL": tanh_impl(spec, False)} if plan.uses_tanh else {}
    dims = dict(
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim_v,
        BLOCK_D=plan.block_d,
        BLOCK_DV=plan.block_dv,
    )
    aux_types = {f"A{i}": "*" + _tt(spec.aux_dtypes[i]) for i in plan.aux_used}
    softmax, zero = spec.activation == "softmax", spec.fully_masked == "zero"

    def build(name, fn, types, cfg, consts, index):
        sig, cx = {}, {}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg], cx[arg] = "constexpr", consts[arg]
            elif (
                arg.endswith("d")
                and arg.startswith("stride_")
                or arg.endswith("n")
                and arg.startswith("stride_a")
            ):
                # innermost strides: 1 for contiguous q/k/v/o and for aux along keys
                sig[arg], cx[arg] = "constexpr", 1
            elif arg in types:
                sig[arg] = types[arg]
            else:
                sig[arg] = "i32"
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, arg in enumerate(fn.arg_names)
            if sig[arg].startswith("*")
        }
        return KernelTarget(name, fn, sig, cx, cfg, attrs, index)

    def cands(name):
        return list(enumerate(cfgs[name] if candidates else cfgs[name][:1]))

    out = []
    types = {
        "Q": "*" + dt,
        "K": "*" + dt,
        "V": "*" + dt,
        "Out": "*" + odt,
        "Lse": "*fp32",
        **aux_types,
    }
    for i, c in cands("fwd"):
        consts = dict(GROUP=spec.gqa_group, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, **dims, **tanh)
        out.append(build("fwd", fwd._attn_fwd, types, c, consts, i))
    types = {
        "Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "DO": "*" + odt, "Out": "*" + odt,
        "Lse": "*fp32", "Delta": "*fp32", "M": "*fp32", "Lg": "*fp32", "Dead": "*i32",
        "DQ": "*" + dt, "DK": "*" + dt, "DV": "*" + dt, **aux_types,
    }  # fmt: skip
    if softmax or zero:
        for i, c in cands("bwd_pre"):
            consts = dict(BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, **dims)
            if plan.row_norm:
                consts.update(GROUP=spec.gqa_group, **tanh)
            out.append(build("bwd_pre", bwd._attn_bwd_preprocess, types, c, consts, i))
    for name, fn in (("bwd_dkdv", bwd._attn_bwd_dkdv), ("bwd_dq", bwd._attn_bwd_dq)):
        for i, c in cands(name):
            consts = dict(
                GROUP=spec.gqa_group, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, **dims, **tanh
            )
            out.append(build(name, fn, types, c, consts, i))
    return out
