#!/usr/bin/env python
"""Attention benchmark: attnfx's generated kernels against the kernels PyTorch ships.

Providers (``--providers``, comma separated; ``all`` for every one):

==================  ========================================================================
attnfx-softmax      ``attnfx.ops.attention`` with a softmax spec (scale; causal: ``K <= Q``)
attnfx-sigmoid      activation="sigmoid", scale, ``add -log(N)`` (FlashSigmoid's bias)
attnfx-temp-aux     per-query temperature as ``mul_aux`` with a (B, H, N, 1) float32 tensor
attnfx-temp-q       per-query temperature pre-multiplied onto q (``q * tau``, timed too)
                    then the softmax kernel: what the temperature rewrite emits
attnfx-softcap      soft-capping ``30·tanh(s/30)`` as score ops ``mul 1/30, tanh, mul 30``
sdpa-fa2            ``F.scaled_dot_product_attention`` forced to FLASH_ATTENTION
sdpa-cudnn          ... forced to CUDNN_ATTENTION
sdpa-efficient      ... forced to EFFICIENT_ATTENTION (memory-efficient)
flex-softmax        ``flex_attention`` under ``torch.compile``; causal through a block mask
flex-sigmoid        sigmoid through Flex's ``logsigmoid`` score_mod + LSE: out·exp(lse)
flex-temp           per-query temperature as a ``score_mod`` (``s * tau[b, h, q_idx]``)
flex-softcap        ``score_mod`` ``30·tanh(s/30)``
eager-<variant>     the plain PyTorch math (``q @ kᵀ``, score transform, softmax|sigmoid, ``@ v``)
inductor-<variant>  ``torch.compile`` (inductor) of the same eager math
==================  ========================================================================

with ``<variant>`` one of softmax, sigmoid, temp, softcap.

FLOP convention (FlashAttention's): useful FLOPs only, forward = 4·B·H·Nq·Nk·D (two
matrix products), halved for causal; forward+backward = 3.5 × forward (the backward's
five products count 2.5 × forward).  Elementwise work (sigmoid, tanh, temperature) is
not counted, so every variant is measured in the same unit.  Times are the median of
``triton.testing.do_bench`` (CUDA events, L2 flushed before each run).

Every measured (provider, shape) is also checked once: its output (and, for
forward+backward, dq, dk, dv) on the first and last (batch, head) slice against the same
math in float64 (softmax: SDPA's math backend in float64), as ‖cand − ref‖ / ‖ref‖.

Providers that cannot run (unsupported on the card, a kernel that fails to compile, out
of memory, an op still landing in codegen) are reported as ``n/a`` with the reason; the
run never stops on them.

``--dry-run`` runs on the CPU with tiny shapes: attnfx kernels under the Triton
interpreter (ATTNFX_INTERPRET=1), Flex uncompiled (forward only: Flex has no CPU
backward), SDPA where PyTorch has a CPU kernel, eager.  Its timings mean nothing; it
exercises the plumbing (tables, JSON, checks, n/a paths).

Examples::

    PYTHONPATH=. python benchmarks/bench_attention.py                       # full sweep
    PYTHONPATH=. python benchmarks/bench_attention.py --n 4096,8192 --d 64,128 \\
        --dtypes bf16 --providers key --prewarm 8 --budget-s 200
    PYTHONPATH=. python benchmarks/bench_attention.py --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

SOFTCAP = 30.0
VARIANTS = ("softmax", "sigmoid", "temp", "softcap")
# score programs of real code (issue 9) measured against attnfx's own softmax kernel:
# a learned sink per head, ALiBi (slope x (k - q), no N×N tensor), a learnable (H, N, N)
# float32 bias whose gradient the backward returns
SCORE_VARIANTS = ("sink", "alibi", "bias")

# provider -> (family, variant)
PROVIDERS: dict[str, tuple[str, str]] = {
    "attnfx-softmax": ("attnfx", "softmax"),
    "attnfx-sigmoid": ("attnfx", "sigmoid"),
    "attnfx-temp-aux": ("attnfx", "temp"),
    "attnfx-temp-q": ("attnfx", "temp"),
    "attnfx-softcap": ("attnfx", "softcap"),
    **{f"attnfx-{v}": ("attnfx", v) for v in SCORE_VARIANTS},
    "sdpa-fa2": ("sdpa", "softmax"),
    "sdpa-cudnn": ("sdpa", "softmax"),
    "sdpa-efficient": ("sdpa", "softmax"),
    "flex-softmax": ("flex", "softmax"),
    "flex-sigmoid": ("flex", "sigmoid"),
    "flex-temp": ("flex", "temp"),
    "flex-softcap": ("flex", "softcap"),
    **{f"eager-{v}": ("eager", v) for v in VARIANTS},
    **{f"inductor-{v}": ("inductor", v) for v in VARIANTS + SCORE_VARIANTS},
}
# the peers the ratio columns divide by
REF_FA2, REF_CUDNN = "sdpa-fa2", "sdpa-cudnn"
FLEX_OF_VARIANT = {v: f"flex-{v}" for v in VARIANTS}  # no Flex row for SCORE_VARIANTS
OWN_SOFTMAX = "attnfx-softmax"

PRESETS = {
    "all": list(PROVIDERS),
    # gpu_check.sh's short benchmark (issues 3 and 5)
    "key": [
        "attnfx-softmax",
        "attnfx-sigmoid",
        "attnfx-temp-aux",
        "attnfx-temp-q",
        "attnfx-softcap",
        "sdpa-fa2",
        "sdpa-cudnn",
        "flex-softmax",
        "flex-sigmoid",
        "flex-temp",
        "flex-softcap",
        *(f"attnfx-{v}" for v in SCORE_VARIANTS),
    ],
}
# compiled providers whose first call compiles: what --prewarm warms up in subprocesses
COMPILED_FAMILIES = ("attnfx", "flex", "inductor")

DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
}
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# ‖cand − ref‖/‖ref‖ above this marks the cell as failing its check
CHECK_TOL = {"bfloat16": 2.5e-2, "float16": 5e-3, "float32": 2e-3}

FLOP_CONVENTION = (
    "TFLOP/s counts useful FLOPs only: forward = 4*B*H*Nq*Nk*D (x0.5 causal); "
    "forward+backward = 3.5 x forward (FlashAttention convention: backward = 2.5 x forward). "
    "Elementwise work (sigmoid, tanh, temperature) is not counted. "
    "Time: median of triton.testing.do_bench (CUDA events, L2 flushed before each run)."
)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="attnfx attention benchmark (see the module docstring)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    p.add_argument("--n", type=_ints, default=None, help="sequence lengths (Nq = Nk)")
    p.add_argument("--d", type=_ints, default=None, help="head dims")
    p.add_argument("--dtypes", type=_strs, default=None, help="bf16,fp16")
    p.add_argument("--modes", type=_strs, default=None, help="fwd,fwdbwd")
    p.add_argument(
        "--causal", choices=("both", "yes", "no"), default="both", help="causal and/or not"
    )
    p.add_argument("--providers", type=_strs, default=None, help="names, 'all' or 'key'")
    p.add_argument("--tokens", type=int, default=None, help="B*N is kept at this (B >= 1)")
    p.add_argument("--heads", type=int, default=None, help="H")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warmup (ms)")
    p.add_argument("--rep-ms", type=float, default=50.0, help="do_bench repetition (ms)")
    p.add_argument("--budget-s", type=float, default=0.0, help="stop measuring after (0: none)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument(
        "--prewarm",
        type=int,
        default=0,
        help="compile in this many subprocesses first (fills the on-disk caches)",
    )
    p.add_argument("--prewarm-timeout-s", type=float, default=240.0)
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="output folder (default $OUT or benchmarks/out)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--flex-compile",
        choices=("auto", "yes", "no"),
        default="auto",
        help="compile flex_attention (auto: yes on CUDA, no in --dry-run)",
    )
    args = p.parse_args(argv)

    dry = args.dry_run
    args.n = args.n or ([16, 32] if dry else [1024, 2048, 4096, 8192, 16384])
    args.d = args.d or ([16] if dry else [64, 128])
    args.dtypes = [
        DTYPE_ALIASES[d] for d in (args.dtypes or (["fp16"] if dry else ["bf16", "fp16"]))
    ]
    args.modes = args.modes or ["fwd", "fwdbwd"]
    for m in args.modes:
        if m not in ("fwd", "fwdbwd"):
            p.error(f"unknown mode {m!r}")
    args.causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    args.tokens = args.tokens or (32 if dry else 16384)
    args.heads = args.heads or (1 if dry else 16)
    names: list[str] = []
    for name in args.providers or (["dry"] if dry else ["all"]):
        if name == "dry":
            names += [n for n, (fam, _) in PROVIDERS.items() if fam != "inductor"]
        elif name in PRESETS:
            names += PRESETS[name]
        elif name in PROVIDERS:
            names.append(name)
        else:
            p.error(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
    args.provider_names = list(dict.fromkeys(names))
    if args.flex_compile == "auto":
        args.flex_compile = "no" if dry else "yes"
    args.out = args.out or os.environ.get("OUT") or os.path.join("benchmarks", "out")
    return args


# ---------------------------------------------------------------------------------------
# Shapes and cases
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: str
    mode: str  # fwd | fwdbwd
    causal: bool
    B: int
    H: int
    N: int
    D: int

    @property
    def group(self) -> tuple:
        return (self.dtype, self.mode, self.causal, self.D)

    def flops(self) -> float:
        f = 4.0 * self.B * self.H * self.N * self.N * self.D
        if self.causal:
            f *= 0.5
        if self.mode == "fwdbwd":
            f *= 3.5
        return f

    def label(self) -> str:
        return (
            f"{SHORT_DTYPE[self.dtype]} {self.mode} {'causal' if self.causal else 'full'} "
            f"B{self.B} H{self.H} N{self.N} D{self.D}"
        )


def shapes(args) -> list[Shape]:
    out = []
    for dtype in args.dtypes:
        for mode in args.modes:
            for causal in args.causals:
                for d in args.d:
                    for n in args.n:
                        b = max(1, args.tokens // n)
                        out.append(Shape(dtype, mode, causal, b, args.heads, n, d))
    return out


class Case:
    """Inputs of one shape (shared by every provider) and lazily built extras."""

    def __init__(self, shape: Shape, device, seed: int = 0):
        import torch

        self.shape = shape
        self.device = device
        self.dtype = getattr(torch, shape.dtype)
        g = torch.Generator(device="cpu").manual_seed(seed)
        B, H, N, D = shape.B, shape.H, shape.N, shape.D

        def rnd(*s):
            return torch.randn(*s, generator=g).to(device=device, dtype=self.dtype)

        self.q, self.k, self.v = rnd(B, H, N, D), rnd(B, H, N, D), rnd(B, H, N, D)
        self.dout = rnd(B, H, N, D)
        # per-query temperature in [0.5, 1.5], exactly representable in the working dtype
        tau = 0.5 + torch.rand(B, H, N, 1, generator=g)
        self.tau_w = tau.to(device=device, dtype=self.dtype)
        self.tau32 = self.tau_w.float()
        self.scale = D**-0.5
        # SCORE_VARIANTS' operands, float32 as models keep them (broadcast over batch)
        self.sinks = torch.randn(1, H, 1, 1, generator=g).to(device)
        self.slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]).view(1, H, 1, 1)
        self.slopes = self.slopes.to(device)
        self._bias = None
        self._block_mask = None
        self._tril = None
        self.refs: dict[tuple, tuple] = {}

    @property
    def block_mask(self):
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            def causal(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx

            n = self.shape.N
            self._block_mask = create_block_mask(causal, None, None, n, n, device=self.device)
        return self._block_mask

    @property
    def bias(self):
        """A learnable (1, H, N, N) float32 bias (T5 / Swin style), built on first use."""
        if self._bias is None:
            import torch

            g = torch.Generator(device="cpu").manual_seed(7)
            n, h = self.shape.N, self.shape.H
            self._bias = (torch.randn(1, h, n, n, generator=g) * 0.5).to(self.device)
            self._bias.requires_grad_(True)
        return self._bias

    def extra(self, variant: str):
        """The aux operand of a SCORE_VARIANT (None for the others)."""
        return (
            {"sink": self.sinks, "alibi": self.slopes}.get(variant)
            if variant != "bias"
            else self.bias
        )

    @property
    def tril(self):
        if self._tril is None:
            import torch

            n = self.shape.N
            self._tril = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        return self._tril

    def inputs(self, grad: bool):
        if not grad:
            return self.q, self.k, self.v
        return tuple(t.detach().clone().requires_grad_(True) for t in (self.q, self.k, self.v))


# ---------------------------------------------------------------------------------------
# Providers: build(case) -> fn(q, k, v) -> out
# ---------------------------------------------------------------------------------------


class NotAvailable(Exception):
    """A provider that cannot run here (reason in the message)."""


def _causal_key() -> str:
    import sympy

    from attnfx.predicate import K, MaskPredicate, Q

    return MaskPredicate(sympy.Le(K, Q)).to_key()


def attnfx_spec(variant: str, shape: Shape):
    """The AttentionSpec of an attnfx provider's variant at ``shape``."""
    from attnfx.spec import AttentionSpec, ScoreOp
    from attnfx.variants import of_benchmark

    d = shape.D
    ops = [ScoreOp("mul", d**-0.5)]
    # the report's kind and the activation: the registry's variant this one measures
    measured = of_benchmark(PROVIDERS[f"attnfx-{variant}"][1])
    act, kind, aux = measured.activation, measured.kind, ()
    if variant == "sigmoid":
        ops.append(ScoreOp("add", -math.log(shape.N)))
    elif variant == "temp-aux":
        aux = ("float32",)
        ops.append(ScoreOp("mul_aux", aux=0))
    elif variant == "softcap":
        ops = [ScoreOp("mul", d**-0.5 / SOFTCAP), ScoreOp("tanh"), ScoreOp("mul", SOFTCAP)]
    elif variant == "alibi":
        import sympy

        from attnfx.predicate import K, Q

        aux = ("float32",)
        ops.append(ScoreOp("add_pos_aux", aux=0, expr=sympy.srepr(K - Q)))
    elif variant == "bias":
        aux = ("float32",)
        ops.append(ScoreOp("add_aux", aux=0))
    elif variant == "sink":
        aux = ("float32",)
    if shape.causal:  # last, so that block skipping applies
        ops.append(ScoreOp("fill_pred", value=-math.inf, pred=_causal_key()))
    return AttentionSpec(
        kind=kind,
        activation=act,
        score_ops=tuple(ops),
        aux_dtypes=aux,
        head_dim=d,
        head_dim_v=d,
        dtype=shape.dtype,
        out_dtype=shape.dtype,
        sink=0 if variant == "sink" else None,
    )


