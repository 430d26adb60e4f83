"""The checks run on one generated program (plain PyTorch + attnfx only: this module's
source is pasted into every repro script, so a repro runs exactly what the fuzzer ran).

A program namespace defines ``make_model()``, ``make_inputs(nq, nkv, seed, later)``,
``EXPECTED`` ({kind: sites}), ``NEAR_MISS``, ``RERUN``, ``GRADS``, ``GRAD_INPUTS``,
``TRANSCENDENTAL`` (σ or tanh in the program: the equivalence bound gets its +1) and,
optionally, ``INTERPRET`` (run the rewritten sites through the generated Triton kernels
under Triton's interpreter, ``ATTNFX_INTERPRET=1``: on CPU the op otherwise runs its
PyTorch implementation) and ``LATER`` (call the compiled model once more on
``make_inputs(later=True)``: inputs the sites were not compiled or verified on, e.g. rows
of an additive mask that are all ``-inf``).  Every call's outputs and, with ``GRADS``,
input gradients are checked; the module's buffers (updated in place by forward) are
compared after the last call.  ``check_program(ns, ...)`` returns ``(failures, stats)``;
each failure is ``(category, message)`` with category one of

    mismatch              an output or gradient fails the equivalence rule against gold/base
    label mismatch        sites rewritten by kind != the labels (a missed or a false rewrite;
                          a missed rewrite in a program marked ``KNOWN_GAP`` is only counted)
    near-miss differs     a near-miss's output is not bitwise the plain compile's
    uncounted exception   torch.compile raised, or attnfx fell back on an internal error
    not idempotent        the rewritten graph fails lint, or a second pipeline run changes it
    recompile             a dynamic-shape rerun compiled more graphs than expected
    kernel not run        an ``INTERPRET`` program rewrote sites but no generated kernel ran

An output or input gradient that fails the rule is first checked for ill-conditioning:
the program is run again with every rewritten site computed *exactly* (float64, from the
same working-dtype inputs and cotangent; the forward by the reference implementation as it
was before any planted bug, the backward by the blocked float64 reference; each result
rounded once to its dtype).  If even that exact evaluation misses the rule, yet lands
within 4x of eager's own error, the miss is the conditioning of the working-dtype inputs,
not the rewrite: eager's extra roundings happened to land nearer gold.  The output or
gradient is then held to the exact evaluation instead (``ill-conditioned``, counted, not
a failure).  A program of several sites (stacked layers) is also judged as the
equivalence rule is stated, per site: every call of the op the candidate run made
(forward, backward and aux backward, recorded with their inputs) meets the rule against
the pristine reference on those very inputs, float64 gold and working-dtype base, and the
output stays within the whole-graph bound of eager's (``testing.graph_outputs_close``).
Then the miss is each site's allowed rounding carried on by the program's conditioning
(two unscaled softmax layers amplify an input's rounding), not the rewrite
(``propagated``, counted, not a failure).  Likewise a labelled site the runtime
verifier kept is not a label mismatch when the program with its sites forced through
(``verify="off"``) passes every check: the verifier's side of the same rule on the same
inputs (``verifier conservative``, counted).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time

import torch

import attnfx
from attnfx import ops, report
from attnfx.backend import Options, attnfx_backend, rewrite_graph
from attnfx.testing import compare, graph_outputs_close

# The reference implementation as imported, before a planted bug can replace it.
_PRISTINE_REFERENCE = ops.reference_attention

CATEGORIES = (
    "mismatch",
    "label mismatch",
    "near-miss differs",
    "uncounted exception",
    "not idempotent",
    "recompile",
    "kernel not run",
)


def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _inputs(ns, device, *, nq=None, nkv=None, f64=False, grad=False, later=False):
    kw = {} if nq is None else {"nq": nq, "nkv": nkv}
    if later:
        kw["later"] = True
    xs = list(ns["make_inputs"](**kw))
    out = []
    for i, x in enumerate(xs):
        x = x.to(device)
        if f64 and x.is_floating_point():
            x = x.double()
        if grad and i in ns["GRAD_INPUTS"] and x.is_floating_point():
            x = x.detach().requires_grad_(True)
        out.append(x)
    return out


def _gold(ns, model, inputs):
    """Run the float64 gold: the program's upcast dtype ``ACC`` (float32) becomes float64."""
    saved = ns.get("ACC")
    if saved is not None:
        ns["ACC"] = torch.float64
    try:
        return model(*inputs)
    finally:
        if saved is not None:
            ns["ACC"] = saved


