"""Routed sparse attention kernels (``spec.routing``): their launches and their sm_90
targets; the source is ``routed_source``'s (the routed templates, filled).

The kernels read q, k, v rows through the slots' token indices — never a gathered copy —
one program per (block of a cluster's query slots, batch·head·cluster) for the forward
and dQ, per (block of key slots, batch·head·cluster) for dK/dV.  The fills compare the
tokens' positions (``tq``, ``tk``).  With a causal fill (``pos_q < pos_k`` → -inf, no
later fill that can undo it) a tile whose first key comes after its last query is
skipped: with members sorted by position (as routing code sorts them) that is about half
of them; any order stays correct, only fewer tiles are skipped.

The forward writes each slot's output and lse (float32); the host combines them onto
the tokens deterministically (``attnfx.routed``: a stable sort of the flat indices, one
segment sum per token, divided by the count).  The backward gathers dO to the slots
divided by the count; dQ forms rowsum(P·dP) per slot in a first pass over the keys (as
eager's softmax backward does: a row whose weight is on one key gets exactly dS = 0) and
writes it for dK/dV; dq / dk / dv are summed per token through the same sorted indices.
"""

from __future__ import annotations

import torch

from attnfx import routed
from attnfx.codegen.routed_source import causal_skip, source
from attnfx.spec import AttentionSpec

__all__ = ["causal_skip", "kernel_targets", "run_backward", "run_forward", "source"]

# ---------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------


def _blocks(spec: AttentionSpec, interpret: bool, part: str = "fwd") -> dict:
    r = spec.routing
    d, dv = spec.head_dim, spec.head_dim_v
    wide = max(d, dv) > 64 or spec.dtype == "float32"
    # GPU: tiles sized so that the gathered rows' pointer tiles (64-bit, one per element)
    # fit in registers without spilling at 8 warps on sm_90 (test_routed_kernels):
    # 64 × 64 up to D 64 in 16 bits; 64 × 32 forward and 32 × 32 backward beyond;
    # 32 × 32 in float32
    if interpret:
        bm = bn = 16
    elif not wide:
        bm = bn = 64
    elif spec.dtype == "float32":
        bm = bn = 32
    else:
        bm, bn = (64, 32) if part == "fwd" else (32, 32)
    return {
        "BLOCK_M": min(bm, max(16, triton_next_pow2(r.window))),
        "BLOCK_N": min(bn, max(16, triton_next_pow2(r.key_window))),
        "BLOCK_D": max(16, triton_next_pow2(d)),
        "BLOCK_DV": max(16, triton_next_pow2(dv)),
    }


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _common_args(spec, q, k, v, qi, ki):
    b, h, _, _ = q.shape
    r = spec.routing
    clusters = qi.shape[-1] // r.window
    args = [q, k, v, qi, ki, *q.stride(), *k.stride(), *v.stride(), *qi.stride(), *ki.stride()]
    args += [h, clusters, k.shape[2], qi.shape[-1], ki.shape[-1]]
    consts = {"W": r.window, "WK": r.key_window, "HEAD_D": q.shape[-1], "HEAD_DV": v.shape[-1]}
    return args, consts, b * h * clusters


LAUNCH = {"num_warps": 8, "num_stages": 2}  # checked for spills at sm_90 (test_routed_kernels)


def _module(spec: AttentionSpec, part: str, interpret: bool):
    from attnfx.codegen import cache

    return cache.load_module(spec, part, interpret)


def _run(fn, grid, args, consts, interpret):
    kw = {} if interpret else dict(LAUNCH)
    fn[grid](*args, **consts, **kw)


def run_forward(spec: AttentionSpec, q, k, v, qi, ki):
    """(out, slot_out, slot_lse) as ``attnfx.routed.forward`` returns them."""
    from attnfx.codegen.launch import _INTERPRETER_LOCK, LAUNCHES, _interpret

    qi, ki = routed.flat_index(qi), routed.flat_index(ki)
    routed.check(q, k, v, qi, ki, spec)
    interpret = _interpret(q)
    b, h, n, _ = q.shape
    dv = v.shape[-1]
    slots = qi.shape[-1]
    slot_o = torch.empty((b, h, slots, dv), dtype=torch.float32, device=q.device)
    slot_lse = torch.empty((b, h, slots), dtype=torch.float32, device=q.device)
    args, consts, bhc = _common_args(spec, q, k, v, qi, ki)
    blocks = _blocks(spec, interpret)
    grid = (triton_cdiv(spec.routing.window, blocks["BLOCK_M"]), bhc)
    with _INTERPRETER_LOCK if interpret else _null():
        mod = _module(spec, "fwd", interpret)
        _run(mod._attn_routed_fwd, grid, [slot_o, slot_lse, *args], {**consts, **blocks}, interpret)
    LAUNCHES["routed_fwd"] += 1
    out = routed.combine(slot_o, qi, n, spec)
    return out.to(v.dtype), slot_o, slot_lse


