"""Pure numerics of accelerator physics: no pyAT, no I/O, SI units."""

from ._orm import chi2_per_dof, orbit_statistics, orm_from_bipolar, orm_relative_difference

__all__ = ["chi2_per_dof", "orbit_statistics", "orm_from_bipolar", "orm_relative_difference"]