def build_attnfx(name: str, case: Case):
    from attnfx.ops import attention

    variant = name.removeprefix("attnfx-")
    spec_variant = "softmax" if variant == "temp-q" else variant
    spec = attnfx_spec(spec_variant, case.shape)
    if variant == "temp-aux":
        tau = case.tau32
        return lambda q, k, v: attention(q, k, v, spec, [tau])
    if variant == "temp-q":
        tau = case.tau_w
        return lambda q, k, v: attention(q * tau, k, v, spec)
    if variant in SCORE_VARIANTS:
        x = case.extra(variant)
        return lambda q, k, v: attention(q, k, v, spec, [x])
    return lambda q, k, v: attention(q, k, v, spec)


def build_sdpa(name: str, case: Case):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa-fa2": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]
    causal, scale = case.shape.causal, case.scale

    def fn(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    return fn


def eager_attention(variant: str, q, k, v, *, scale, causal, tau=None, tril=None, extra=None):
    """The plain PyTorch math of each variant, in the dtype of q (float64 for references);
    ``extra``: a SCORE_VARIANT's operand (sinks, slopes or bias)."""
    import torch

    s = q @ k.transpose(-2, -1)
    if variant == "softcap":
        s = SOFTCAP * torch.tanh(s * (scale / SOFTCAP))
    elif variant == "temp":
        s = s * scale * tau
    else:
        s = s * scale
    if variant == "alibi":
        nq, nk = s.shape[-2:]
        pos_q = torch.arange(nq, device=s.device)[:, None]
        pos_k = torch.arange(nk, device=s.device)[None, :]
        s = s + extra.to(s.dtype) * (pos_k - pos_q)
    elif variant == "bias":
        s = s + extra.to(s.dtype)
    if variant == "sigmoid":
        s = s - math.log(k.shape[-2])
    if causal:
        if tril is None:
            nq, nk = s.shape[-2:]
            tril = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~tril, float("-inf"))
    if variant == "sigmoid":
        p = torch.sigmoid(s)
    elif variant == "sink":  # gpt-oss: the sink's column joins the softmax, then goes
        col = extra.to(s.dtype).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat([s, col], -1).float(), dim=-1)[..., :-1].to(q.dtype)
    else:
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    return p @ v