def _idempotence(gm, example_inputs) -> str | None:
    """Rewrite ``gm`` (verify off), lint, rewrite the result again: nothing may change."""
    import attnfx.backend as B

    saved = set(B._verified)  # do not let this check mark sites as verified
    try:
        new, _ = rewrite_graph(gm, example_inputs, Options(verify="off", cpu="always"))
        new.graph.lint()
        new.recompile()
        again, recs = rewrite_graph(new, example_inputs, Options(verify="off", cpu="always"))
        again.graph.lint()
    finally:
        B._verified.clear()
        B._verified.update(saved)

    def shape(g):
        return [(n.op, str(n.target)) for n in g.graph.nodes]

    if any(r.status == "rewritten" for r in recs):
        return f"a second pipeline run rewrote {sum(r.status == 'rewritten' for r in recs)} more site(s)"
    if shape(again) != shape(new):
        return "a second pipeline run changed the rewritten graph"
    return None


@contextlib.contextmanager
def _exact_sites():
    """Every rewritten site evaluated exactly: the op's forward by the pristine reference
    in float64 from its working-dtype inputs, its backward (q, k, v and learnable aux) by
    the blocked reference in float64 from the same inputs and cotangent, each result rounded once to its dtype.
    The op reads ``attnfx.cpu``'s functions at each call, so patching them (and keeping the
    Triton path out) reaches every site."""
    import attnfx.cpu as cpu

    def up(t):
        return t.detach().double() if t.is_floating_point() else t

    def forward(q, k, v, aux, spec, *a, **kw):
        out, lse = _PRISTINE_REFERENCE(up(q), up(k), up(v), [up(x) for x in aux], spec)
        return out.to(ops.torch_dtype(spec.out_dtype)), lse.float()

    def backward(dout, q, k, v, aux, spec, *a, **kw):
        # eager's formulas in float64 (no autograd here: the op's implementation runs
        # below the autograd dispatch keys)
        grads = blocked(up(dout), up(q), up(k), up(v), [up(x) for x in aux], spec)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))

    def aux_backward(dout, q, k, v, aux, spec, which, *a, **kw):
        grads = aux_blocked(up(dout), up(q), up(k), up(v), [up(x) for x in aux], spec, which)
        return [g.to(aux[i].dtype) for g, i in zip(grads, which)]

    saved = (cpu.forward, cpu.backward, cpu.reference_aux_backward, ops.use_triton)
    blocked, aux_blocked = cpu.reference_backward, cpu.reference_aux_backward
    env = os.environ.pop("ATTNFX_INTERPRET", None)
    cpu.forward, cpu.backward, cpu.reference_aux_backward = forward, backward, aux_backward
    ops.use_triton = lambda device: False
    try:
        yield
    finally:
        cpu.forward, cpu.backward, cpu.reference_aux_backward, ops.use_triton = saved
        if env is not None:
            os.environ["ATTNFX_INTERPRET"] = env


