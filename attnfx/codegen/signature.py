"""Kernel argument lists, declared once.

A ``Signature`` is the ordered parameter list of one ``@triton.jit`` function.  The
templates print it (the ``def`` and, for inner functions, the call), the launcher binds
its runtime arguments from named tensors and scalars, and the ahead-of-time targets read
its types from it -- so the positional order is written in exactly one place: the
``*_args`` functions below (the kernels) and the inner-function declarations of
``attnfx.codegen.emit``.
"""

from __future__ import annotations

import dataclasses
import functools

from attnfx.codegen.plan import Plan, ScheduleKind
from attnfx.spec import AttentionSpec

# Stride letters of a (batch, head, row, column) tensor, by role: query-indexed tensors
# use m for their rows, key-indexed ones n, aux tensors (B, H, NQ, NK) m and n.
DIMS = {
    **dict.fromkeys(("q", "o", "do", "dq"), "bhmd"),
    **dict.fromkeys(("k", "v", "dk", "dv"), "bhnd"),
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter.  ``kind``: "ptr" (a tensor's data pointer), "stride", "int" (a
    runtime scalar), "constexpr", or "value" (an inner function's tile or scalar).
    ``tensor``: the launcher's name of the tensor a pointer or stride belongs to;
    ``dim``: a stride's dimension.  ``arg``: what a caller passes (inner functions;
    default: the parameter's own name)."""

    name: str
    kind: str = "value"
    tensor: str | None = None
    dim: int | None = None
    arg: str | None = None

    def declaration(self) -> str:
        return f"{self.name}: tl.constexpr" if self.kind == "constexpr" else self.name


@dataclasses.dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[Param, ...]

    def __post_init__(self):
        names = [p.name for p in self.params]
        assert len(set(names)) == len(names), f"{self.name}: repeated parameter"
        kinds = [p.kind == "constexpr" for p in self.params]
        # constexprs last: the runtime arguments are then passed by position
        assert kinds == sorted(kinds), f"{self.name}: a runtime parameter after a constexpr"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def runtime(self) -> list[Param]:
        return [p for p in self.params if p.kind != "constexpr"]

    @property
    def constexprs(self) -> list[str]:
        return [p.name for p in self.params if p.kind == "constexpr"]

    # -- printing (templates) -------------------------------------------------------------
    def declaration(self, indent: int = 4) -> str:
        """The ``def`` line's parameters, one a line."""
        return _lines([p.declaration() for p in self.params], indent)

    def call(self, indent: int, **given: str) -> str:
        """The arguments of a call: each parameter's ``arg`` (or name), ``given`` for the
        ones this call sets (the loop bounds, APPLY_MASK)."""
        unknown = set(given) - set(self.names)
        assert not unknown, f"{self.name}: no parameter {sorted(unknown)}"
        return _lines([given.get(p.name, p.arg or p.name) for p in self.params], indent)

    # -- binding (launcher) ---------------------------------------------------------------
    @functools.cached_property
    def _binder(self):
        return _make_binder(self.name, tuple(self.runtime))

    def bind(self, tensors: dict, scalars: dict) -> tuple:
        """The positional runtime arguments: pointers and strides from ``tensors`` (by the
        parameter's tensor name), scalars from ``scalars`` (by parameter name)."""
        try:
            return self._binder(tensors, scalars)
        except KeyError as e:
            missing = [
                p.name
                for p in self.runtime
                if (
                    p.tensor not in tensors
                    if p.kind in ("ptr", "stride")
                    else p.name not in scalars
                )
            ]
            raise KeyError(f"{self.name}: no value for {missing[0]} ({e})") from None

    def pick(self, consts: dict) -> dict:
        """The constexprs this function declares, from a superset ``consts``."""
        missing = [n for n in self.constexprs if n not in consts]
        assert not missing, f"{self.name}: no value for constexprs {missing}"
        return {n: consts[n] for n in self.constexprs}


@functools.lru_cache(maxsize=512)
def _make_binder(name: str, runtime: tuple[Param, ...]):
    """``Signature.bind`` as one generated expression (it runs on every launch): the
    strides of each tensor read once, the arguments in the signature's order.  Cached by
    the parameter list: signatures are rebuilt whenever a launch recipe is."""
    strided = list(dict.fromkeys(p.tensor for p in runtime if p.kind == "stride"))
    slot = {t: i for i, t in enumerate(strided)}
    items = []
    for p in runtime:
        if p.kind == "ptr":
            items.append(f"T[{p.tensor!r}]")
        elif p.kind == "stride":
            items.append(f"s{slot[p.tensor]}[{p.dim}]")
        else:
            items.append(f"S[{p.name!r}]")
    body = "".join(f"    s{i} = T[{t!r}].stride()\n" for i, t in enumerate(strided))
    src = f"def bind(T, S):\n{body}    return ({', '.join(items)},)\n"
    scope: dict = {}
    exec(compile(src, f"<attnfx bind {name}>", "exec"), scope)  # noqa: S102
    return scope["bind"]


def _lines(items: list[str], indent: int) -> str:
    pad = " " * indent
    return "\n".join(f"{pad}{x}," for x in items)


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def ptrs(**by_name: str) -> list[Param]:
    """Pointer parameters: ``Q="q"`` is the pointer ``Q`` of the tensor named ``q``."""
    return [Param(n, "ptr", tensor=t) for n, t in by_name.items()]


def strides(*tensors: str) -> list[Param]:
    """The four strides of each (batch, head, row, column) tensor: stride_qb ... stride_qd."""
    return [
        Param(f"stride_{t}{c}", "stride", tensor=t, dim=i)
        for t in tensors
        for i, c in enumerate(DIMS[t])
    ]


def ints(*names: str) -> list[Param]:
    return [Param(n, "int") for n in names]


def consts(*names: str) -> list[Param]:
    return [Param(n, "constexpr") for n in names]


def aux_ptrs(plan: Plan) -> list[Param]:
    return [Param(f"A{i}", "ptr", tensor=f"a{i}") for i in plan.aux_used]


def aux_strides(plan: Plan) -> list[Param]:
    return [
        Param(f"stride_a{i}{c}", "stride", tensor=f"a{i}", dim=d)
        for i in plan.aux_used
        for d, c in enumerate("bhmn")
    ]


def schedule_params(plan: Plan) -> list[Param]:
    """What a kernel is told about the tiles it visits: the K - Q band's bounds (the
    tiles' ranges are computed in the kernel), or the host tile map's lists."""
    if plan.schedule.kind is ScheduleKind.TILES:
        return ptrs(TileOff="tile_off", TileIdx="tile_idx")
    return ints("visit_lo", "visit_hi", "diag_lo", "diag_hi", "visit_prefix")


def _tanh(plan: Plan, when: bool = True) -> list[Param]:
    return consts("TANH_IMPL") if plan.uses_tanh and when else []


_SHAPES = ("GROUP", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N")


# ---------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------


def forward_args(spec: AttentionSpec, plan: Plan) -> Signature:
    return Signature(
        "_attn_fwd",
        (
            *ptrs(Q="q", K="k", V="v", Out="o", Lse="lse"),
            *aux_ptrs(plan),
            *strides("q", "k", "v", "o"),
            *aux_strides(plan),
            *ints("H_Q", "N_Q", "N_K"),
            *schedule_params(plan),
            *consts(*_SHAPES, "USE_TMA", "WARP_SPEC"),
            *_tanh(plan),
        ),
    )


def preprocess_args(spec: AttentionSpec, plan: Plan) -> Signature:
    rn = plan.row_norm  # the row-norm recompute reads q and k
    return Signature(
        "_attn_bwd_preprocess",
        (
            *ptrs(Out="o", DO="do", Lse="lse", Delta="delta", M="m"),
            *(ptrs(Lg="lg") if plan.uses_lg else []),
            *(ptrs(Q="q", K="k") if rn else []),
            *aux_ptrs(plan),
            *strides("o", "do", *(("q", "k") if rn else ())),
            *aux_strides(plan),
            *ints("H_Q", "N_Q", "N_K"),
            *consts("HEAD_DIM_V", "BLOCK_DV", "BLOCK_M", "BLOCK_N"),
            *(consts("GROUP", "HEAD_DIM", "BLOCK_D") if rn else []),
            *_tanh(plan, rn),
        ),
    )


def dkdv_args(spec: AttentionSpec, plan: Plan) -> Signature:
    return Signature(
        "_attn_bwd_dkdv",
        (
            *ptrs(Q="q", K="k", V="v", DO="do", M="m", Delta="delta", DK="dk", DV="dv"),
            *(ptrs(Lg="lg") if plan.uses_lg else []),
            *aux_ptrs(plan),
            *(ptrs(Dead="dead") if dead_rows_fix(spec, plan) else []),
            *strides("q", "k", "v", "do", "dk", "dv"),
            *aux_strides(plan),
            *ints("H_Q", "N_Q", "N_K"),
            *schedule_params(plan),
            *consts(*_SHAPES),
            *_tanh(plan),
        ),
    )


def table_grad_ptrs(plan: Plan) -> list[Param]:
    """The bias tables' gradient buffers (B, H, T) float32 the dQ kernel adds into when
    TABLE_GRAD (``Plan.table_grads``)."""
    return [Param(f"DT{i}", "ptr", tensor=f"dt{i}") for i in plan.table_grads]


def table_grad_strides(plan: Plan) -> list[Param]:
    return [
        Param(f"stride_dt{i}{c}", "stride", tensor=f"dt{i}", dim=d)
        for i in plan.table_grads
        for d, c in enumerate("bh")
    ]


def dq_args(spec: AttentionSpec, plan: Plan) -> Signature:
    return Signature(
        "_attn_bwd_dq",
        (
            *ptrs(Q="q", K="k", V="v", DO="do", M="m", Delta="delta", DQ="dq"),
            *(ptrs(Lg="lg") if plan.uses_lg else []),
            *aux_ptrs(plan),
            *table_grad_ptrs(plan),
            *strides("q", "k", "v", "do", "dq"),
            *aux_strides(plan),
            *table_grad_strides(plan),
            *ints("H_Q", "N_Q", "N_K"),
            *schedule_params(plan),
            *consts(*_SHAPES),
            *(consts("TABLE_GRAD") if plan.table_grads else []),
            *_tanh(plan),
        ),
    )


def dead_rows_fix(spec: AttentionSpec, plan: Plan) -> bool:
    """dK/dV of a head with a row that keeps no key (lse = -inf) are NaN as in eager, also
    when skipping visited none of that row's tiles: the kernel reads a per-head flag."""
    return plan.can_skip and spec.activation == "softmax" and spec.fully_masked != "zero"


KERNEL_ARGS = {
    "fwd": forward_args,
    "bwd_pre": preprocess_args,
    "bwd_dkdv": dkdv_args,
    "bwd_dq": dq_args,
}
