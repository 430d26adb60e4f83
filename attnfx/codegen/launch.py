"""Launching the generated kernels: ``run_forward`` / ``run_backward``.

Semantics are exactly those of ``attnfx.ops.reference_attention`` and
``reference_attention_backward``.  CPU tensors run under Triton's interpreter (the op
only calls us on CPU when ``ATTNFX_INTERPRET=1``); CUDA tensors run the compiled kernels.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading

import torch
import triton

from attnfx.codegen import autotune, cache, signature, tiles
from attnfx.codegen.plan import (
    FEATURES_ENV,
    Config,
    Plan,
    ScheduleKind,
    apply_features,
    configs,
    features,
    features_key,
    make_plan,
    skip_bounds,
)
from attnfx.layout import empty_output, lse_shape, lse_value
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
    def run(spec, *tensors, **kwargs):
        if _interpret(tensors[0]):
            with _INTERPRETER_LOCK:
                return fn(spec, *tensors, **kwargs)
        return fn(spec, *tensors, **kwargs)

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


def aux_broadcast(a: torch.Tensor) -> str:
    """How an aux tensor (B, H, NQ, NK) varies over the score tile (``AttentionSpec.aux_bcast``),
    read from its shape and strides: a size-1 or stride-0 dim is constant along it."""
    row = a.shape[-1] == 1 or a.stride(-1) == 0
    col = a.shape[-2] == 1 or a.stride(-2) == 0
    return ("full", "col", "row", "one")[2 * row + col]


def with_aux_broadcast(spec: AttentionSpec, aux: list[torch.Tensor]) -> AttentionSpec:
    """``spec`` with each aux tensor's broadcast pattern: the kernels then read a per-query
    or per-key operand as a vector, not as a tile of repeated values."""
    if not aux:
        return spec
    return dataclasses.replace(spec, aux_bcast=tuple(aux_broadcast(a) for a in aux))


def _shape_consts(spec: AttentionSpec, plan: Plan, interpret: bool) -> dict:
    """The constexprs every kernel may declare, but the launch config's (each kernel
    picks its own through its signature)."""
    extra = {"TANH_IMPL": tanh_impl(spec, interpret)} if plan.uses_tanh else {}
    return dict(
        TABLE_GRAD=False,  # (the dQ kernel's bias-table gradients: run_table_grads)
        GROUP=spec.gqa_group,
        HEAD_DIM=spec.head_dim,
        HEAD_DIM_V=spec.head_dim_v,
        BLOCK_D=plan.block_d,
        BLOCK_DV=plan.block_dv,
        **extra,
    )


def _aux_tensors(plan: Plan, aux: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The aux tensors the kernels read, by their signature names (a0, a1, ...)."""
    return {f"a{i}": _aux_arg(aux[i]) for i in plan.aux_used}


_BAND_BOUNDS = ("visit_lo", "visit_hi", "diag_lo", "diag_hi", "visit_prefix")


def _schedule_args(spec, plan, nq, nk, cfg: Config, transposed: bool, device):
    """(tensors, scalars) of the kernel's schedule parameters for one launch config: the
    band's bounds, or the tile map's lists (row tiles of BLOCK_M queries; ``transposed``:
    of BLOCK_N keys, for dK/dV)."""
    if plan.schedule.kind is ScheduleKind.TILES:
        pred = spec.score_ops[plan.schedule.skip_op].pred
        lists = tiles.device_lists(pred, nq, nk, cfg.BLOCK_M, cfg.BLOCK_N, transposed, device)
        return {"tile_off": lists.off, "tile_idx": lists.idx}, {}
    return {}, dict(zip(_BAND_BOUNDS, skip_bounds(spec, plan, nq, nk), strict=True))


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