def _exact_candidate(ns, model, inputs, *, cotangent=None):
    """The attnfx-compiled program with every rewritten site evaluated exactly
    (``_exact_sites``): its outputs, or, given ``cotangent`` (for output 0), the gradients
    of ``inputs`` (each None where the input gets none)."""
    torch._dynamo.reset()
    try:
        with _exact_sites():
            compiled = torch.compile(
                model,
                backend="attnfx",
                options={"verify": "off", "inner": "eager", "cpu": "always"},
            )
            if cotangent is None:
                with torch.no_grad():
                    return [o.detach() for o in _flat(compiled(*inputs))]
            _flat(compiled(*inputs))[0].backward(cotangent)
            return [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]
    finally:
        torch._dynamo.reset()


def _held_to_exact(c, b, g, exact, *, grad, tr) -> bool:
    """The rule's verdict for a candidate that missed it, given the exact evaluation: True
    when even the exact evaluation misses the rule, lands within 4x of eager's own error,
    and the candidate meets the rule against it (the inputs' conditioning, not the
    rewrite)."""
    if compare(exact, b, g, grad=grad, transcendental=tr, check_strides=False).ok:
        return False  # the exact evaluation meets the rule: the candidate must too
    e_err = (exact.double() - g.double()).abs().nan_to_num(0).max().item()
    b_err = (b.double() - g.double()).abs().nan_to_num(0).max().item()
    if e_err > 4 * b_err + 1e-6:
        return False  # far from eager: not conditioning (e.g. a wrong match)
    return compare(c, exact, g, grad=grad, transcendental=tr, check_strides=False).ok


def _ill_conditioned(ns, model, c, b, g, i, tr, device, later=False) -> bool:
    """Whether output ``i``'s miss is the inputs' conditioning (see the module docstring).
    ``model``: a fresh copy of the model as made (the buffers a program updates in place
    never feed its outputs, so this is the model as it was before any call).
    ``later``: the miss is on the later call's inputs."""
    try:
        exact = _exact_candidate(ns, model, _inputs(ns, device, later=later))[i]
    except Exception:  # noqa: BLE001 - no verdict: the miss stays a mismatch
        return False
    return _held_to_exact(c, b, g, exact, grad=False, tr=tr)


def _ill_conditioned_grad(ns, model, c, b, g, i, cot, tr, device, later=False) -> bool:
    """Whether input ``i``'s gradient miss is the inputs' conditioning: as
    ``_ill_conditioned``, with the exact evaluation's backward under the same cotangent."""
    try:
        ins = _inputs(ns, device, grad=True, later=later)
        exact = _exact_candidate(ns, model, ins, cotangent=cot)[i]
    except Exception:  # noqa: BLE001 - no verdict: the miss stays a mismatch
        return False
    return exact is not None and _held_to_exact(c, b, g, exact, grad=True, tr=tr)


