"""Host time per attnfx op call: what a launch costs the CPU besides the kernel.

At small and medium sizes a GPU kernel takes less time than the Python that launches
it (N=4096 D64 softmax forward: about 0.17 ms at 400 TFLOP/s), and then the host, not
the GPU, sets the throughput.  This benchmark times calls on tiny tensors, where the
kernel is negligible, so that the time per call is the host's.

Rows (time per call, µs; the fastest of the repeats: noise only adds to host time):

attnfx fwd            ``attnfx.ops.attention`` without grad (eager: the op's implementation
                      under ``_EagerAttention``, run_forward)
attnfx fwd, op        the custom op ``attnfx::attention`` called as a compiled graph
                      calls it (torch's dispatch, then the same implementation)
attnfx fwd, no recipe the same with the launch recipes disabled (``_RECIPES_MAX = 0``:
                      plan, signatures, configs and bounds found on every call)
attnfx fwd+bwd        forward and ``backward()`` (``_EagerAttention``, run_backward)
attnfx fwd+bwd, op    the same through the custom ops and their registered autograd
attnfx fwd+bwd, no recipe
custom-op floor       a torch custom op of the same signature that only allocates its
                      outputs, its autograd a second such op (as attnfx's backward is):
                      torch's own dispatch cost
sdpa fwd / fwd+bwd    ``F.scaled_dot_product_attention`` (CUDA only)

On CUDA the kernels run (tiny shapes; the stream is synchronized once per batch of
calls).  On CPU, kernels run under Triton's interpreter, which would dominate: the
launch itself is replaced by a no-op (arguments still bound), so the rows measure
attnfx's Python up to the launch; the device column says so.

    python benchmarks/bench_host.py [--variants softmax,causal,sigmoid] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import Tensor


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="softmax,causal,sigmoid")
    p.add_argument("--n", type=int, default=128, help="sequence length (tiny: host-bound)")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--calls", type=int, default=200, help="calls per repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="write the rows here")
    return p.parse_args(argv)


def _spec(variant: str, n: int, d: int, dtype: str):
    import sympy

    from attnfx.predicate import K, MaskPredicate, Q
    from attnfx.spec import AttentionSpec, ScoreOp

    ops = [ScoreOp("mul", d**-0.5)]
    act = "softmax"
    if variant == "causal":
        ops.append(ScoreOp("fill_pred", -math.inf, pred=MaskPredicate(sympy.Le(K, Q)).to_key()))
    elif variant == "sigmoid":
        act = "sigmoid"
        ops.append(ScoreOp("add", -math.log(n)))
    elif variant != "softmax":
        raise SystemExit(f"unknown variant {variant!r}")
    return AttentionSpec(
        activation=act, score_ops=tuple(ops), head_dim=d, head_dim_v=d, dtype=dtype, out_dtype=dtype
    )


def _floor_op():
    """A custom op with attnfx::attention's signature that only allocates its outputs."""

    @torch.library.custom_op("attnfx_bench::floor", mutates_args=())
    def floor(
        q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str
    ) -> tuple[Tensor, Tensor]:
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @floor.register_fake
    def _(q, k, v, aux, spec):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.custom_op("attnfx_bench::floor_backward", mutates_args=())
    def floor_backward(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, aux: list[Tensor], spec: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @floor_backward.register_fake
    def _(dout, q, k, v, aux, spec):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.spec = inputs[4]
        ctx.save_for_backward(*inputs[:3])

    def backward(ctx, dout, dlse):
        # as attnfx's: the backward is a custom op of its own
        q, k, v = ctx.saved_tensors
        dq, dk, dv = floor_backward(dout, q, k, v, [], ctx.spec)
        return dq, dk, dv, [], None

    floor.register_autograd(backward, setup_context=setup)
    return floor


def _time_all(cases: dict, calls: int, repeats: int, sync) -> dict:
    """µs per call of each case: the fastest of ``repeats`` batches of ``calls``, the
    cases' batches interleaved (a drifting machine slows them alike)."""
    for fn in cases.values():
        for _ in range(3):
            fn()
    sync()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) / calls * 1e6)
    return best


