"""The online model: the description's pyAT lattice set from live readbacks through calibrations.

ORM (all four blocks and the RF column), optics, dispersion, tunes and chromaticity and their
responses, all at the fixed RF frequency; and the fast closed-orbit solver the twin shares.
Never the twin's truth.
"""

from ._model import OnlineModel, Optics, UnstableMotion
from ._orbit import (
    ClosedOrbitSolver,
    Linearization,
    NoClosedOrbit,
    dct_for_frequency,
    frequency_for_dct,
)
from ._orm import FieldDrive, OrbitResponse, brute_force_orm, linear_orm

__all__ = [
    "ClosedOrbitSolver",
    "FieldDrive",
    "Linearization",
    "NoClosedOrbit",
    "OnlineModel",
    "Optics",
    "OrbitResponse",
    "UnstableMotion",
    "brute_force_orm",
    "dct_for_frequency",
    "frequency_for_dct",
    "linear_orm",
]
