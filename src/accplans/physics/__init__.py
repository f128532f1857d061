"""Pure numerics of accelerator physics: no pyAT, no I/O, SI units."""

from ._correction import CorrectionResult, correction_matrix, micado, solve_correction
from ._orm import chi2_per_dof, orbit_statistics, orm_from_bipolar, orm_relative_difference

__all__ = [
    "CorrectionResult",
    "chi2_per_dof",
    "correction_matrix",
    "micado",
    "orbit_statistics",
    "orm_from_bipolar",
    "orm_relative_difference",
    "solve_correction",
]