def _pick(spec, kernel, fn, cands, interpret, nq, nk, device, grid_of, make_args, consts_of):
    """The launch config: the first candidate, or the autotuner's choice (CUDA only).

    ``make_args(scratch, config)``: the kernel's positional arguments, on scratch outputs
    when ``scratch`` (benchmark launches must not touch the real results);
    ``consts_of(config)``: its constexprs."""
    if interpret or len(cands) == 1 or not autotune.enabled():
        return cands[0]
    if torch.cuda.is_current_stream_capturing():
        # no benchmarking inside a CUDA graph capture: a choice made earlier, else the default
        key = autotune.make_key(spec, kernel, nq, nk, _gpu_name(device), cands, features_key())
        return autotune.TUNER.cached(key, cands) or cands[0]
    key = autotune.make_key(spec, kernel, nq, nk, _gpu_name(device), cands, features_key())

    def kwargs(c: Config) -> dict:
        return dict(consts_of(c), **c.launch_kwargs(False))

    def compile_fn(c: Config) -> dict:
        k = fn.warmup(*make_args(True, c), grid=grid_of(c), **kwargs(c))
        k._init_handles()  # raises OutOfResources past the device's shared memory
        return {"n_spills": k.n_spills, "n_regs": k.n_regs, "shared": k.metadata.shared}

    def bench_fn(c: Config):
        args, kw, grid = make_args(True, c), kwargs(c), grid_of(c)
        return lambda: fn[grid](*args, **kw)

    return autotune.TUNER.choose(
        key, cands, compile_fn=compile_fn, bench_fn=bench_fn, max_shared=_max_shared(device)
    )


# ---------------------------------------------------------------------------------------
# Launch recipes: what a call needs besides its tensors, found once per spec and shapes
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One kernel launch with everything fixed but the tensors: the function, its
    argument binder, grid, constexprs and launch options, and the schedule's arguments
    (band bounds or tile lists) at the recipe's lengths."""

    name: str  # the LAUNCHES counter's key
    fn: object
    sig: signature.Signature
    grid: tuple
    kwargs: dict  # constexprs + num_warps / num_stages / maxnreg
    sched_tensors: dict
    sched_scalars: dict

    def __call__(self, tensors: dict, scalars: dict) -> None:
        args = self.sig.bind({**tensors, **self.sched_tensors}, {**scalars, **self.sched_scalars})
        self.fn[self.grid](*args, **self.kwargs)
        LAUNCHES[self.name] += 1


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """The launches of one spec at one set of shapes on one device: the per-call work is
    then allocating the outputs, binding pointers and strides, and the launches.

    Finding one costs the spec's plan, signatures, candidate configs (the autotuner's
    choice on CUDA), band bounds and tile lists: about half a millisecond of host time,
    more than a whole kernel at N=4096.  ``module`` is the generated module the launches
    came from: a recipe whose module left the module cache is found again."""

    spec: AttentionSpec  # resolved, with the aux tensors' broadcast patterns
    plan: Plan
    module_key: tuple
    module: object
    generation: int  # the autotuner's (a cleared choice is found again)
    launches: dict  # kernel name -> _Launch

    def current(self) -> bool:
        return (
            cache._modules.get(self.module_key) is self.module
            and self.generation == autotune.TUNER.generation
        )


_RECIPES: collections.OrderedDict = collections.OrderedDict()
_RECIPES_MAX = 512
_recipes_lock = threading.Lock()


def _recipe_key(part: str, spec: AttentionSpec, q, k, v, aux, tma: bool = False) -> tuple:
    """What a launch depends on besides the tensors' data: the spec, the aux tensors'
    broadcast patterns, every length, the device, TMA's alignment and the environment
    switches that change configs (forced habits, autotuning)."""
    return (
        part,
        spec.key,
        tuple(aux_broadcast(a) for a in aux),
        tuple(q.shape),
        tuple(k.shape),
        v.shape[-1],
        q.device,
        tma,
        q.dtype,
        os.environ.get(FEATURES_ENV, ""),
        os.environ.get(autotune.ENV, ""),
    )


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _recipe(key: tuple, device: torch.device, build) -> _Recipe:
    with _recipes_lock:
        r = _RECIPES.get(key)
        if r is not None and r.current():
            _RECIPES.move_to_end(key)
            return r
    r = build()
    if r is not None and not _capturing(device):
        # (a choice made inside a CUDA graph capture may be a default the tuner later
        # replaces: not remembered)
        with _recipes_lock:
            _RECIPES[key] = r
            while len(_RECIPES) > _RECIPES_MAX:
                _RECIPES.popitem(last=False)
    return r


def clear_recipes() -> None:
    with _recipes_lock:
        _RECIPES.clear()


def _prepare(spec: AttentionSpec, part: str, q, k, v, aux, interpret: bool):
    """(spec resolved at q's and v's head dims with the aux broadcast patterns, its plan,
    the module key, the module)."""
    spec = spec.resolved(q.shape[-1], v.shape[-1])  # one kernel per concrete head dim
    spec = with_aux_broadcast(spec, aux)
    _check(spec, q, k, v)
    mod = cache.load_module(spec, part, interpret)
    return spec, make_plan(spec), (spec.kernel_key, part, interpret), mod


