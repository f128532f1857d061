"""Per-plane orbit response blocks for feedbacks (a worker-friendly function)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from accplans.config import MachineDescription

from ._model import OnlineModel

__all__ = ["plane_response_blocks"]


def plane_response_blocks(
    description: MachineDescription,
    bpms: Sequence[str],
    hcorr: Sequence[str],
    vcorr: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal blocks of the model ORM at design setpoints and the fixed RF frequency.

    Args:
        description: the machine description.
        bpms: BPM names (rows, in this order).
        hcorr: horizontal corrector names (columns of the x block).
        vcorr: vertical corrector names (columns of the y block).

    Returns:
        ``(Rx, Ry)``: (nbpm, nh) horizontal response to ``hcorr`` and (nbpm, nv) vertical
        response to ``vcorr`` [m/rad].
    """
    matrix = OnlineModel(description).orm(list(bpms), [*hcorr, *vcorr], rf=False).matrix
    n, nh = len(bpms), len(hcorr)
    return matrix[:n, :nh], matrix[n:, nh:]