class _SiteCalls:
    """The op calls of a candidate run, with their inputs and results (``_recording``);
    calls made while the backend compiles (the verifier's trials) are not recorded."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, object]] = []
        self.paused = 0

    def add(self, kind, args, result):
        if self.paused:
            return

        def keep(x):
            if isinstance(x, torch.Tensor):
                return x.detach().clone()
            if isinstance(x, (list, tuple)):
                return type(x)(keep(t) for t in x)
            return x

        self.calls.append((kind, keep(args), keep(result)))


@contextlib.contextmanager
def _recording(record: _SiteCalls):
    """Record every call of the attention op's forward, backward and aux backward (the
    custom ops' bodies read these functions from ``attnfx.ops`` at each call, compiled
    graphs included)."""
    saved = (ops._forward_impl, ops._backward_impl, ops._aux_backward_impl)
    fwd, bwd, aux_bwd = saved

    def forward(q, k, v, aux, spec):
        res = fwd(q, k, v, aux, spec)
        record.add("forward", (q, k, v, aux, spec), res[0])
        return res

    def backward(dout, q, k, v, aux, out, lse, spec):
        res = bwd(dout, q, k, v, aux, out, lse, spec)
        record.add("backward", (dout, q, k, v, aux, spec), res)
        return res

    def aux_backward(dout, q, k, v, aux, out, lse, spec, which):
        res = aux_bwd(dout, q, k, v, aux, out, lse, spec, which)
        record.add("aux_backward", (dout, q, k, v, aux, spec, tuple(which)), res)
        return res

    ops._forward_impl, ops._backward_impl, ops._aux_backward_impl = (
        forward,
        backward,
        aux_backward,
    )
    try:
        yield record
    finally:
        ops._forward_impl, ops._backward_impl, ops._aux_backward_impl = saved


@contextlib.contextmanager
def _eager_rounding():
    """The reference accumulating as eager code does, in float32 (float64 inputs aside):
    it accumulates in float64 whatever the dtype (``reference._accumulation_dtype``), so
    its float32 error would be none, no base to hold a site to."""
    from attnfx import reference

    saved = reference._accumulation_dtype
    reference._accumulation_dtype = lambda dtype: (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    try:
        yield
    finally:
        reference._accumulation_dtype = saved


def _sites_meet_the_rule(record: _SiteCalls, kinds, tr) -> bool:
    """Whether each recorded call of ``kinds`` meets the equivalence rule on its own
    inputs: its result against the pristine reference's, float64 gold and a base that
    rounds as eager does (``_eager_rounding``)."""
    import attnfx.cpu as cpu
    from attnfx.reference import reference_attention_backward
    from attnfx.spec import AttentionSpec

    def up(t):
        return t.double() if t.is_floating_point() else t

    calls = [c for c in record.calls if c[0] in kinds]
    if not calls:
        return False
    for kind, args, got in calls:
        if kind == "forward":
            q, k, v, aux, key = args
            s = AttentionSpec.from_key(key).resolved(q.shape[-1], v.shape[-1])
            gold = _PRISTINE_REFERENCE(up(q), up(k), up(v), [up(a) for a in aux], s)[0]
            with _eager_rounding():
                base = _PRISTINE_REFERENCE(q, k, v, aux, s)[0]
            trios = [(got, base, gold, False)]
        elif kind == "backward":
            dout, q, k, v, aux, key = args
            s = AttentionSpec.from_key(key).resolved(q.shape[-1], v.shape[-1])
            with _eager_rounding():
                base = reference_attention_backward(dout, q, k, v, aux, s)
            gold = reference_attention_backward(
                up(dout), up(q), up(k), up(v), [up(a) for a in aux], s
            )
            trios = [(c, b, g, True) for c, b, g in zip(got, base, gold)]
        else:
            dout, q, k, v, aux, key, which = args
            s = AttentionSpec.from_key(key).resolved(q.shape[-1], v.shape[-1])
            with _eager_rounding():
                base = cpu.reference_aux_backward(dout, q, k, v, aux, s, list(which))
            gold = cpu.reference_aux_backward(
                up(dout), up(q), up(k), up(v), [up(a) for a in aux], s, list(which)
            )
            trios = [(c, b, g, True) for c, b, g in zip(got, base, gold)]
        for c, b, g, grad in trios:
            if not compare(c, b, g, grad=grad, transcendental=tr, check_strides=False).ok:
                return False
    return True


def _propagated(record: _SiteCalls | None, c, b, *, kinds, tr) -> bool:
    """Whether a whole-program miss is the sites' allowed rounding carried on (see the
    module docstring): several sites ran, each meets the rule on its own inputs, and the
    output stays within the whole-graph bound of eager's."""
    if record is None or sum(k == "forward" for k, _, _ in record.calls) < 2:
        return False  # one site: its output is held to the rule as the program gives it
    if not graph_outputs_close(c, b).ok:
        return False
    try:
        return _sites_meet_the_rule(record, kinds, tr)
    except Exception:  # noqa: BLE001 - no verdict: the miss stays a mismatch
        return False