def _forward_recipe(spec: AttentionSpec, q, k, v, aux, tma_ok: bool) -> _Recipe:
    interpret = _interpret(q)
    generation = autotune.TUNER.generation
    spec, plan, mkey, mod = _prepare(spec, "fwd", q, k, v, aux, interpret)
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    sig = signature.forward_args(spec, plan)
    tensors = {"q": q, "k": k, "v": v, **_aux_tensors(plan, aux)}
    scalars = {"H_Q": H, "N_Q": NQ, "N_K": NK}
    consts = _shape_consts(spec, plan, interpret)
    out = empty_output(q, v, spec)
    lse = torch.empty(lse_shape(spec, B, H, NQ), dtype=torch.float32, device=q.device)

    def make_args(scratch: bool, c: Config):
        assert scratch  # (tuning launches only: the real one goes through the recipe)
        st, ss = _schedule_args(spec, plan, NQ, NK, c, False, q.device)
        o = {"o": torch.empty_like(out), "lse": torch.empty_like(lse)}
        return sig.bind({**tensors, **o, **st}, {**scalars, **ss})

    def consts_of(c: Config):
        return dict(consts, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, **c.habit_constexprs())

    def grid_of(c: Config):
        return (triton.cdiv(NQ, c.BLOCK_M), B * H)

    cands = _candidates(spec, "fwd", interpret, tma_ok)
    if not interpret and any(c.tma for c in cands):
        _ensure_allocator(q.device)
    fn = mod._attn_fwd
    cfg = cands[0]
    if B * H * NQ:
        cfg = _pick(spec, "fwd", fn, cands, interpret, NQ, NK, q.device, grid_of, make_args, consts_of)  # fmt: skip
    st, ss = _schedule_args(spec, plan, NQ, NK, cfg, False, q.device) if B * H * NQ else ({}, {})
    fwd = _Launch(
        "fwd", fn, sig, grid_of(cfg),
        dict(sig.pick(consts_of(cfg)), **cfg.launch_kwargs(interpret)), st, ss,
    )  # fmt: skip
    return _Recipe(spec, plan, mkey, mod, generation, {"fwd": fwd})


