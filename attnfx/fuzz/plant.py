"""Planted bugs, for testing the fuzzer itself (test tooling: nothing here runs unless asked).

``apply(name)`` monkeypatches attnfx in this process so that some rewrites are wrong;
run the fuzzer with ``options={"verify": "off"}`` so that the runtime verifier does not
hide the bug, and it must report a mismatch (or a label mismatch) and write a repro.

    drop-scale            the op's CPU forward (``attnfx.cpu.forward`` and
                          ``reference_forward``) ignores the constant scale ops (``mul``)
    accept-query-softmax  the softmax recognizer takes a softmax over the query axis
                          (``dim=-2``) as if it were over the keys
    sigmoid-bias          the op's CPU forward ignores the constant and length-dependent biases
                          (``add``, ``add_sym``) of sigmoid specs (``σ(s + b)`` becomes ``σ(s)``)
    kernel-drop-scale     the generated Triton kernels (``attnfx.codegen.run_forward`` /
                          ``run_backward``) ignore the constant scale ops (``mul``): only
                          the interpreter lane (or a GPU) can find it
"""

from __future__ import annotations

import dataclasses

PLANTS = ("drop-scale", "accept-query-softmax", "sigmoid-bias", "kernel-drop-scale")
_applied: set[str] = set()


def apply(name: str | None) -> None:
    if not name:
        return
    if name not in PLANTS:
        raise ValueError(f"unknown plant {name!r}; known: {PLANTS}")
    if name in _applied:
        return
    _applied.add(name)
    if name == "drop-scale":
        _drop_scale()
    elif name == "sigmoid-bias":
        _drop_sigmoid_bias()
    elif name == "kernel-drop-scale":
        _kernel_drop_scale()
    else:
        _accept_query_softmax()


def _patch_cpu_forward(transform) -> None:
    """The op's CPU forward (both paths; the op looks them up on ``attnfx.cpu`` at each
    call) runs ``transform(spec)`` instead of the spec."""
    import attnfx.cpu as cpu

    fast, blocked = cpu.forward, cpu.reference_forward
    cpu.forward = lambda q, k, v, aux, spec, *a, **kw: fast(q, k, v, aux, transform(spec), *a, **kw)
    cpu.reference_forward = lambda q, k, v, aux, spec, *a, **kw: blocked(
        q, k, v, aux, transform(spec), *a, **kw
    )


def _drop_scale() -> None:
    _patch_cpu_forward(
        lambda spec: dataclasses.replace(
            spec, score_ops=tuple(o for o in spec.score_ops if o.op != "mul")
        )
    )


def _kernel_drop_scale() -> None:
    import attnfx.codegen as cg

    fwd, bwd = cg.run_forward, cg.run_backward

    def strip(spec):
        return dataclasses.replace(
            spec, score_ops=tuple(o for o in spec.score_ops if o.op != "mul")
        )

    # the op looks the launchers up on attnfx.codegen at each call
    cg.run_forward = lambda spec, *args, **kw: fwd(strip(spec), *args, **kw)
    cg.run_backward = lambda spec, *args, **kw: bwd(strip(spec), *args, **kw)


def _drop_sigmoid_bias() -> None:
    def strip(spec):
        if spec.activation != "sigmoid":
            return spec
        kept = tuple(o for o in spec.score_ops if o.op not in ("add", "add_sym"))
        return dataclasses.replace(spec, score_ops=kept)

    _patch_cpu_forward(strip)


def _accept_query_softmax() -> None:
    from attnfx.passes import graph as G
    from attnfx.passes.match import NoMatch, walk_probs, walk_scores
    from attnfx.passes.recognize import softmax as rec

    def match(node, activation="softmax", kind=rec.KIND):
        x = node.args[0]
        shp = G.shape(x)
        if shp is None or len(shp) not in (3, 4):
            raise NoMatch("scores are not 3-D or 4-D")
        chain = walk_scores(x, shp)
        pv, _ = walk_probs(node)
        return rec.build_site(node, pv, chain, kind=kind, activation=activation)  # no dim check

    rec.match = match