def _check_outputs(failures, stats, outs, *, tr, what, ill=None) -> None:
    """Each floating output of (cand, base, gold) under the equivalence rule.  ``ill(c, b, g, i)``:
    why a miss of output ``i`` is not the rewrite's (the stat it is counted under, not
    failed: ``ill_conditioned``, ``propagated``), or None."""
    cand, base, gold = outs
    for i, (c, b, g) in enumerate(zip(_flat(cand), _flat(base), _flat(gold), strict=False)):
        if not c.is_floating_point():
            continue
        c, b, g = c.detach(), b.detach(), g.detach()
        res = compare(c, b, g, transcendental=tr, context=f"{what}output {i}")
        why = ill(c, b, g, i) if not res.ok and ill is not None else None
        if why:
            stats[why] = stats.get(why, 0) + 1
        elif not res.ok:
            failures.append(("mismatch", res.message))


def _check_grads(failures, stats, ns, outs, ins, *, tr, what, ill=None, record=None) -> None:
    """Backward of output 0 under one cotangent; each input gradient under the equivalence
    rule.  ``ill(c, b, g, i, cot)``: as ``_check_outputs``'s, for input ``i``'s
    gradient.  ``record``: where the candidate's backward records its op calls."""
    cand, base, gold = (_flat(o) for o in outs)
    c_in, b_in, g_in = ins
    gen = torch.Generator().manual_seed(7)
    # Rounded to the working dtype first, so that gold sees the very same cotangent.
    cot = torch.randn(cand[0].shape, generator=gen).to(cand[0].dtype).to(cand[0].device)
    try:
        with _recording(record) if record is not None else contextlib.nullcontext():
            cand[0].backward(cot)
    except Exception as e:  # noqa: BLE001
        failures.append(
            (
                "uncounted exception",
                f"{what}backward of the compiled model raised {type(e).__name__}: {e}",
            )
        )
        return
    base[0].backward(cot)
    gold[0].backward(cot.double())
    for i in ns["GRAD_INPUTS"]:
        gc, gb, gg = c_in[i].grad, b_in[i].grad, g_in[i].grad
        if gb is None:
            continue
        if gc is None:
            failures.append(("mismatch", f"{what}grad of input {i}: none from the compiled model"))
            continue
        res = compare(
            gc,
            gb,
            gg,
            grad=True,
            transcendental=tr,
            check_strides=False,
            context=f"{what}grad of input {i}",
        )
        why = ill(gc, gb, gg, i, cot) if not res.ok and ill is not None else None
        if why:
            stats[why] = stats.get(why, 0) + 1
        elif not res.ok:
            failures.append(("mismatch", res.message))


def _check_buffers(failures, models, *, tr) -> None:
    """The module buffers of (cand, base, gold) models after the same calls: floating ones
    under the equivalence rule, the others exactly (forward may update them in place)."""
    bufs = [dict(m.named_buffers()) for m in models]
    for name, c in bufs[0].items():
        b, g = bufs[1].get(name), bufs[2].get(name)
        if b is None or g is None:
            continue
        if c.is_floating_point():
            res = compare(c, b, g, transcendental=tr, context=f"buffer {name}")
            if not res.ok:
                failures.append(("mismatch", res.message))
        elif not torch.equal(c, b):
            failures.append(
                (
                    "mismatch",
                    f"buffer {name}: {c.tolist()} from the compiled model, {b.tolist()} eager",
                )
            )


_VERIFIER_KEPT = "verifier rejected the rewrite"


