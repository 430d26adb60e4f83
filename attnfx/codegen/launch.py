"""Launching the generated kernels: ``run_forward`` / ``run_backward``.

Semantics are exactly those of ``attnfx.ops.reference_attention`` and
``reference_attention_backward``.  CPU tensors run under Triton's interpreter (the op
only calls us on CPU when ``ATTNFX_INTERPRET=1``); CUDA tensors run the compiled kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
import threading

import torch
import triton

from attnfx.codegen import autotune, cache
from attnfx.codegen.plan import (
    Config,
    Plan,
    apply_features,
    configs,
    features,
    features_key,
    make_plan,
    skip_bounds,
)
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


# Triton's interpreter keeps global state (its builder, patched tl functions): launches
# from two threads at once corrupt each other, so interpreted runs take turns.
_INTERPRETER_LOCK = threading.RLock()


def _serialized_under_interpreter(fn):
    @functools.wraps(fn)
    def run(spec, *tensors):
        if _interpret(tensors[0]):
            with _INTERPRETER_LOCK:
                return fn(spec, *tensors)
        return fn(spec, *tensors)

    return run


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


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _max_shared(device: torch.device) -> int | None:
    try:
        from triton.runtime import driver

        idx = device.index if device.index is not None else torch.cuda.current_device()
        return int(driver.active.utils.get_device_properties(idx)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - unknown: the launch itself will refuse
        return None


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Device-side tensor descriptors over each head's (N, D) matrix: unit last stride,
    16-byte aligned base and (batch, head, row) strides."""
    for t in ts:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((st * es) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _ensure_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need a small global scratch buffer per launch."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):

        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device=device)

        triton.set_allocator(alloc)


def _candidates(spec: AttentionSpec, kernel: str, interpret: bool, tma_ok: bool = False):
    cands = configs(spec, interpret)[kernel]
    if kernel == "fwd":  # forced habits apply under the interpreter too (tests)
        cands = apply_features(cands, features(), {"tma": tma_ok})
    return cands


def _pick(spec, kernel, fn, cands, interpret, nq, nk, device, grid_of, make_args, consts):
    """The launch config: the first candidate, or the autotuner's choice (CUDA only).

    ``make_args(scratch)``: the kernel's positional arguments, on scratch outputs when
    ``scratch`` (benchmark launches must not touch the real results); ``consts``: its
    constexprs other than the config's."""
    if interpret or len(cands) == 1 or not autotune.enabled():
        return cands[0]
    if torch.cuda.is_current_stream_capturing():
        # no benchmarking inside a CUDA graph capture: a choice made earlier, else the default
        key = autotune.make_key(spec, kernel, nq, nk, _gpu_name(device), cands, features_key())
        return autotune.TUNER.cached(key, cands) or cands[0]
    key = autotune.make_key(spec, kernel, nq, nk, _gpu_name(device), cands, features_key())

    def kwargs(c: Config) -> dict:
        kw = dict(consts, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, **c.launch_kwargs(False))
        if kernel == "fwd":
            kw.update(c.habit_constexprs())
        return kw

    def compile_fn(c: Config) -> dict:
        k = fn.warmup(*make_args(True), grid=grid_of(c), **kwargs(c))
        k._init_handles()  # raises OutOfResources past the device's shared memory
        return {"n_spills": k.n_spills, "n_regs": k.n_regs, "shared": k.metadata.shared}

    def bench_fn(c: Config):
        args, kw, grid = make_args(True), kwargs(c), grid_of(c)
        return lambda: fn[grid](*args, **kw)

    return autotune.TUNER.choose(
        key, cands, compile_fn=compile_fn, bench_fn=bench_fn, max_shared=_max_shared(device)
    )


