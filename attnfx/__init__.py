"""attnfx: a torch.compile backend that finds attention in any model, proves what it
computes, and runs it on a Triton kernel generated for exactly that computation.

    model = torch.compile(model, backend="attnfx")
    print(attnfx.explain(model, *example_inputs))
"""

from attnfx.backend import Options, VerificationError, attnfx_backend, explain
from attnfx.ops import attention
from attnfx.report import Report, SiteRecord, counters, reset_counters
from attnfx.spec import AttentionSpec, ScoreOp

__version__ = "0.1.0"

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