def main(argv=None) -> int:
    a = _args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["ATTNFX_INTERPRET"] = "1"
    from attnfx import ops
    from attnfx.codegen import launch

    if cuda:
        device, dtype = torch.device("cuda"), torch.float16
        where = torch.cuda.get_device_name()
        sync = torch.cuda.synchronize
    else:
        device, dtype = torch.device("cpu"), torch.float32
        where = "cpu (Triton launch replaced by a no-op: attnfx's host path only)"
        sync = lambda: None  # noqa: E731
        launch._Launch.__call__ = _bind_only
    floor = _floor_op()
    rows = []
    shape = (1, 2, a.n, a.d)
    for variant in a.variants.split(","):
        spec = _spec(variant, a.n, a.d, str(dtype).removeprefix("torch."))
        cases = _cases(ops, launch, floor, spec, variant, shape, device, dtype, cuda)
        for name, us in _time_all(cases, a.calls, a.repeats, sync).items():
            rows.append({"variant": variant, "row": name, "us_per_call": round(us, 1)})
    print(f"host time per call, µs (fastest of {a.repeats} x {a.calls} calls), device: {where}")
    print(f"shape (B, H, N, D) = {shape}, {dtype}")
    names = list(dict.fromkeys(r["row"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"{'row':<28}" + "".join(f"{v:>10}" for v in variants))
    for name in names:
        vals = {r["variant"]: r["us_per_call"] for r in rows if r["row"] == name}
        print(f"{name:<28}" + "".join(f"{vals.get(v, float('nan')):>10.1f}" for v in variants))
    for v in variants:
        by = {r["row"]: r["us_per_call"] for r in rows if r["variant"] == v}
        print(
            f"{v}: recipes speed the fwd call up {by['attnfx fwd, no recipe'] / by['attnfx fwd']:.2f}x, "
            f"fwd+bwd {by['attnfx fwd+bwd, no recipe'] / by['attnfx fwd+bwd']:.2f}x; "
            f"the op's dispatch over the eager path: fwd {by['attnfx fwd, op'] / by['attnfx fwd']:.2f}x, "
            f"fwd+bwd {by['attnfx fwd+bwd, op'] / by['attnfx fwd+bwd']:.2f}x; attnfx's own on top of "
            f"torch's floor (op rows): fwd +{by['attnfx fwd, op'] - by['custom-op floor fwd']:.0f} µs, "
            f"fwd+bwd +{by['attnfx fwd+bwd, op'] - by['custom-op floor fwd+bwd']:.0f} µs"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": where, "shape": shape, "rows": rows}, f, indent=1)
    return 0


def _cases(ops, launch, floor, spec, variant, shape, device, dtype, cuda) -> dict:
    """name -> a callable making one call of that row."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    dout = torch.randn(shape, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            ops.attention(q, k, v, spec)

    def fwdbwd():
        ops.attention(qg, kg, vg, spec).backward(dout)

    def op_fwd():
        with torch.no_grad():
            ops.attention_op(q, k, v, [], spec.key)

    def op_fwdbwd():
        ops.attention_op(qg, kg, vg, [], spec.key)[0].backward(dout)

    def floor_fwd():
        with torch.no_grad():
            floor(q, k, v, [], spec.key)

    def floor_fwdbwd():
        floor(qg, kg, vg, [], spec.key)[0].backward(dout)

    cases = {"attnfx fwd": fwd, "attnfx fwd+bwd": fwdbwd}
    for name, fn in list(cases.items()):
        cases[f"{name}, no recipe"] = _without_recipes(launch, fn)
    cases["attnfx fwd, op"] = op_fwd
    cases["attnfx fwd+bwd, op"] = op_fwdbwd
    cases["custom-op floor fwd"] = floor_fwd
    cases["custom-op floor fwd+bwd"] = floor_fwdbwd
    if cuda:
        causal = variant == "causal"
        F = torch.nn.functional

        def sdpa():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def sdpa_bwd():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal).backward(dout)

        cases["sdpa fwd"], cases["sdpa fwd+bwd"] = sdpa, sdpa_bwd
    return cases


def _bind_only(self, tensors, scalars):
    # CPU: everything a launch does on the host but the Triton launch itself
    self.sig.bind({**tensors, **self.sched_tensors}, {**scalars, **self.sched_scalars})


def _without_recipes(launch, fn):
    def run():
        keep = launch._RECIPES_MAX
        launch._RECIPES_MAX = 0
        launch.clear_recipes()
        try:
            fn()
        finally:
            launch._RECIPES_MAX = keep

    return run


if __name__ == "__main__":
    sys.exit(main())