def _forced_rewrite_ok(ns, options, device, exact_backend, interp) -> bool:
    """Whether the program, its sites forced through (``verify="off"``), rewrites every
    labelled site and passes every output and gradient check (ill-conditioning counted as
    in the module docstring): then a verifier rejection was the conservative side of the
    rule on these inputs, not a missed or hidden bug."""
    forced = dict(options, verify="off")
    try:
        fails, st = _check_program(
            ns, options=forced, device=device, exact_backend=exact_backend,
            idempotence=False, interp=interp,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - no verdict: the label mismatch stands
        return False
    want = {k: v for k, v in ns["EXPECTED"].items() if v}
    return not fails and st["rewritten"] == want


def _launches() -> int:
    from attnfx.codegen import LAUNCHES

    return sum(LAUNCHES.values())


def check_program(
    ns: dict,
    *,
    options: dict | None = None,
    device: str = "cpu",
    exact_backend: str = "aot_eager",
    idempotence: bool = True,
) -> tuple[list[tuple[str, str]], dict]:
    """Compile the program with attnfx and run every check; never raises for a finding."""
    interp = bool(ns.get("INTERPRET", False)) and device == "cpu"
    saved_env = os.environ.get("ATTNFX_INTERPRET")
    if interp:
        os.environ["ATTNFX_INTERPRET"] = "1"  # the op runs the generated kernels on CPU
    try:
        return _check_program(
            ns,
            options=options,
            device=device,
            exact_backend=exact_backend,
            idempotence=idempotence,
            interp=interp,
        )
    finally:
        if saved_env is None:
            os.environ.pop("ATTNFX_INTERPRET", None)
        else:
            os.environ["ATTNFX_INTERPRET"] = saved_env


def _check_program(ns, *, options, device, exact_backend, idempotence, interp):
    failures: list[tuple[str, str]] = []
    stats: dict = {"rewritten": {}, "kept": {}, "graphs": 0, "rerun_graphs": 0}
    options = dict(options or {})
    # the fuzzer checks rewrites: also those the default CPU policy leaves to inductor
    options.setdefault("cpu", "always")
    expected, near = dict(ns["EXPECTED"]), ns["NEAR_MISS"]
    grads = bool(ns["GRADS"])
    tr = bool(ns.get("TRANSCENDENTAL", False))  # σ / tanh in the score program: the rule's +1
    t0 = time.perf_counter()
    launches0 = _launches() if interp else 0

    torch._dynamo.reset()
    attnfx.reset_counters()
    torch.manual_seed(0)
    model = ns["make_model"]().to(device)
    # Forward may update buffers in place: every run starts from its own copy of the
    # model as made (compiled, eager, gold, exact evaluation, near-miss reference).
    pristine = copy.deepcopy(model)
    base_model = copy.deepcopy(pristine)
    gold_model = copy.deepcopy(pristine).double()

    graphs = []
    # the op calls of the candidate's calls (``propagated``), one record per call
    first, later_calls = _SiteCalls(), _SiteCalls()

    def backend(gm, example_inputs):
        graphs.append(gm)
        for r in (first, later_calls):  # (the verifier's trials are not the candidate's)
            r.paused += 1
        try:
            fn = attnfx_backend(gm, example_inputs, options=options)
        finally:
            for r in (first, later_calls):
                r.paused -= 1
        if idempotence:
            try:
                msg = _idempotence(gm, example_inputs)
            except Exception as e:  # noqa: BLE001 - a finding, not a crash of the fuzzer
                msg = f"lint/rewrite of the rewritten graph raised {type(e).__name__}: {e}"
            if msg:
                failures.append(("not idempotent", msg))
        return fn

    compiled = torch.compile(model, backend=backend)
    c_in = _inputs(ns, device, grad=grads)
    b_in = _inputs(ns, device, grad=grads)
    g_in = _inputs(ns, device, f64=True, grad=grads)
    try:
        with report.collecting() as records, _recording(first):
            cand = compiled(*c_in)
    except Exception as e:  # noqa: BLE001
        failures.append(
            ("uncounted exception", f"torch.compile(backend=attnfx) raised {type(e).__name__}: {e}")
        )
        stats["time"] = time.perf_counter() - t0
        return failures, stats
    stats["graphs"] = len(graphs)
    base = base_model(*b_in)
    gold = _gold(ns, gold_model, g_in)

    # Labels: precision and recall per kind, from the counters and the explain records.
    counters = dict(attnfx.counters)
    rewritten = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("rewritten.")}
    kept = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("kept.")}
    stats["rewritten"], stats["kept"] = rewritten, kept
    from_records = {}
    for r in records:
        if r.status == "rewritten":
            from_records[r.kind] = from_records.get(r.kind, 0) + 1
    if from_records != rewritten:
        failures.append(
            (
                "label mismatch",
                f"counters {rewritten} disagree with the explain records {from_records}",
            )
        )
    want = {k: v for k, v in expected.items() if v}
    known = ns.get("KNOWN_GAP")
    missed_only = all(rewritten.get(k, 0) <= v for k, v in want.items()) and set(rewritten) <= set(
        want
    )
    missing = sum(want.values()) - sum(rewritten.values())
    # A verifier rejection is judged last (``labels``): forcing the sites through compiles
    # the program again, which must not disturb this run's later calls.
    forced_check = False
    if rewritten != want and known and missed_only:
        stats["known_gap"] = known  # an open attnfx bug: reported, not a failure
    elif rewritten != want and missed_only and not near and kept.get(_VERIFIER_KEPT, 0) == missing:
        forced_check = True
    elif rewritten != want:
        what = f"near-miss {near!r}" if near else "expected"
        failures.append(
            (
                "label mismatch",
                f"rewritten {rewritten or '{}'}, {what} {expected or '{}'}; kept: {kept or '{}'}",
            )
        )

    def labels():
        if not forced_check:
            return
        if _forced_rewrite_ok(ns, options, device, exact_backend, interp):
            # The verifier kept correct rewrites whose rounding on these inputs missed the
            # rule by chance (ill-conditioned scores): forced, they pass every check.
            stats["verifier_conservative"] = missing
        else:
            failures.append(
                (
                    "label mismatch",
                    f"rewritten {rewritten or '{}'}, expected {expected or '{}'}; kept: {kept}",
                )
            )

    bad = {
        r: n
        for r, n in kept.items()
        if r in ("internal error", "inner compiler failed on rewritten graph")
    }
    if bad:
        errs = [f"{r.where}" for r in records if r.reason == "internal error"]
        failures.append(("uncounted exception", f"attnfx fell back: {bad} {errs}"))

    # Outputs against gold (float64) and base (working dtype), under the equivalence rule.
    def ill(later):
        def judge(c, b, g, i):
            m = copy.deepcopy(pristine)
            if _ill_conditioned(ns, m, c, b, g, i, tr, device, later=later):
                return "ill_conditioned"
            record = later_calls if later else first
            if _propagated(record, c, b, kinds=("forward",), tr=tr):
                return "propagated"
            return None

        return judge

    def ill_grad(later):
        def judge(c, b, g, i, cot):
            m = copy.deepcopy(pristine)
            if _ill_conditioned_grad(ns, m, c, b, g, i, cot, tr, device, later=later):
                return "ill_conditioned"
            record = later_calls if later else first
            if _propagated(record, c, b, kinds=("forward", "backward", "aux_backward"), tr=tr):
                return "propagated"
            return None

        return judge

    _check_outputs(failures, stats, (cand, base, gold), tr=tr, what="", ill=ill(False))
    if grads:
        _check_grads(
            failures,
            stats,
            ns,
            (cand, base, gold),
            (c_in, b_in, g_in),
            tr=tr,
            what="",
            ill=ill_grad(False),
            record=first,
        )

    # A later call on inputs the sites were neither compiled nor verified on.
    if ns.get("LATER"):
        c2_in = _inputs(ns, device, grad=grads, later=True)
        b2_in = _inputs(ns, device, grad=grads, later=True)
        g2_in = _inputs(ns, device, f64=True, grad=grads, later=True)
        n_before = len(graphs)
        try:
            with _recording(later_calls):
                c2 = compiled(*c2_in)
            outs = (c2, base_model(*b2_in), _gold(ns, gold_model, g2_in))
        except Exception as e:  # noqa: BLE001
            failures.append(
                ("uncounted exception", f"the later call raised {type(e).__name__}: {e}")
            )
        else:
            if len(graphs) > n_before:
                failures.append(("recompile", "the later call (same shapes) compiled again"))
            what = "later call: "
            _check_outputs(failures, stats, outs, tr=tr, what=what, ill=ill(True))
            if grads:
                _check_grads(
                    failures,
                    stats,
                    ns,
                    outs,
                    (c2_in, b2_in, g2_in),
                    tr=tr,
                    what=what,
                    ill=ill_grad(True),
                    record=later_calls,
                )

    # Dynamic-shape rerun: at most one recompile (to a dynamic graph) per graph.
    if ns["RERUN"]:
        nq, nkv = ns["RERUN"]
        n_before = len(graphs)
        try:
            with torch.no_grad():
                cand2 = compiled(*_inputs(ns, device, nq=nq, nkv=nkv, grad=grads))
                base2 = base_model(*_inputs(ns, device, nq=nq, nkv=nkv))
                gold2 = _gold(ns, gold_model, _inputs(ns, device, nq=nq, nkv=nkv, f64=True))
        except Exception as e:  # noqa: BLE001
            failures.append(
                (
                    "uncounted exception",
                    f"rerun at (nq, nkv)=({nq}, {nkv}) raised {type(e).__name__}: {e}",
                )
            )
        else:
            stats["rerun_graphs"] = len(graphs) - n_before
            if len(graphs) > 2 * n_before:
                failures.append(
                    (
                        "recompile",
                        f"{len(graphs)} graphs after a rerun at ({nq}, {nkv}); expected <= {2 * n_before}",
                    )
                )
            what = f"rerun ({nq}, {nkv}) "
            _check_outputs(failures, stats, (cand2, base2, gold2), tr=tr, what=what)
            bad = {k: v for k, v in attnfx.counters.items() if k == "kept.internal error"}
            if bad:
                failures.append(("uncounted exception", f"attnfx fell back on the rerun: {bad}"))

    # Buffers that forward updated in place, after the same calls on each model.
    _check_buffers(failures, (model, base_model, gold_model), tr=tr)

    # A near-miss equals the plain compile bitwise.
    if near is not None:
        torch._dynamo.reset()
        try:
            ref_model = torch.compile(copy.deepcopy(pristine), backend=exact_backend)
            ref = ref_model(*_inputs(ns, device, grad=grads))
        except Exception as e:  # noqa: BLE001
            failures.append(
                ("uncounted exception", f"backend={exact_backend!r} raised {type(e).__name__}: {e}")
            )
        else:
            for i, (a, r) in enumerate(zip(_flat(cand), _flat(ref), strict=False)):
                a, r = a.detach(), r.detach()
                same = (
                    a.shape == r.shape
                    and a.dtype == r.dtype
                    and bool(torch.equal(a.isnan(), r.isnan()))
                )
                same = same and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(r)))
                if not same:
                    diff = (
                        (a.double() - r.double()).abs().nan_to_num().max().item()
                        if a.shape == r.shape
                        else None
                    )
                    failures.append(
                        (
                            "near-miss differs",
                            f"output {i} differs from backend={exact_backend!r} (max diff {diff})",
                        )
                    )

    # The interpreter lane: the rewritten sites must have run the generated kernels.
    if interp:
        stats["interp"] = True
        stats["launches"] = _launches() - launches0
        if sum(rewritten.values()) and not stats["launches"]:
            failures.append(
                ("kernel not run", f"{rewritten} rewritten under ATTNFX_INTERPRET=1, no launch")
            )
    torch._dynamo.reset()
    labels()  # last: it compiles the program again
    stats["time"] = time.perf_counter() - t0
    return failures, stats
