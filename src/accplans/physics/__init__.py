"""Pure numerics of accelerator physics: no pyAT, no I/O, SI units."""

from ._bumps import BumpError, BumpSolution, bump_kicks, bump_span, nearest_correctors
from ._correction import CorrectionResult, correction_matrix, micado, solve_correction
from ._dispersion import (
    DispersionFit,
    delta_for_frequency_step,
    dispersion_standard_error,
    fit_dispersion,
    frequency_step_for_delta,
)
from ._feedback import FeedbackGains, FeedbackStep, OrbitFeedbackController
from ._fofb import (
    DisturbanceSpectrum,
    FofbLoop,
    FofbPlane,
    FofbUnstable,
    LoopMargins,
    design_fofb_plane,
    identify_sensitivity,
    measured_attenuation,
    realize_disturbance,
    simulate_fofb,
)
from ._loco import LocoFit, LocoModelData, compensate_gradients, fit_loco, loco_forward
from ._orm import chi2_per_dof, orbit_statistics, orm_from_bipolar, orm_relative_difference

__all__ = [
    "BumpError",
    "BumpSolution",
    "bump_kicks",
    "bump_span",
    "nearest_correctors",
    "CorrectionResult",
    "DisturbanceSpectrum",
    "FofbLoop",
    "FofbPlane",
    "FofbUnstable",
    "LoopMargins",
    "design_fofb_plane",
    "identify_sensitivity",
    "measured_attenuation",
    "realize_disturbance",
    "simulate_fofb",
    "DispersionFit",
    "FeedbackGains",
    "FeedbackStep",
    "LocoFit",
    "LocoModelData",
    "OrbitFeedbackController",
    "chi2_per_dof",
    "compensate_gradients",
    "correction_matrix",
    "fit_loco",
    "loco_forward",
    "delta_for_frequency_step",
    "dispersion_standard_error",
    "fit_dispersion",
    "frequency_step_for_delta",
    "micado",
    "orbit_statistics",
    "orm_from_bipolar",
    "orm_relative_difference",
    "solve_correction",
]
