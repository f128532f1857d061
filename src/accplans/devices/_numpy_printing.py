"""Keep numpy's array printing cheap in the RunEngine's process.

ophyd-async 0.21 writes every new value of a signal into its debug log messages with f-strings
(``_signal.py``: ``log.debug(f"... changed from {old} to {new}")``), which are formatted even
when debug logging is off. numpy prints a 300-element array in full (its default threshold is
1000 elements) in about 3 ms, and it does so three times per family put and twice per array
monitor update: measured on the EBS twin, a corrector family put went from 24 ms to 12 ms and
an orbit frame from 5.5 ms to 1.6 ms with summarised printing. Importing ``accplans.devices``
therefore lowers numpy's print threshold to :data:`THRESHOLD` elements (it never raises a lower
one); arrays longer than that print as ``[a b c ... x y z]``. Set
``numpy.set_printoptions(threshold=...)`` after the import to choose otherwise.
"""

from __future__ import annotations

import numpy as np

#: Arrays longer than this print summarised.
THRESHOLD = 64


def summarise_long_arrays() -> None:
    """Lower numpy's print threshold to :data:`THRESHOLD` (never raise it)."""
    if np.get_printoptions()["threshold"] > THRESHOLD:
        np.set_printoptions(threshold=THRESHOLD)