def build_eager(name: str, case: Case, compiled: bool = False):
    import torch

    variant = name.split("-", 1)[1]
    causal, scale, tau = case.shape.causal, case.scale, case.tau_w
    tril = case.tril if causal else None
    extra = case.extra(variant) if variant in SCORE_VARIANTS else None

    def fn(q, k, v):
        return eager_attention(
            variant, q, k, v, scale=scale, causal=causal, tau=tau, tril=tril, extra=extra
        )

    if compiled:
        return torch.compile(fn, dynamic=False)
    return fn


def _flex_fn(variant: str, scale: float, bias: float):
    """A Flex wrapper ``f(q, k, v, block_mask, tau)``; scale and bias are closure constants
    (Dynamo guards on their values), tau (B, H, N) float32 is an input."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import flex_attention as fa_mod

    flex = fa_mod.flex_attention

    if variant == "softmax":

        def f(q, k, v, block_mask, tau):
            return flex(q, k, v, block_mask=block_mask, scale=scale)

    elif variant == "softcap":

        def f(q, k, v, block_mask, tau):
            def softcap(score, b, h, q_idx, kv_idx):
                return SOFTCAP * torch.tanh(score / SOFTCAP)

            return flex(q, k, v, score_mod=softcap, block_mask=block_mask, scale=scale)

    elif variant == "temp":

        def f(q, k, v, block_mask, tau):
            def temp(score, b, h, q_idx, kv_idx):
                return score * tau[b, h, q_idx]

            return flex(q, k, v, score_mod=temp, block_mask=block_mask, scale=scale)

    else:  # sigmoid: softmax over logsigmoid(s + b) is σ(s + b)/Σσ, and exp(lse) = Σσ

        def logsig(score, b, h, q_idx, kv_idx):
            return F.logsigmoid(score + bias)

        if hasattr(fa_mod, "AuxRequest"):

            def f(q, k, v, block_mask, tau):
                out, aux = flex(
                    q,
                    k,
                    v,
                    score_mod=logsig,
                    block_mask=block_mask,
                    scale=scale,
                    return_aux=fa_mod.AuxRequest(lse=True),
                )
                return (out.float() * torch.exp(aux.lse).unsqueeze(-1)).to(q.dtype)

        else:

            def f(q, k, v, block_mask, tau):
                out, lse = flex(
                    q, k, v, score_mod=logsig, block_mask=block_mask, scale=scale, return_lse=True
                )
                return (out.float() * torch.exp(lse).unsqueeze(-1)).to(q.dtype)

    return f


def build_flex(name: str, case: Case, compile_: bool):
    import torch

    variant = name.removeprefix("flex-")
    f = _flex_fn(variant, case.scale, -math.log(case.shape.N))
    if compile_:
        f = torch.compile(f, dynamic=False)
    bm = case.block_mask if case.shape.causal else None
    tau = case.tau32[..., 0].contiguous()
    return lambda q, k, v: f(q, k, v, bm, tau)


def build(name: str, case: Case, args):
    family, _ = PROVIDERS[name]
    if family == "attnfx":
        try:
            import attnfx.ops  # noqa: F401
        except Exception as e:  # sympy / networkx missing on the device machine
            raise NotAvailable(f"attnfx does not import: {type(e).__name__}: {e}") from e
        return build_attnfx(name, case)
    if family == "sdpa":
        return build_sdpa(name, case)
    if family == "flex":
        return build_flex(name, case, args.flex_compile == "yes")
    if family == "eager":
        return build_eager(name, case)
    if family == "inductor":
        return build_eager(name, case, compiled=True)
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------
# Running, timing, checking
# ---------------------------------------------------------------------------------------


def run_once(fn, case: Case, mode: str):
    """One call: forward, or forward + backward with case.dout. Returns (out, grads)."""
    import torch

    if mode == "fwd":  # as timed: no autograd (compiled providers guard on grad mode)
        with torch.no_grad():
            return fn(*case.inputs(grad=False)), None
    q, k, v = case.inputs(grad=True)
    out = fn(q, k, v)
    out.backward(case.dout)
    return out, (q.grad, k.grad, v.grad)


def timed_fn(fn, case: Case, mode: str):
    """(callable for the timer, tensors whose .grad the timer resets)."""
    if mode == "fwd":
        import torch

        q, k, v = case.inputs(grad=False)

        def f():
            with torch.no_grad():
                return fn(q, k, v)

        return f, None
    q, k, v = case.inputs(grad=True)
    dout = case.dout

    def fb():
        fn(q, k, v).backward(dout)

    return fb, [q, k, v]


def measure(f, grad_to_none, args, device) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(
            f,
            warmup=args.warmup_ms,
            rep=args.rep_ms,
            grad_to_none=grad_to_none,
            quantiles=[0.5, 0.2, 0.8],
        )
        return float(med), float(lo), float(hi)
    # CPU (dry run): host clock, one call (the check already ran the provider once)
    t0 = time.perf_counter()
    f()
    ms = max((time.perf_counter() - t0) * 1e3, 1e-6)
    return ms, ms, ms


def reference(name: str, case: Case, mode: str, b: int, h: int):
    """float64 output (and grads) of the provider's math on batch b, head h (cached)."""
    _, variant = PROVIDERS[name]
    key = (variant, mode, b, h)
    if key not in case.refs:
        case.refs[key] = _reference(variant, case, mode, b, h)
    return case.refs[key]