def run_backward(spec: AttentionSpec, dout, q, k, v, qi, ki, slot_o, slot_lse):
    """(dq, dk, dv) as ``attnfx.routed.backward`` returns them."""
    from attnfx.codegen.launch import _INTERPRETER_LOCK, LAUNCHES, _interpret

    qi, ki = routed.flat_index(qi), routed.flat_index(ki)
    interpret = _interpret(q)
    b, h, n, d = q.shape
    nk = k.shape[2]
    r = spec.routing
    dos = routed.slot_gradient(dout, qi, n, r)  # (B, H, S, Dv) float32, / count
    # written by dQ's first pass, read by dK/dV: rowsum(P·dP), the row max, 1 / row sum
    delta = torch.empty_like(slot_lse)
    mrow, invl = torch.empty_like(slot_lse), torch.empty_like(slot_lse)
    dqs = torch.empty(qi.shape + (d,), dtype=torch.float32, device=q.device)
    dks = torch.empty(ki.shape + (d,), dtype=torch.float32, device=q.device)
    dvs = torch.empty(ki.shape + (v.shape[-1],), dtype=torch.float32, device=q.device)
    args, consts, bhc = _common_args(spec, q, k, v, qi, ki)
    consts["DSCALE"] = float(spec.scale)
    blocks = _blocks(spec, interpret, "bwd")
    with _INTERPRETER_LOCK if interpret else _null():
        mod = _module(spec, "bwd", interpret)
        grid = (triton_cdiv(r.window, blocks["BLOCK_M"]), bhc)
        _run(
            mod._attn_routed_dq,
            grid,
            [dos, delta, mrow, invl, dqs, *args],
            {**consts, **blocks},
            interpret,
        )
        grid = (triton_cdiv(r.key_window, blocks["BLOCK_N"]), bhc)
        _run(
            mod._attn_routed_dkdv,
            grid,
            [slot_lse, dos, delta, mrow, invl, dks, dvs, *args],
            {**consts, **blocks},
            interpret,
        )
    LAUNCHES["routed_bwd"] += 1
    dq = routed.segment_sum(dqs, qi, n)
    dk = routed.segment_sum(dks, ki, nk)
    dv = routed.segment_sum(dvs, ki, nk)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---------------------------------------------------------------------------------------
# Ahead-of-time targets (sm_90 compile checks without a GPU)
# ---------------------------------------------------------------------------------------

_PTR_TYPES = {
    "Q": "qkv",
    "K": "qkv",
    "V": "qkv",
    "QI": "i64",
    "KI": "i64",
}


def kernel_targets(spec: AttentionSpec):
    """(name, ASTSource, launch options) of each GPU kernel of ``spec`` with the GPU
    block sizes, as launched on contiguous (B, H, N, D) tokens and (B, H, S) indices."""
    from triton.compiler import ASTSource

    from attnfx.codegen import cache
    from attnfx.codegen.launch import _tt

    fwd = cache.load_module(spec, "fwd", interpret=False)
    bwd = cache.load_module(spec, "bwd", interpret=False)
    r = spec.routing
    base = {
        "W": r.window,
        "WK": r.key_window,
        "HEAD_D": spec.head_dim,
        "HEAD_DV": spec.head_dim_v,
        "DSCALE": float(spec.scale),
    }
    out = []
    for name, fn in (
        ("routed_fwd", fwd._attn_routed_fwd),
        ("routed_dq", bwd._attn_routed_dq),
        ("routed_dkdv", bwd._attn_routed_dkdv),
    ):
        sig, cx = {}, {}
        consts = {**base, **_blocks(spec, False, "fwd" if name == "routed_fwd" else "bwd")}
        for arg in fn.arg_names:
            if arg in consts:
                sig[arg], cx[arg] = "constexpr", consts[arg]
            elif (
                arg.endswith("d")
                and arg.startswith("stride_")
                or arg in ("stride_qis", "stride_kis")
            ):
                sig[arg], cx[arg] = "constexpr", 1  # innermost strides of contiguous inputs
            elif arg in ("H", "C", "N_K", "SLOTS", "KSLOTS"):
                sig[arg] = "i32"
            elif arg[0].isupper():
                kind = _PTR_TYPES.get(arg, "fp32")
                sig[arg] = "*" + (_tt(spec.dtype) if kind == "qkv" else kind)
            else:
                sig[arg] = "i32"
        out.append(
            (
                name,
                ASTSource(fn=fn, signature=sig, constexprs=cx),
                dict(LAUNCH),
            )
        )
    return out
