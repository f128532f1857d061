"""The online model: the description's pyAT lattice set from live readbacks through calibrations.

ORM (all four blocks and the RF column), optics, dispersion, tunes and chromaticity and their
responses, all at the fixed RF frequency; and the fast closed-orbit solver the twin shares.
Never the twin's truth.
"""

from ._bumps import BumpResponse, bump_point, bump_response, nearest_bump_correctors
from ._c_minus import (
    c_minus_response,
    crossing_shift,
    tune_split_direction,
    uncoupled_distance,
)
from ._coupling import (
    CouplingResponse,
    coupling_response,
    model_c_minus,
    one_turn_matrix,
    skew_element_response,
)
from ._loco import (
    GradientParameter,
    LocoModel,
    gradient_correction,
    gradient_parameters,
    optics_correction,
    orm_jacobian,
    run_loco,
)
from ._model import OnlineModel, Optics, UnstableMotion
from ._orbit import (
    ClosedOrbitSolver,
    Linearization,
    NoClosedOrbit,
    dct_for_frequency,
    frequency_for_dct,
)
from ._orm import FieldDrive, OrbitResponse, brute_force_orm, linear_orm
from ._phase import (
    PhaseFit,
    PhaseModel,
    fit_coupled_phase_model,
    fit_phase_model,
    phase_correction,
)
from ._response import plane_response_blocks
from ._strengths import LatticeStrengths, strengths_from_lattice

__all__ = [
    "c_minus_response",
    "crossing_shift",
    "tune_split_direction",
    "uncoupled_distance",
    "CouplingResponse",
    "coupling_response",
    "skew_element_response",
    "model_c_minus",
    "one_turn_matrix",
    "BumpResponse",
    "bump_point",
    "bump_response",
    "nearest_bump_correctors",
    "ClosedOrbitSolver",
    "FieldDrive",
    "GradientParameter",
    "LatticeStrengths",
    "Linearization",
    "LocoModel",
    "NoClosedOrbit",
    "OnlineModel",
    "Optics",
    "OrbitResponse",
    "PhaseFit",
    "PhaseModel",
    "UnstableMotion",
    "brute_force_orm",
    "dct_for_frequency",
    "fit_coupled_phase_model",
    "fit_phase_model",
    "frequency_for_dct",
    "gradient_correction",
    "gradient_parameters",
    "linear_orm",
    "optics_correction",
    "phase_correction",
    "orm_jacobian",
    "run_loco",
    "plane_response_blocks",
    "strengths_from_lattice",
]