@_serialized_under_interpreter
def run_forward(spec: AttentionSpec, q, k, v, aux) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, Hq, NQ, Dv) in ``spec.out_dtype``, laid out in memory as
    ``spec.out_layout`` says (``attnfx.ops.empty_output``); lse (B, Hq, NQ) float32."""
    from attnfx.layout import empty_output

    spec = spec.resolved(q.shape[-1], v.shape[-1])  # one kernel per concrete head dim
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
    aux_ptrs, aux_strides = _aux_lists(plan, aux)
    extra = {"TANH_IMPL": tanh_impl(spec, interpret)} if plan.uses_tanh else {}
    consts = dict(
        GROUP=spec.gqa_group,
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim_v,
        BLOCK_D=plan.block_d,
        BLOCK_DV=plan.block_dv,
        **extra,
    )

    def make_args(scratch: bool):
        o, ls = (torch.empty_like(out), torch.empty_like(lse)) if scratch else (out, lse)
        return (
            q, k, v, o, ls, *aux_ptrs,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            *[s for st in aux_strides for s in st],
            H, NQ, NK, *bounds,
        )  # fmt: skip

    def grid_of(c: Config):
        return (triton.cdiv(NQ, c.BLOCK_M), B * H)

    cands = _candidates(spec, "fwd", interpret, _tma_ok(q, k, v))
    if not interpret and any(c.tma for c in cands):
        _ensure_allocator(q.device)
    fn = mod._attn_fwd
    cfg = _pick(spec, "fwd", fn, cands, interpret, NQ, NK, q.device, grid_of, make_args, consts)
    fn[grid_of(cfg)](
        *make_args(False), **consts, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        **cfg.habit_constexprs(), **cfg.launch_kwargs(interpret),
    )  # fmt: skip
    LAUNCHES["fwd"] += 1
    return out, lse


@_serialized_under_interpreter
def run_backward(spec: AttentionSpec, dout, q, k, v, aux, out, lse):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    spec = spec.resolved(q.shape[-1], v.shape[-1])
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
    softmax = spec.act.normalized  # a row normalizer: the preprocess, dead rows
    zero = spec.fully_masked == "zero"
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    m_row = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    # row_norm: log(l) of the rows whose huge float32 lse lost it (0 elsewhere)
    lg = [torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)] if plan.row_norm else []
    if softmax:
        cfg = _candidates(spec, "bwd_pre", interpret)[0]
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

    # dK/dV and dQ: tuned on scratch copies of their outputs (tl.store only, but the
    # benchmark launches must never touch the real gradients)
    consts = dict(consts, **extra)

    def dkdv_args(scratch: bool):
        k_, v_ = (torch.empty_like(dk), torch.empty_like(dv)) if scratch else (dk, dv)
        return (
            q, k, v, dout, m_row, delta, k_, v_, *lg, *aux_ptrs, *dead,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *k_.stride(), *v_.stride(), *aux_flat,
            H, NQ, NK, *bounds,
        )  # fmt: skip

    def dkdv_grid(c: Config):
        return (triton.cdiv(NK, c.BLOCK_N), B * HK)

    fn = mod._attn_bwd_dkdv
    cands = _candidates(spec, "bwd_dkdv", interpret)
    cfg = _pick(spec, "bwd_dkdv", fn, cands, interpret, NQ, NK, q.device, dkdv_grid, dkdv_args, consts)  # fmt: skip
    fn[dkdv_grid(cfg)](
        *dkdv_args(False), **consts, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        **cfg.launch_kwargs(interpret),
    )  # fmt: skip
    LAUNCHES["bwd_dkdv"] += 1

    def dq_args(scratch: bool):
        q_ = torch.empty_like(dq) if scratch else dq
        return (
            q, k, v, dout, m_row, delta, q_, *lg, *aux_ptrs,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            *q_.stride(), *aux_flat,
            H, NQ, NK, *bounds,
        )  # fmt: skip

    def dq_grid(c: Config):
        return (triton.cdiv(NQ, c.BLOCK_M), B * H)

    fn = mod._attn_bwd_dq
    cands = _candidates(spec, "bwd_dq", interpret)
    cfg = _pick(spec, "bwd_dq", fn, cands, interpret, NQ, NK, q.device, dq_grid, dq_args, consts)
    fn[dq_grid(cfg)](
        *dq_args(False), **consts, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
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
    from attnfx.layout import torch_dtype

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
    softmax = spec.act.normalized  # a row normalizer: the preprocess, dead rows

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
            if sig[arg].startswith("*") or (sig[arg] == "i32" and _div16_stride(arg))
        }
        return KernelTarget(name, fn, sig, cx, cfg, attrs, index)

    def _div16_stride(arg):
        # the launcher's JIT specializes integer arguments divisible by 16 (tt.divisibility
        # 16): the strides of contiguous q/k/v/o/dO/dq/dk/dv rows are multiples of the head
        # dim (sequence lengths and aux strides are left generic)
        m = re.fullmatch(r"stride_(q|k|v|o|do|dq|dk|dv)[bhmn]", arg)
        if not m:
            return False
        d = spec.head_dim_v if m.group(1) in ("v", "o", "do", "dv") else spec.head_dim
        return d % 16 == 0

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
        consts = dict(
            GROUP=spec.gqa_group,
            BLOCK_M=c.BLOCK_M,
            BLOCK_N=c.BLOCK_N,
            **c.habit_constexprs(),
            **dims,
            **tanh,
        )
        out.append(build("fwd", fwd._attn_fwd, types, c, consts, i))
    types = {
        "Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "DO": "*" + odt, "Out": "*" + odt,
        "Lse": "*fp32", "Delta": "*fp32", "M": "*fp32", "Lg": "*fp32", "Dead": "*i32",
        "DQ": "*" + dt, "DK": "*" + dt, "DV": "*" + dt, **aux_types,
    }  # fmt: skip
    if softmax:
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
