"""attnfx codegen: ``AttentionSpec`` -> Triton source (forward, backward) -> launch.

Public entry points::

    run_forward(spec, q, k, v, aux) -> (out, lse)
    run_backward(spec, dout, q, k, v, aux, out, lse) -> (dq, dk, dv)
    generate_source(spec, part)       # "fwd" | "bwd": the generated module's text
    kernel_targets(spec)              # every GPU kernel with signature, constexprs, config
    configs(spec, interpret=False)    # launch configs per kernel (lists: autotune-ready)

Modules: ``plan`` (decisions from the spec, the schedule), ``tiles`` (the tiles
schedule's host tile map, ``density``), ``templates`` (one template per kernel),
``library`` (the static Triton helpers), ``signature`` (argument lists), ``emit`` (fills
the templates), ``cache`` (loads modules), ``launch`` (runs them), ``autotune``.

Semantics are those of ``attnfx.ops.reference_attention`` /
``reference_attention_backward``.  CPU tensors run the kernels under Triton's
interpreter; CUDA tensors run them compiled.
"""

from attnfx.codegen.cache import VERSION, cache_dir, get_source, load_module, short_hash
from attnfx.codegen.launch import LAUNCHES, KernelTarget, kernel_targets, run_backward, run_forward
from attnfx.codegen.plan import Config, configs, make_plan, skip_bounds


def generate_source(spec, part: str = "fwd") -> str:
    """The generated Triton module for ``spec`` (``part``: "fwd" or "bwd")."""
    return get_source(spec, part)


__all__ = [
    "LAUNCHES",
    "VERSION",
    "Config",
    "KernelTarget",
    "cache_dir",
    "configs",
    "generate_source",
    "kernel_targets",
    "load_module",
    "make_plan",
    "run_backward",
    "run_forward",
    "short_hash",
    "skip_bounds",
]
