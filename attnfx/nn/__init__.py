"""Plain-PyTorch reference modules for the attention variants attnfx compiles.

Each is written the way a researcher would write it, with no attnfx calls: the backend
must find and rewrite them like any other model's attention.  The modules exported here
are the ``reference`` of each record of the variant registry (``attnfx.variants``).
"""

from attnfx.variants import VARIANTS


def _references() -> dict[str, type]:
    refs = (v.load("reference") for v in VARIANTS if v.reference is not None)
    return {cls.__name__: cls for cls in refs}


globals().update(_references())
# The neighborhood record names the 1-D module; its 2-D and 3-D siblings come with it.
from attnfx.nn.neighborhood import NeighborhoodAttention2D as NeighborhoodAttention2D  # noqa: E402
from attnfx.nn.neighborhood import NeighborhoodAttention3D as NeighborhoodAttention3D  # noqa: E402

__all__ = sorted({*_references(), "NeighborhoodAttention2D", "NeighborhoodAttention3D"})
