"""attnfx: a torch.compile backend that finds attention in any model, proves what it
computes, and runs it on a Triton kernel generated for exactly that computation.

    model = torch.compile(model, backend="attnfx")
    print(attnfx.explain(model, *example_inputs))
"""

import importlib

# The documented subpackages are reachable after a plain ``import attnfx``: ``nn`` and
# ``testing`` are small (torch only) and imported here; ``codegen`` (Triton) and ``fuzz``
# (hypothesis) load on first use.
from attnfx import nn as nn
from attnfx import ops as ops
from attnfx import testing as testing
from attnfx.backend import Options, VerificationError, attnfx_backend, explain
from attnfx.ops import attention
from attnfx.report import Report, SiteRecord, counters, reset_counters
from attnfx.spec import AttentionSpec, ScoreOp

__version__ = "0.1.0"

_LAZY = ("codegen", "fuzz", "cli", "convert")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"attnfx.{name}")
    if name == "from_pretrained":  # a converted checkpoint (``attnfx convert``)
        return importlib.import_module("attnfx.convert").from_pretrained
    raise AttributeError(f"module 'attnfx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"from_pretrained"})


__all__ = [
    "AttentionSpec",
    "Options",
    "Report",
    "ScoreOp",
    "SiteRecord",
    "VerificationError",
    "attention",
    "attnfx_backend",
    "counters",
    "explain",
    "reset_counters",
]
