"""``attnfx explain FILE.py`` (and, as they land, ``convert``, ``fuzz``, ``bench``)."""

from __future__ import annotations

import argparse
import json
import runpy
import sys


def _explain(args) -> int:
    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import attnfx

    ns = runpy.run_path(args.file, run_name="__attnfx_explain__")
    if "model" not in ns or "example_inputs" not in ns:
        print(f"{args.file} must define `model` and `example_inputs`", file=sys.stderr)
        return 2
    inputs = ns["example_inputs"]
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    kwargs = ns.get("example_kwargs", {})
    report = attnfx.explain(ns["model"], *inputs, **kwargs)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    return 0


def _fuzz(args) -> int:
    import time

    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from attnfx.fuzz.runner import fuzz, progress_bar

    options = {"inner": args.inner}
    if args.verify:
        options["verify"] = args.verify
    if args.plant and not args.verify:
        options["verify"] = "off"  # the runtime verifier would hide the planted bug
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()] if args.kind else None
    t0 = time.perf_counter()
    summary = fuzz(
        args.examples,
        args.seed,
        kinds=kinds,
        device=args.device,
        options=options,
        out=args.out,
        plant=args.plant,
        minimize=not args.no_shrink,
        progress=None if args.quiet else progress_bar,
    )
    print(summary.table())
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    return 0 if summary.ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnfx", description="attention compiler for torch.compile")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "explain", help="report every attention site of a script's `model` on its `example_inputs`"
    )
    e.add_argument(
        "file",
        help="a Python file defining `model` and `example_inputs` (and optionally `example_kwargs`)",
    )
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_explain)
    f = sub.add_parser(
        "fuzz", help="fuzz the rewrites with random attention programs (exit 1 on any failure)"
    )
    f.add_argument("--examples", type=int, default=100, help="programs to generate")
    f.add_argument("--seed", type=int, default=0, help="the same seed draws the same programs")
    f.add_argument("--kind", default=None, help="comma-separated site kinds (default: all)")
    f.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    f.add_argument("--out", default=None, help="directory for one repro script per failure")
    f.add_argument("--inner", choices=("eager", "inductor"), default="eager")
    f.add_argument("--verify", choices=("first", "always", "off"), default=None)
    f.add_argument(
        "--plant",
        choices=("drop-scale", "accept-query-softmax", "sigmoid-bias"),
        default=None,
        help="plant a bug (test tooling; implies --verify off)",
    )
    f.add_argument("--no-shrink", action="store_true", help="write failures unminimized")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_fuzz)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
