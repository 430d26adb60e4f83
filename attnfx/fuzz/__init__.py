"""Fuzz-testing the rewrites: a grammar of attention programs with labels
(``grammar``, one site grammar per kind), the per-program checks (``harness``), the
loop with shrinking and repro scripts (``runner``), and planted bugs (``plant``).

    attnfx fuzz --examples 300 --seed 1 [--kind softmax,sigmoid,temperature] [--out DIR]
"""

from attnfx.fuzz.grammar import SITE_GRAMMARS, Program, programs, register, render
from attnfx.fuzz.runner import Summary, fuzz

__all__ = ["SITE_GRAMMARS", "Program", "Summary", "fuzz", "programs", "register", "render"]