def _reference(variant: str, case: Case, mode: str, b: int, h: int):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sl = (slice(b, b + 1), slice(h, h + 1))
    q, k, v = (t[sl].double().detach().requires_grad_(mode == "fwdbwd") for t in case.inputs(False))
    tau = case.tau32[sl].double()
    causal = case.shape.causal
    if variant == "softmax":
        with sdpa_kernel([SDPBackend.MATH]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=case.scale)
    else:
        extra = None
        if variant in SCORE_VARIANTS:
            extra = case.extra(variant).detach()
            extra = extra[:, h : h + 1].double() if extra.shape[1] > 1 else extra.double()
        out = eager_attention(
            variant, q, k, v, scale=case.scale, causal=causal, tau=tau, extra=extra
        )
    grads = None
    if mode == "fwdbwd":
        out.backward(case.dout[sl].double())
        grads = (q.grad, k.grad, v.grad)
    return out.detach(), grads


def check(name: str, fn, case: Case, mode: str) -> float:
    """max ‖cand − ref‖/‖ref‖ over out (and dq, dk, dv), on the first and last (b, h)."""
    import torch

    out, grads = run_once(fn, case, mode)
    worst = 0.0
    B, H = case.shape.B, case.shape.H
    for b, h in {(0, 0), (B - 1, H - 1)}:
        ref_out, ref_grads = reference(name, case, mode, b, h)
        pairs = [(out[b : b + 1, h : h + 1], ref_out)]
        if grads is not None:
            pairs += [(g[b : b + 1, h : h + 1], r) for g, r in zip(grads, ref_grads)]
        for cand, ref in pairs:
            cand = cand.detach().double()
            if not bool(torch.isfinite(cand).all()):
                return float("inf")
            den = ref.norm().item()
            err = (cand - ref).norm().item() / (den if den > 0 else 1.0)
            worst = max(worst, err)
    return worst


