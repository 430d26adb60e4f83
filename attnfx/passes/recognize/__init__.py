"""One recognizer per attention variant.

Each module exposes ``KIND``, ``is_anchor(node)`` and ``match(node) -> Site`` (raising
``Refusal`` or ``NoMatch``).  ``RECOGNIZERS`` is tried in order on every node.
"""

from attnfx.passes.recognize import sigmoid, softmax

# Temperature-scaled attention shares the softmax anchor (see recognize/temperature.py).
RECOGNIZERS = (softmax, sigmoid)

__all__ = ["RECOGNIZERS"]
