"""The fuzz loop: generate programs, check each, shrink each failure, write repro scripts.

    from attnfx.fuzz.runner import fuzz
    summary = fuzz(examples=100, seed=1, out="fuzz_out")
    print(summary.table())

Programs are drawn by hypothesis (``@seed(seed)``, generate phase only, no database), so
a seed reproduces the same programs.  Each failure is minimized by a greedy shrinker over
the program's choices (each choice tried at its simpler values, kept when the same
category of failure persists), then written to ``out/`` as a standalone script: the
program's source, the checks of ``attnfx/fuzz/harness.py``, and the failing assertion.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import linecache
import os
import sys
import time
from collections.abc import Callable

from attnfx.fuzz import grammar
from attnfx.fuzz.frame import Program

DEFAULT_OPTIONS = {"inner": "eager"}


@dataclasses.dataclass
class Result:
    index: int
    program: Program
    failures: list[tuple[str, str]]
    stats: dict
    repro: str | None = None
    shrunk: Program | None = None


@dataclasses.dataclass
class Summary:
    seed: int
    results: list[Result]
    elapsed: float
    options: dict
    plant: str | None = None

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.failures]

    def count(self, category: str) -> int:
        return sum(1 for r in self.results if any(c == category for c, _ in r.failures))

    @property
    def ok(self) -> bool:
        return not self.failures

    def rewritten(self) -> collections.Counter:
        c = collections.Counter()
        for r in self.results:
            c.update(r.stats.get("rewritten", {}))
        return c

    def expected(self) -> collections.Counter:
        c = collections.Counter()
        for r in self.results:
            c.update(r.program.expected)
        return c

    def table(self) -> str:
        from attnfx.fuzz.harness import CATEGORIES

        near = [r for r in self.results if r.program.near_miss]
        near_ok = [r for r in near if not r.failures]
        lanes = collections.Counter(r.program.lane for r in self.results)
        rows = [("programs generated", str(len(self.results)))]
        exp, got = self.expected(), self.rewritten()
        for kind in sorted(set(exp) | set(got)):
            rows.append((f"sites rewritten: {kind}", f"{got[kind]} (labelled {exp[kind]})"))
        gaps = collections.Counter(
            r.stats["known_gap"] for r in self.results if r.stats.get("known_gap")
        )
        rows.append(("known gaps (open bugs)", str(sum(gaps.values()))))
        ill = sum(r.stats.get("ill_conditioned", 0) for r in self.results)
        rows.append(("ill-conditioned (held to exact)", str(ill)))
        prop = sum(r.stats.get("propagated", 0) for r in self.results)
        rows.append(("several sites, each within the rule", str(prop)))
        cons = sum(r.stats.get("verifier_conservative", 0) for r in self.results)
        rows.append(("verifier kept, forced passes", str(cons)))
        rows.append(("near-misses correctly kept", f"{len(near_ok)} / {len(near)}"))
        rows.append(("lanes", ", ".join(f"{k} {v}" for k, v in sorted(lanes.items()))))
        interp = [r for r in self.results if r.program.interp]
        ran = [r for r in interp if r.stats.get("launches")]
        launches = sum(r.stats.get("launches", 0) for r in interp)
        rows.append(
            (
                "through the kernels (interpreter)",
                f"{len(ran)} / {len(interp)} programs ({launches} kernel launches)",
            )
        )
        inplace = collections.Counter(
            r.program.choices.get("inplace", "none") for r in self.results
        )
        del inplace["none"]
        rows.append(
            (
                "in-place ops around a site",
                ", ".join(f"{k} {v}" for k, v in sorted(inplace.items())) or "0",
            )
        )
        for cat in CATEGORIES:
            rows.append((cat if cat != "mismatch" else "mismatches", str(self.count(cat))))
        rows.append(("programs failing", str(len(self.failures))))
        rows.append(
            (
                "time",
                f"{self.elapsed:.1f} s ({self.elapsed / max(1, len(self.results)):.2f} s/program)",
            )
        )
        w = max(len(a) for a, _ in rows)
        head = f"attnfx fuzz: seed {self.seed}, options {self.options}" + (
            f", plant {self.plant}" if self.plant else ""
        )
        lines = [head, "-" * len(head)] + [f"{a.ljust(w)}  {b}" for a, b in rows]
        for why, n in gaps.items():
            lines.append(f"  known gap x{n}: {why}")
        for r in self.failures:
            cats = sorted({c for c, _ in r.failures})
            lines.append(
                f"  #{r.index} [{', '.join(cats)}] {r.program.label}: {r.failures[0][1][:160]}"
            )
            if r.repro:
                lines.append(f"      repro: {r.repro}")
        return "\n".join(lines)


@contextlib.contextmanager
def _global_constants_only():
    """Hypothesis mixes constants found in the local modules of ``sys.modules`` into its
    draws, so one seed would draw different programs depending on what happens to be
    imported (the CLI, pytest running one file or the whole suite): draw with its global
    constants only.  (Private API: without it, draws are as hypothesis makes them.)"""
    try:
        from hypothesis.internal.conjecture import providers as P

        saved, empty = P._get_local_constants, P.Constants()
        P.CONSTANTS_CACHE.cache.clear()
    except (ImportError, AttributeError, TypeError):
        yield
        return
    P._get_local_constants = lambda: empty
    try:
        yield
    finally:
        P._get_local_constants = saved
        P.CONSTANTS_CACHE.cache.clear()


def draw_programs(
    examples: int, seed: int, kinds: list[str] | None = None, device: str = "cpu"
) -> list[Program]:
    """``examples`` distinct programs, reproducibly from ``seed`` (hypothesis repeats and
    mutates examples; duplicates are dropped, drawing up to 4x as many)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list[Program] = []
    seen: set[str] = set()

    @hseed(seed)
    @settings(
        max_examples=4 * examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(grammar.programs(kinds, device))
    def collect(p):
        key = repr(sorted(p.choices.items()))
        if key not in seen and len(out) < examples:
            seen.add(key)
            out.append(p)

    with _global_constants_only():
        collect()
    return out[:examples]


def load(program: Program, name: str = "fuzz_program") -> dict:
    """Exec the program's source (registered with linecache, so tracebacks show it)."""
    fname = f"<attnfx-fuzz {name} {abs(hash(program.source)):x}>"
    linecache.cache[fname] = (len(program.source), None, program.source.splitlines(True), fname)
    ns: dict = {"__name__": name}
    exec(compile(program.source, fname, "exec"), ns)
    return ns


def check(
    program: Program, *, options: dict, device: str = "cpu", exact_backend: str | None = None
):
    from attnfx.fuzz.harness import check_program

    ns = load(program)
    exact = exact_backend or (
        "aot_eager" if options.get("inner", "inductor") == "eager" else "inductor"
    )
    try:
        return check_program(ns, options=options, device=device, exact_backend=exact)
    except Exception as e:  # noqa: BLE001 - the harness itself failed: report, do not crash
        return [("uncounted exception", f"the check raised {type(e).__name__}: {e}")], {"time": 0.0}


def shrink(
    program: Program, categories: set[str], run: Callable[[Program], list], *, budget: int = 40
) -> Program:
    """Greedy: try each choice at its simpler values; keep a change while a failure of one
    of ``categories`` persists.  At most ``budget`` checks."""
    g = grammar.SITE_GRAMMARS[program.kind]
    best, tries = program, 0
    improved = True
    while improved and tries < budget:
        improved = False
        for key, values in g.simpler.items():
            cur = best.choices.get(key)
            stop = values.index(cur) if cur in values else len(values)
            for v in values[:stop]:
                cand = grammar.normalize({**best.choices, key: v})
                if cand == best.choices:
                    continue
                if tries >= budget:
                    return best
                tries += 1
                p = grammar.render(cand)
                if any(c in categories for c, _ in run(p)):
                    best, improved = p, True
                    break
    return best


def _harness_source() -> str:
    from attnfx.fuzz import harness

    src = inspect.getsource(harness)
    return src.replace("from __future__ import annotations\n", "")


def repro_script(
    program: Program,
    failures: list[tuple[str, str]],
    *,
    seed: int,
    index: int,
    options: dict,
    device: str,
    plant: str | None,
    original: Program | None = None,
) -> str:
    cats = sorted({c for c, _ in failures})
    cmd = f"attnfx fuzz --seed {seed} ... (example {index})" + (
        f" --plant {plant}" if plant else ""
    )
    msgs = "\n".join(f"    [{c}] {m}" for c, m in failures)
    orig = ""
    if original is not None and original.choices != program.choices:
        diff = {
            k: original.choices[k]
            for k in original.choices
            if original.choices[k] != program.choices.get(k)
        }
        orig = f"\nMinimized; the generated program differed in: {diff}\n"
    head = f'''#!/usr/bin/env python3
"""attnfx fuzz repro: {", ".join(cats)}.

Found by `{cmd}`; label {program.label}, lane {program.lane}.
{orig}
Failing checks when found:
{msgs}

Run: python3 THIS_FILE   (exit status 1 while the failure reproduces; plain PyTorch + attnfx)
Set ATTNFX_FUZZ_PLANT="" to run without the planted bug (when one is named below).
"""
'''
    tail = f"""

OPTIONS = {options!r}
DEVICE = {device!r}
PLANT = {plant!r}  # a planted bug (attnfx/fuzz/plant.py) applied before compiling
FOUND = {cats!r}

if __name__ == "__main__":
    import os
    import sys

    plant = os.environ.get("ATTNFX_FUZZ_PLANT", PLANT)
    if plant:
        from attnfx.fuzz.plant import apply

        apply(plant)
    failures, stats = check_program(globals(), options=OPTIONS, device=DEVICE)
    for category, message in failures:
        print(f"FAIL [{{category}}] {{message}}")
    print(f"stats: {{stats}}")
    if failures:
        sys.exit(1)
    print("OK: no failure reproduced")
"""
    return (
        head
        + program.source
        + "\n\n# ---- the checks (attnfx/fuzz/harness.py) ----\n"
        + _harness_source()
        + tail
    )


def fuzz(
    examples: int = 100,
    seed: int = 0,
    *,
    kinds: list[str] | None = None,
    device: str = "cpu",
    options: dict | None = None,
    out: str | None = None,
    plant: str | None = None,
    minimize: bool = True,
    shrink_budget: int = 30,
    progress: Callable[[int, int, int, float], None] | None = None,
    stop_after: int | None = None,
) -> Summary:
    """Generate ``examples`` programs from ``seed``, check each; shrink and write a repro
    for each failure (when ``out`` is given).  ``stop_after``: stop after that many
    failing programs (planted-bug hunting)."""
    import logging

    from attnfx.fuzz import plant as plant_mod

    logging.getLogger("attnfx").setLevel(logging.ERROR)  # kept-site warnings are expected
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options or {})
    plant_mod.apply(plant)
    t0 = time.perf_counter()
    programs = draw_programs(examples, seed, kinds, device)
    results: list[Result] = []
    n_fail = 0
    for i, p in enumerate(programs):
        failures, stats = check(p, options=opts, device=device)
        r = Result(i, p, failures, stats)
        results.append(r)
        if failures:
            n_fail += 1
            if out is not None:
                cats = {c for c, _ in failures}
                small = p
                ropts = dict(opts)
                if "mismatch" in cats and opts.get("verify", "first") == "first":
                    # verify="first" skips a spec already verified (at this site) by an earlier
                    # program of this run; a fresh process would verify it: reproduce with "off".
                    ropts["verify"] = "off"
                if minimize:
                    small = shrink(
                        p,
                        cats,
                        lambda q, o=ropts: check(q, options=o, device=device)[0],
                        budget=shrink_budget,
                    )
                    f2, _ = check(small, options=ropts, device=device)
                    failures_small = f2 or failures
                else:
                    failures_small = failures
                os.makedirs(out, exist_ok=True)
                path = os.path.join(
                    out, f"repro_seed{seed}_{i:04d}_{sorted(cats)[0].replace(' ', '_')}.py"
                )
                with open(path, "w") as f:
                    f.write(
                        repro_script(
                            small,
                            failures_small,
                            seed=seed,
                            index=i,
                            options=ropts,
                            device=device,
                            plant=plant,
                            original=p,
                        )
                    )
                r.repro, r.shrunk = path, small
        if progress:
            progress(i + 1, len(programs), n_fail, time.perf_counter() - t0)
        if stop_after is not None and n_fail >= stop_after:
            break
    return Summary(seed, results, time.perf_counter() - t0, opts, plant)


def progress_bar(done: int, total: int, failed: int, elapsed: float, stream=None) -> None:
    """Plain-text progress on stderr (``\\r`` updates)."""
    stream = stream or sys.stderr
    width = 30
    filled = int(width * done / max(1, total))
    eta = elapsed / done * (total - done) if done else 0.0
    stream.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  failing {failed}  {elapsed:6.1f}s  eta {eta:5.0f}s"
    )
    if done == total:
        stream.write("\n")
    stream.flush()