@_serialized_under_interpreter
def run_forward(spec: AttentionSpec, q, k, v, aux) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, Hq, NQ, Dv) in ``spec.out_dtype``, laid out in memory as
    ``spec.out_layout`` says (``attnfx.ops.empty_output``); lse float32 (B, Hq, NQ), or
    (B, Hq, NQ, 2) for a float32 softmax (``layout.split_lse``)."""
    tma_ok = _tma_ok(q, k, v)
    key = _recipe_key("fwd", spec, q, k, v, aux, tma_ok)
    r = _recipe(key, q.device, lambda: _forward_recipe(spec, q, k, v, aux, tma_ok))
    _check(r.spec, q, k, v)
    B, H, NQ, _ = q.shape
    # the output in the spec's memory order (bhnd or bnhd); the kernel writes through
    # its strides
    out = empty_output(q, v, r.spec)
    lse = torch.empty(lse_shape(r.spec, B, H, NQ), dtype=torch.float32, device=q.device)
    if B * H * NQ == 0:
        return out, lse
    tensors = {"q": q, "k": k, "v": v, "o": out, "lse": lse, **_aux_tensors(r.plan, aux)}
    r.launches["fwd"](tensors, {"H_Q": H, "N_Q": NQ, "N_K": k.shape[2]})
    return out, lse


_BACKWARD = ("bwd_dkdv", "bwd_dq")


def _backward_recipe(spec: AttentionSpec, dout, q, k, v, aux, out, lse) -> _Recipe:
    interpret = _interpret(q)
    generation = autotune.TUNER.generation
    spec, plan, mkey, mod = _prepare(spec, "bwd", q, k, v, aux, interpret)
    B, H, NQ, _ = q.shape
    HK, NK = k.shape[1], k.shape[2]
    consts = _shape_consts(spec, plan, interpret)
    launches: dict[str, _Launch] = {}
    if B * H * NQ == 0 or NK == 0:
        return _Recipe(spec, plan, mkey, mod, generation, launches)
    scalars = {"H_Q": H, "N_Q": NQ, "N_K": NK}
    tensors = _backward_tensors(plan, spec, dout, q, k, v, aux, out, lse)
    tensors.update(dq=q, dk=k, dv=v)  # (shapes and strides only: tuning uses scratch)

    def consts_of(c: Config):
        return dict(consts, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N)

    def make(name, sig, fn, cfg, grid, transposed: bool | None, **extra):
        # transposed: the schedule's lists of key tiles (dK/dV); None: no schedule
        st, ss = ({}, {})
        if transposed is not None:
            st, ss = _schedule_args(spec, plan, NQ, NK, cfg, transposed, q.device)
        kw = dict(sig.pick(dict(consts_of(cfg), **extra)), **cfg.launch_kwargs(interpret))
        return _Launch(name, fn, sig, grid, kw, st, ss)

    if spec.act.normalized:  # a row normalizer: the preprocess, dead rows
        cfg = _candidates(spec, "bwd_pre", interpret)[0]
        sig = signature.preprocess_args(spec, plan)
        grid = (triton.cdiv(NQ, cfg.BLOCK_M), B * H)
        launches["bwd_pre"] = make("bwd_pre", sig, mod._attn_bwd_preprocess, cfg, grid, None)
    if plan.table_grads:
        # the dQ kernel adding dS into the tables (atomics: no tuning launches, which
        # would add into them too)
        sig = signature.dq_args(spec, plan)
        cfg = _candidates(spec, "bwd_dq", interpret)[0]
        grid = (triton.cdiv(NQ, cfg.BLOCK_M), B * H)
        launches["bwd_dq_table"] = make(
            "bwd_dq", sig, getattr(mod, sig.name), cfg, grid, False, TABLE_GRAD=True
        )
    # dK/dV and dQ: tuned on scratch copies of their outputs (tl.store only, but the
    # benchmark launches must never touch the real gradients)
    for kernel in _BACKWARD:
        sig = signature.KERNEL_ARGS[kernel](spec, plan)
        dkdv = kernel == "bwd_dkdv"
        outs = ("dk", "dv") if dkdv else ("dq",)

        def make_args(scratch: bool, c: Config, sig=sig, outs=outs, dkdv=dkdv):
            assert scratch
            # contiguous, as the real gradients are
            o = {
                n: torch.empty(tensors[n].shape, dtype=tensors[n].dtype, device=q.device)
                for n in outs
            }
            st, ss = _schedule_args(spec, plan, NQ, NK, c, dkdv, q.device)
            return sig.bind({**tensors, **o, **st}, {**scalars, **ss})

        def grid_of(c: Config, dkdv=dkdv):
            if dkdv:  # a program per key tile of a kv head
                return (triton.cdiv(NK, c.BLOCK_N), B * HK)
            return (triton.cdiv(NQ, c.BLOCK_M), B * H)

        fn = getattr(mod, sig.name)
        cands = _candidates(spec, kernel, interpret)
        cfg = _pick(spec, kernel, fn, cands, interpret, NQ, NK, q.device, grid_of, make_args, consts_of)  # fmt: skip
        launches[kernel] = make(kernel, sig, fn, cfg, grid_of(cfg), dkdv)
    return _Recipe(spec, plan, mkey, mod, generation, launches)


def _backward_tensors(plan, spec, dout, q, k, v, aux, out, lse) -> dict:
    """The inputs every backward kernel may read, by their signature names."""
    tensors = {"q": q, "k": k, "v": v, "o": out, "do": dout, "lse": lse}
    tensors.update(_aux_tensors(plan, aux))
    B, H, NQ = lse.shape[:3]
    for name in ("delta", "m") + (("lg",) if plan.uses_lg else ()):
        # lg: the rest of the lse pair past its float32 row statistic (Plan.lse64),
        # or log(l) of the rows whose huge float32 lse lost it (row_norm; 0 elsewhere)
        tensors[name] = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if signature.dead_rows_fix(spec, plan):
        tensors["dead"] = torch.isneginf(lse_value(lse)).any(-1).to(torch.int32).contiguous()
    for i in plan.table_grads:
        # float64: each entry sums dS over every pair that reads it, in the atomics' order
        # (not eager's index_add order); in float32 that order alone put a NAT table's
        # gradient at 3.4x eager's error, over the rule (float64 atomics: sm_60 and up)
        tensors[f"dt{i}"] = torch.zeros(
            (B, H, aux[i].shape[-1]), dtype=torch.float64, device=q.device
        )
    return tensors


@_serialized_under_interpreter
def run_backward(spec: AttentionSpec, dout, q, k, v, aux, out, lse, table_grads=None):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v.  With ``table_grads`` (aux
    indices of ``Plan.table_grads``): instead, those bias tables' gradients, (B, H, T)
    float64 each, from the dQ kernel run with TABLE_GRAD (dK/dV are not run)."""
    key = _recipe_key("bwd", spec, q, k, v, aux)
    r = _recipe(key, q.device, lambda: _backward_recipe(spec, dout, q, k, v, aux, out, lse))
    _check(r.spec, q, k, v)
    plan = r.plan
    if table_grads is not None:
        assert set(table_grads) <= set(plan.table_grads), (table_grads, plan.table_grads)
    B, H, NQ, _ = q.shape
    NK = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B * H * NQ == 0 or NK == 0:
        if table_grads is not None:
            return [torch.zeros((B, H, aux[i].shape[-1]), dtype=torch.float64, device=q.device)
                    for i in table_grads]  # fmt: skip
        return dq.zero_(), dk.zero_(), dv.zero_()
    tensors = _backward_tensors(plan, r.spec, dout, q, k, v, aux, out, lse)
    tensors.update(dq=dq, dk=dk, dv=dv)
    scalars = {"H_Q": H, "N_Q": NQ, "N_K": NK}
    if "bwd_pre" in r.launches:
        r.launches["bwd_pre"](tensors, scalars)
    else:  # no row normalizer (sigmoid): no preprocess
        tensors["delta"].zero_()
        tensors["m"].zero_()
    if table_grads is not None:
        r.launches["bwd_dq_table"](tensors, scalars)
        return [tensors[f"dt{i}"] for i in table_grads]
    for kernel in _BACKWARD:
        r.launches[kernel](tensors, scalars)
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
    mods = {
        "fwd": cache.load_module(spec, "fwd", interpret=False),
        "bwd": cache.load_module(spec, "bwd", interpret=False),
    }
    cfgs = configs(spec, interpret=False)
    dt, odt = _tt(spec.dtype), _tt(spec.out_dtype)
    # pointer types by the signatures' tensor names
    types = dict.fromkeys(("q", "k", "v", "dq", "dk", "dv"), dt)
    types.update(dict.fromkeys(("o", "do"), odt))
    types.update(dict.fromkeys(("lse", "delta", "m", "lg"), "fp32"))
    types.update(dead="i32", tile_off="i32", tile_idx="i32")
    types.update({f"a{i}": _tt(spec.aux_dtypes[i]) for i in plan.aux_used})
    types.update({f"dt{i}": "fp64" for i in plan.table_grads})
    consts = _shape_consts(spec, plan, interpret=False)

    def div16(p) -> bool:
        # the launcher's JIT specializes integer arguments divisible by 16 (tt.divisibility
        # 16): the batch, head and row strides of contiguous q/k/v/o/dO/dq/dk/dv are
        # multiples of the head dim (sequence lengths and aux strides are left generic)
        if p.kind != "stride" or p.dim == 3 or p.tensor not in signature.DIMS:
            return False
        d = spec.head_dim_v if p.tensor in ("v", "o", "do", "dv") else spec.head_dim
        return d % 16 == 0

    def build(name, fn, sig, cfg, index, **extra):
        assert sig.names == list(fn.arg_names), (sig.names, fn.arg_names)
        cs = sig.pick(
            dict(
                consts, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **cfg.habit_constexprs(), **extra
            )
        )
        types_, cx = {}, {}
        for p in sig.params:
            if p.kind == "constexpr":
                types_[p.name], cx[p.name] = "constexpr", cs[p.name]
            elif p.kind == "stride" and p.dim == 3:
                # innermost strides: 1 for contiguous q/k/v/o and for aux along keys
                types_[p.name], cx[p.name] = "constexpr", 1
            elif p.kind == "ptr":
                types_[p.name] = "*" + types[p.tensor]
            else:
                types_[p.name] = "i32"
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(sig.params)
            if p.kind == "ptr" or div16(p)
        }
        return KernelTarget(name, fn, types_, cx, cfg, attrs, index)

    out = []
    for name, args in signature.KERNEL_ARGS.items():
        if name == "bwd_pre" and not spec.act.normalized:
            continue  # sigmoid has no preprocess
        sig = args(spec, plan)
        fn = getattr(mods["fwd" if name == "fwd" else "bwd"], sig.name)
        for i, c in enumerate(cfgs[name] if candidates else cfgs[name][:1]):
            out.append(build(name, fn, sig, c, i))
        if name == "bwd_dq" and plan.table_grads:  # the bias-table gradient variant
            out.append(build("bwd_dq_table", fn, sig, cfgs[name][0], 0, TABLE_GRAD=True))
    return out
