"""What inductor makes of a site attnfx would keep: does its own SDPA pattern fuse it?

On CPU, the op's fast path for a softmax site is the fused SDPA kernel.  Inductor's
``fuse_attention`` patterns already turn some eager forms (``softmax(q @ kᵀ * c) @ v``,
with or without an additive mask) into that very kernel; for those, the rewrite only adds
the custom op's dispatch and its checks (measured 0.89-0.91x inductor's forward,
``benchmarks/bench_cpu.py --only softmax``).  The backend keeps such a site on CPU.

The probe traces the site's region (the verifier's module of the original nodes) to ATen
with inductor's decompositions, offers it to inductor's registered patterns, and looks
for an SDPA node in the result.  It is private inductor API: any failure answers "no"
(the site is rewritten, as before the probe existed), and inductor's counters are left as
they were.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from attnfx.passes import graph as G

log = logging.getLogger("attnfx")

_SDPA_TARGETS = ("scaled_dot_product",)


def fuses_to_sdpa(region: fx.GraphModule, ext: list[fx.Node]) -> bool:
    """Whether inductor's SDPA patterns rewrite ``region`` (inputs: ``ext``'s example
    values) into a fused attention call, in inference (no gradients)."""
    try:
        return _probe(region, [G.example_value(e) for e in ext])
    except Exception as e:  # noqa: BLE001 - private API: any failure means "not known to fuse"
        log.debug("attnfx: inductor probe failed: %s: %s", type(e).__name__, e)
        return False


def _static(x) -> bool:
    if isinstance(x, torch.Tensor):
        return all(isinstance(s, int) for s in (*x.shape, *x.stride()))
    return isinstance(x, (int, float, bool)) or x is None


def _probe(region: fx.GraphModule, inputs: list) -> bool:
    if not inputs or not all(_static(x) for x in inputs):
        return False  # symbolic shapes: not probed
    from torch._dynamo.utils import counters
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes import joint_graph
    from torch.fx.experimental.proxy_tensor import make_fx

    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
    joint_graph.lazy_init(device)  # (inductor's own, run once per process)
    with torch.no_grad():
        # (the example values are Dynamo's fake tensors: traced in their fake mode,
        # nothing of their size is allocated or computed)
        gm = make_fx(region, decomposition_table=select_decomp_table(), tracing_mode="fake")(
            *inputs
        )
    saved = {k: dict(v) for k, v in counters.items()}
    try:
        joint_graph.patterns.apply(gm.graph)
    finally:
        counters.clear()
        for k, v in saved.items():
            counters[k].update(v)
    return any(
        n.op == "call_function" and any(t in str(n.target) for t in _SDPA_TARGETS)
        for n in gm.graph.nodes
    )
