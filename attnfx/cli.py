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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnfx", description="attention compiler for torch.compile")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("explain", help="report every attention site of a script's `model` on its `example_inputs`")
    e.add_argument("file", help="a Python file defining `model` and `example_inputs` (and optionally `example_kwargs`)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_explain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
