"""``attnfx explain FILE.py``, ``attnfx fuzz``, ``attnfx convert``, ``attnfx --version``.

A usage error (a missing file, a bad option value, no CUDA for ``--device cuda``) is one
line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints the usage block first; one line says the same and fits a log
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _explain(args) -> int:
    path = args.file
    if not os.path.exists(path):
        raise UsageError(f"no such file: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; expected a Python file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e

    from attnfx._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import attnfx

    ns = runpy.run_path(path, run_name="__attnfx_explain__")
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

    import torch

    from attnfx._compat import ensure_torchvision_importable

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda)")
    ensure_torchvision_importable()
    try:
        from attnfx.fuzz import grammar
        from attnfx.fuzz.runner import fuzz, progress_bar
    except ModuleNotFoundError as e:
        raise UsageError(f"attnfx fuzz needs {e.name} (pip install {e.name})") from e

    options = {"inner": args.inner}
    if args.verify:
        options["verify"] = args.verify
    if args.plant and not args.verify:
        options["verify"] = "off"  # the runtime verifier would hide the planted bug
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()] if args.kind else None
    if args.kind is not None and not kinds:
        raise UsageError(f"--kind {args.kind!r}: no kind given")
    try:
        grammar.grammars(kinds)
    except ValueError as e:
        raise UsageError(f"--kind {args.kind}: {e}") from e
    from attnfx.fuzz import frame

    frame.INTERP_EVERY = args.interp_every  # read by each program's draw
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


def _sizes(text: str) -> int | dict[int, int]:
    """``7`` (every converted layer) or ``0:7,1:9`` (per layer)."""
    try:
        if ":" not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return n
        out = {}
        for part in text.split(","):
            layer, _, size = part.partition(":")
            out[int(layer)] = int(size)
            if out[int(layer)] < 1:
                raise ValueError
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size or layer:size pairs (e.g. 7 or 0:7,1:9), got {text!r}"
        ) from None


def _convert(args) -> int:
    from attnfx.convert import ConvertError
    from attnfx.convert.core import convert

    options = {}
    for name in ("kv_heads", "window", "kernel_size", "clusters", "layerscale"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.qk_norm:
        options["qk_norm"] = True
    try:
        report = convert(
            args.src,
            args.to,
            args.out,
            layers=args.layers,
            seed=args.seed,
            calib=args.calib,
            config=args.config,
            force=args.force,
            dry_run=args.dry_run,
            evaluate=not args.no_eval,
            progress=True if args.progress else None,
            **options,
        )
    except ConvertError as e:
        raise UsageError(str(e)) from e
    except OSError as e:  # disk full, permissions: nothing was left behind (atomic output)
        raise UsageError(f"{e.strerror or e}: {e.filename or args.out}") from e
    print(report.to_json() if args.json else report)
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from attnfx import __version__

    p = _Parser(prog="attnfx", description="attention compiler for torch.compile")
    p.add_argument("--version", action="version", version=f"attnfx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    f.add_argument("--examples", type=_positive_int, default=100, help="programs to generate")
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
    f.add_argument(
        "--interp-every",
        type=_positive_int,
        default=10,
        metavar="N",
        help="on CPU, one program in N runs its sites through the generated kernels under "
        "Triton's interpreter, as a GPU runs them (1: every program; slower, and it finds "
        "what the op's CPU path hides)",
    )
    f.add_argument("--no-shrink", action="store_true", help="write failures unminimized")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_fuzz)
    c = sub.add_parser(
        "convert",
        help="convert a checkpoint to another attention variant (writes a model directory)",
    )
    c.add_argument("src", help="a transformers model directory, a .safetensors or a .pt state dict")
    c.add_argument(
        "--to",
        required=True,
        choices=("sigmoid", "selective", "gqa", "neighborhood", "window", "routed"),
    )
    c.add_argument("--out", default=None, help="the directory to write (refused if it exists)")
    c.add_argument("--layers", default=None, help="layers to convert: all (default), 0-3,6, -1")
    c.add_argument("--seed", type=int, default=0, help="seeds the synthetic batch and k-means")
    c.add_argument("--calib", default=None, help="calibration inputs (.pt/.safetensors, or ids)")
    c.add_argument("--config", default=None, help="config.json for a single-file SRC")
    c.add_argument("--force", action="store_true", help="replace an existing --out")
    c.add_argument("--dry-run", action="store_true", help="report the plan, write nothing")
    c.add_argument("--no-eval", action="store_true", help="skip loading and measuring drift")
    c.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    g = c.add_argument_group("variant options")
    g.add_argument("--kv-heads", type=_positive_int, default=None, help="gqa: K/V heads to keep")
    g.add_argument("--window", type=_sizes, default=None, help="window: W or layer:W,...")
    g.add_argument(
        "--kernel-size", type=_sizes, default=None, help="neighborhood: K or layer:K,..."
    )
    g.add_argument("--qk-norm", action="store_true", help="sigmoid: add QK RMS norms")
    g.add_argument("--layerscale", type=float, default=None, help="sigmoid: LayerScale init")
    g.add_argument("--clusters", type=_positive_int, default=None, help="routed: centroids")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"attnfx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
