"""Plain-PyTorch reference modules for the attention variants attnfx compiles.

Each is written the way a researcher would write it, with no attnfx calls: the backend
must find and rewrite them like any other model's attention.
"""

from attnfx.nn.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from attnfx.nn.selective import SelectiveAttention
from attnfx.nn.sigmoid import SigmoidAttention

__all__ = [
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "SelectiveAttention",
    "SigmoidAttention",
]
