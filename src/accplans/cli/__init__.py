"""The ``accplans`` command line (wiring only).

``accplans twin serve``, ``accplans tiled serve``, ``accplans demo``, ``accplans describe``.
"""

from ._main import main

__all__ = ["main"]