def _reason(e: BaseException, caught: list) -> str:
    msg = f"{type(e).__name__}: {e}"
    # inductor appends the lowered graph's buffers (shape-specific): keep the cause only
    msg = " ".join(msg.split("\n  target:")[0].split("\ntarget:")[0].split())
    # SDPA says why a backend cannot run only through warnings
    notes = [" ".join(str(w.message).split()) for w in caught]
    notes = [n for n in notes if "sdp" in n.lower() or "kernel" in n.lower()]
    if notes and ("No viable backend" in msg or "No available kernel" in msg):
        msg += " | " + notes[0]
    return msg[:300]


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _cleanup(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def bench_one(name: str, case: Case, args, device) -> dict:
    shape = case.shape
    family, variant = PROVIDERS[name]
    rec = {
        "provider": name,
        "family": family,
        "variant": variant,
        **dataclasses.asdict(shape),
        "flops": shape.flops(),
        "status": "ok",
        "reason": "",
        "ms": None,
        "ms_p20": None,
        "ms_p80": None,
        "tflops": None,
        "first_call_s": None,
        "check_rel_err": None,
        "check_tol": CHECK_TOL[shape.dtype],
        "check_ok": None,
    }
    if family == "flex" and shape.mode == "fwdbwd" and device.type == "cpu":
        rec.update(status="n/a", reason="FlexAttention has no CPU backward")
        return rec
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = build(name, case, args)
            t0 = time.perf_counter()
            if args.no_check:
                run_once(fn, case, shape.mode)
            else:
                err = check(name, fn, case, shape.mode)
                rec["check_rel_err"] = err
                rec["check_ok"] = bool(err <= CHECK_TOL[shape.dtype])
            if device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            rec["first_call_s"] = time.perf_counter() - t0
            f, gtn = timed_fn(fn, case, shape.mode)
            med, lo, hi = measure(f, gtn, args, device)
            rec.update(ms=med, ms_p20=lo, ms_p80=hi, tflops=shape.flops() / (med * 1e-3) / 1e12)
        except NotAvailable as e:
            rec.update(status="n/a", reason=str(e))
        except Exception as e:  # noqa: BLE001 - every failure becomes an n/a cell
            rec.update(status="n/a", reason=("OOM: " if _is_oom(e) else "") + _reason(e, caught))
            if os.environ.get("ATTNFX_BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            _cleanup(device)
    return rec


# ---------------------------------------------------------------------------------------
# Prewarm: compile in parallel subprocesses so the measuring process finds warm caches
# ---------------------------------------------------------------------------------------


def warm_units(args) -> list[tuple[Shape, str]]:
    """(shape, provider) pairs whose first call compiles, one per distinct compile."""
    units, seen = [], set()
    for shape in shapes(args):
        for name in args.provider_names:
            family, variant = PROVIDERS[name]
            if family not in COMPILED_FAMILIES:
                continue
            if family == "attnfx":
                # one spec (and kernel) for every N, except sigmoid's -log(N) constant;
                # fwd+bwd compiles the forward kernel too
                key = (
                    name,
                    shape.dtype,
                    shape.causal,
                    shape.D,
                    shape.N if variant == "sigmoid" else 0,
                )
                if shape.mode == "fwd" and "fwdbwd" in args.modes:
                    continue
            else:
                key = (name, shape)
            if key not in seen:
                seen.add(key)
                units.append((shape, name))
    return units


def warm_only(args, device) -> int:
    i, n = (int(x) for x in args.shard.split("/"))
    units = warm_units(args)[i::n]
    t0 = time.perf_counter()
    for shape, name in units:
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            break
        case = Case(shape, device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = build(name, case, args)
                run_once(fn, case, shape.mode)
        except Exception as e:  # noqa: BLE001
            print(f"[warm {i}/{n}] {name} {shape.label()}: {type(e).__name__}", flush=True)
        finally:
            del case
            _cleanup(device)
    print(f"[warm {i}/{n}] {len(units)} units in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


def worker_argv(args, i: int, n: int) -> list[str]:
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--warm-only",
        f"--shard={i}/{n}",
        "--n=" + ",".join(map(str, args.n)),
        "--d=" + ",".join(map(str, args.d)),
        "--dtypes=" + ",".join(args.dtypes),
        "--modes=" + ",".join(args.modes),
        f"--causal={ {(False, True): 'both', (True,): 'yes', (False,): 'no'}[tuple(args.causals)] }",
        "--providers=" + ",".join(args.provider_names),
        f"--tokens={args.tokens}",
        f"--heads={args.heads}",
        f"--flex-compile={args.flex_compile}",
        f"--budget-s={max(1.0, args.prewarm_timeout_s - 10)}",
    ]
    if args.dry_run:
        argv.append("--dry-run")
    return argv


def prewarm(args) -> float:
    n = args.prewarm
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        procs.append(
            subprocess.Popen(worker_argv(args, i, n), stdout=sys.stdout, stderr=subprocess.DEVNULL)
        )
    deadline = t0 + args.prewarm_timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            print(
                f"[warm] worker {p.pid} over the {args.prewarm_timeout_s:.0f}s limit: stopped",
                flush=True,
            )
            p.kill()
            p.wait()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def _index(results):
    return {(r["provider"], r["dtype"], r["mode"], r["causal"], r["N"], r["D"]): r for r in results}


def add_ratios(results):
    idx = _index(results)
    for r in results:
        key = (r["dtype"], r["mode"], r["causal"], r["N"], r["D"])
        for col, ref in (
            ("x_fa2", REF_FA2),
            ("x_cudnn", REF_CUDNN),
            ("x_flex", FLEX_OF_VARIANT.get(r["variant"])),
            ("x_attnfx_softmax", OWN_SOFTMAX),
        ):
            other = idx.get((ref, *key))
            ok = r.get("tflops") and other and other.get("tflops")
            r[col] = (r["tflops"] / other["tflops"]) if ok else None


def _fmt_ratio(x):
    if x is None:
        return "  - "
    return f"{x:4.2f}" if x < 9.995 else f"{x:4.1f}" if x < 99.95 else f"{x:4.0f}"


def _fmt_tflops(x):
    return f"{x:7.1f}" if x >= 0.1 else f"{x:7.1e}"


def format_table(results, args) -> str:
    lines = []
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["mode"], r["causal"], r["D"]), []).append(r)
    reasons: dict[str, int] = {}
    fails = []
    for (dtype, mode, causal, d), rs in groups.items():
        ns = sorted({r["N"] for r in rs})
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        by = {(r["provider"], r["N"]): r for r in rs}
        lines.append("")
        lines.append(
            f"== {SHORT_DTYPE[dtype]} {mode} {'causal' if causal else 'non-causal'} D{d} "
            f"(H{rs[0]['H']}, B = {args.tokens}//N) ==  TFLOP/s  xFA2 xcuDNN xFlex"
        )
        head = f"{'provider':<17}" + "".join(f" | {'N' + str(n):<24}" for n in ns)
        lines.append(head)
        lines.append("-" * len(head))
        for p in provs:
            cells = []
            for n in ns:
                r = by.get((p, n))
                if r is None:
                    cells.append(f"{'':<24}")
                elif r["status"] != "ok":
                    reason = r["reason"]
                    if reason not in reasons:
                        reasons[reason] = len(reasons) + 1
                    cells.append(f"{'n/a [' + str(reasons[reason]) + ']':<24}")
                else:
                    mark = "!" if r["check_ok"] is False else " "
                    cells.append(
                        f"{_fmt_tflops(r['tflops'])}{mark}"
                        f"{_fmt_ratio(r['x_fa2'])} {_fmt_ratio(r['x_cudnn'])} {_fmt_ratio(r['x_flex'])}"
                    )
                    if r["check_ok"] is False:
                        fails.append(r)
            lines.append(f"{p:<17}" + "".join(f" | {c}" for c in cells))
    if reasons:
        lines.append("")
        lines.append("n/a reasons:")
        for reason, i in reasons.items():
            lines.append(f"  [{i}] {reason}")
    if fails:
        lines.append("")
        lines.append(
            "correctness check FAILED (marked '!'): rel. error vs float64 math > tolerance"
        )
        for r in fails:
            lines.append(
                f"  {r['provider']:<17} {Shape(**{k: r[k] for k in ('dtype', 'mode', 'causal', 'B', 'H', 'N', 'D')}).label()}: "
                f"{r['check_rel_err']:.3g} > {r['check_tol']:.3g}"
            )
    return "\n".join(lines)


def _ratio(idx, a, b, key):
    ra, rb = idx.get((a, *key)), idx.get((b, *key))
    if not (ra and rb and ra.get("tflops") and rb.get("tflops")):
        return None
    return ra["tflops"] / rb["tflops"]


def targets(results) -> list[dict]:
    """The benchmark targets of issues 3, 5 and 9 (bf16), evaluated on what was measured."""
    idx = _index(results)
    out = []

    def add(issue, what, a, b, want, key):
        x = _ratio(idx, a, b, key)
        if x is None and (idx.get((a, *key)) is None or idx.get((b, *key)) is None):
            return  # not part of this run
        dtype, mode, causal, n, d = key
        out.append(
            {
                "issue": issue,
                "target": what,
                "shape": f"{SHORT_DTYPE[dtype]} {mode} {'causal' if causal else 'full'} N{n} D{d}",
                "ratio": x,
                "want": want,
                "ok": None if x is None else bool(x >= want),
            }
        )

    keys = sorted({(r["dtype"], r["mode"], r["causal"], r["N"], r["D"]) for r in results})
    for key in keys:
        dtype, mode, causal, n, d = key
        if dtype != "bfloat16":
            continue
        if (n, d) in ((4096, 64), (8192, 128)) and not causal:
            if mode == "fwd":
                add(3, "sigmoid fwd >= 1.2x FA2 softmax", "attnfx-sigmoid", REF_FA2, 1.2, key)
                add(3, "sigmoid fwd >= 1.0x cuDNN softmax", "attnfx-sigmoid", REF_CUDNN, 1.0, key)
            else:
                add(3, "sigmoid fwd+bwd >= 1.1x FA2 softmax", "attnfx-sigmoid", REF_FA2, 1.1, key)
        add(3, "softmax >= 1.0x Flex softmax", OWN_SOFTMAX, "flex-softmax", 1.0, key)
        if mode == "fwd":
            for t in ("attnfx-temp-aux", "attnfx-temp-q"):
                add(5, f"{t} >= 0.97x attnfx softmax", t, OWN_SOFTMAX, 0.97, key)
                add(5, f"{t} >= 1.0x Flex temp score_mod", t, "flex-temp", 1.0, key)
            add(5, "softcap >= 0.90x attnfx softmax", "attnfx-softcap", OWN_SOFTMAX, 0.90, key)
            add(5, "softcap >= 2.5x Flex softcap", "attnfx-softcap", "flex-softcap", 2.5, key)
        for t in ("attnfx-sink", "attnfx-alibi"):
            add(9, f"{t} >= 0.97x attnfx softmax", t, OWN_SOFTMAX, 0.97, key)
        if mode == "fwdbwd":
            add(9, "learnable bias fwd+bwd >= 0.85x softmax", "attnfx-bias", OWN_SOFTMAX, 0.85, key)
    return out


def format_targets(tg) -> str:
    if not tg:
        return "targets (issues 3, 5, 9; bf16): none of the target shapes/providers were measured"
    lines = ["targets (issues 3, 5, 9; bf16 only; measured ratio vs wanted):"]
    for t in tg:
        verdict = "n/a " if t["ok"] is None else ("PASS" if t["ok"] else "FAIL")
        x = "  -  " if t["ratio"] is None else f"{t['ratio']:5.2f}"
        lines.append(
            f"  {verdict} #{t['issue']} {t['target']:<40} {t['shape']:<26} {x} (want >= {t['want']})"
        )
    n_ok = sum(1 for t in tg if t["ok"])
    n_fail = sum(1 for t in tg if t["ok"] is False)
    lines.append(f"  {n_ok} pass, {n_fail} fail, {len(tg) - n_ok - n_fail} not measurable")
    return "\n".join(lines)


def environment(device) -> dict:
    import torch
    import triton

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_capability": (
            list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
        ),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "interpreter": os.environ.get("ATTNFX_INTERPRET") == "1",
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            timeout=10,
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def plot(results, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"PNG skipped: matplotlib not importable ({type(e).__name__}: {e})"
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["mode"], r["causal"], r["D"]), []).append(r)
    keys = list(groups)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        rs = groups[key]
        for p in dict.fromkeys(r["provider"] for r in rs):
            pts = sorted((r["N"], r["tflops"]) for r in rs if r["provider"] == p and r["tflops"])
            if pts:
                style = "-" if p.startswith("attnfx") else "--"
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=p)
        dtype, mode, causal, d = key
        ax.set_title(f"{SHORT_DTYPE[dtype]} {mode} {'causal' if causal else 'full'} D{d}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = {}, {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    fig.legend(
        [handles[lab] for lab in labels], labels, loc="lower center", ncol=min(6, len(labels))
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG: {path}"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def _configure_dynamo():
    import torch._dynamo

    cfg = torch._dynamo.config
    # one compiled entry per (provider, shape, grad mode): lift the recompile limits
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 1 << 16)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # kernels under Triton's interpreter: must be set before attnfx loads a kernel
        os.environ["ATTNFX_INTERPRET"] = "1"
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: use --dry-run to exercise the script on the CPU", file=sys.stderr)
        return 2
    _configure_dynamo()
    torch.manual_seed(0)
    if args.warm_only:
        return warm_only(args, device)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    t_start = time.perf_counter()
    print(
        f"[bench] {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"python {env['python']} | providers: {', '.join(args.provider_names)}",
        flush=True,
    )
    warm_s = None
    if args.prewarm > 0:
        warm_s = prewarm(args)
        print(f"[bench] prewarm: {warm_s:.0f}s in {args.prewarm} processes", flush=True)

    meta = {
        "environment": env,
        "flop_convention": FLOP_CONVENTION,
        "args": {k: v for k, v in vars(args).items() if k not in ("warm_only", "shard")},
        "dry_run": args.dry_run,
        "check": "max over out (and dq, dk, dv) of |cand-ref|/|ref| on the first and last "
        "(batch, head), ref = the same math in float64 (softmax: SDPA math backend)",
        "prewarm_s": warm_s,
    }
    results: list[dict] = []
    json_path = out_dir / "bench.json"

    def dump():
        add_ratios(results)
        payload = {**meta, "elapsed_s": time.perf_counter() - t_start, "results": results}
        payload["targets"] = targets(results)
        json_path.write_text(json.dumps(payload, indent=1, default=str))

    budget_hit = False
    t_measure = time.perf_counter()
    for shape in shapes(args):
        case = None
        for name in args.provider_names:
            over = args.budget_s and time.perf_counter() - t_measure > args.budget_s
            if over and not budget_hit:
                budget_hit = True
                print(
                    f"[bench] time budget of {args.budget_s:.0f}s spent: the rest is n/a",
                    flush=True,
                )
            if over:
                fam, var = PROVIDERS[name]
                results.append(
                    {
                        "provider": name,
                        "family": fam,
                        "variant": var,
                        **dataclasses.asdict(shape),
                        "flops": shape.flops(),
                        "status": "n/a",
                        "reason": f"time budget ({args.budget_s:.0f}s) spent",
                        "tflops": None,
                        "check_ok": None,
                    }
                )
                continue
            if case is None:
                case = Case(shape, device)
            rec = bench_one(name, case, args, device)
            results.append(rec)
            status = (
                f"{rec['tflops']:8.1f} TFLOP/s {rec['ms']:8.3f} ms  err {rec['check_rel_err'] if rec['check_rel_err'] is not None else float('nan'):.2e}"
                if rec["status"] == "ok"
                else f"n/a: {rec['reason'][:90]}"
            )
            print(f"[bench] {shape.label():<38} {name:<17} {status}", flush=True)
        del case
        _cleanup(device)
        dump()
    dump()

    table = format_table(results, args)
    tg = targets(results)
    note = plot(results, out_dir / "bench.png") if not args.no_plot else "PNG skipped (--no-plot)"
    header = [
        "",
        f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"python {env['python']}"
        + (" | DRY RUN (CPU, Triton interpreter)" if args.dry_run else ""),
        FLOP_CONVENTION,
        "Cells: TFLOP/s, then ratios vs SDPA-FA2 softmax, SDPA-cuDNN softmax and Flex with the same "
        "variant ('-' where either side is missing). '!' = correctness check failed.",
    ]
    if args.dry_run:
        header.append(
            "DRY RUN: CPU host-clock timings of interpreted kernels; the numbers mean nothing."
        )
    text = "\n".join(header) + "\n" + table + "\n\n" + format_targets(tg) + "\n"
    text += f"\nJSON: {json_path}\n{note}\n"
    (out_dir / "bench.txt").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
