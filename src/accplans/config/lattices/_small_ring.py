"""A small storage ring for fast tests: 8 FODO cells, BPMs, correctors, sextupoles, a cavity.

Written for accplans (pyAT's ``dba.mat`` has no BPMs or correctors). It deliberately mixes the
ways lattices mark diagnostics and correctors, so ``from_lattice`` selectors are exercised:
BPMs are ``Monitor`` elements, some correctors are ``at.Corrector`` elements and the others are
``KickAngle`` windings on the focusing sextupoles (which also carry a skew-quadrupole winding).
1.5 GeV, 8 cells of 6.6 m (52.8 m), tunes about 2.41 / 2.66, chromaticity corrected to ~+1.
"""

from __future__ import annotations

import at
import numpy as np

__all__ = ["small_ring"]

_NCELL = 8
_ENERGY = 1.5e9
_HARMONIC = 88


def small_ring() -> at.Lattice:
    """Build the small test ring (a fresh lattice each call)."""
    theta = 2 * np.pi / _NCELL / 2  # two dipoles per cell
    cell = [
        at.Quadrupole("QF", 0.15, 1.70),
        at.Drift("D1", 0.15),
        at.Sextupole("SF", 0.1, 0.0, PolynomA=[0, 0, 0], KickAngle=[0.0, 0.0]),
        at.Drift("D2", 0.15),
        at.Monitor("BPM"),
        at.Drift("D3", 0.2),
        at.Dipole("B", 1.8, theta, EntranceAngle=theta / 2, ExitAngle=theta / 2),
        at.Drift("D4", 0.2),
        at.Corrector("COR", 0.1, [0.0, 0.0]),
        at.Drift("D5", 0.2),
        at.Sextupole("SD", 0.1, 0.0),
        at.Drift("D6", 0.15),
        at.Quadrupole("QD", 0.3, -1.55),
        at.Drift("D7", 0.15),
        at.Monitor("BPM"),
        at.Drift("D8", 0.35),
        at.Dipole("B", 1.8, theta, EntranceAngle=theta / 2, ExitAngle=theta / 2),
        at.Drift("D9", 0.2),
        at.Corrector("COR", 0.1, [0.0, 0.0]),
        at.Drift("D10", 0.25),
        at.Quadrupole("QF", 0.15, 1.70),
    ]
    elements: list = [at.RFCavity("RFC", 0.0, 0.5e6, 0.0, _HARMONIC, _ENERGY)]
    for _ in range(_NCELL):
        elements += [e.deepcopy() for e in cell]
    ring = at.Lattice(elements, name="small", energy=_ENERGY, periodicity=1)
    length = ring.circumference
    cav = ring[0]
    cav.Frequency = at.constants.clight * _HARMONIC / length
    ring.disable_6d()
    _correct_chromaticity(ring)
    return ring


def _correct_chromaticity(ring: at.Lattice, target: float = 1.0) -> None:
    """Set SF/SD so that both chromaticities are ``target`` (unnormalized: dQ / dp)."""
    sf = ring.get_uint32_index("SF")
    sd = ring.get_uint32_index("SD")

    def chrom(k):
        for i in sf:
            ring[i].PolynomB[2] = k[0]
        for i in sd:
            ring[i].PolynomB[2] = k[1]
        return np.asarray(ring.get_chrom())[:2]

    k = np.zeros(2)
    for _ in range(4):
        c0 = chrom(k)
        jac = np.empty((2, 2))
        for j in range(2):
            dk = np.zeros(2)
            dk[j] = 1.0
            jac[:, j] = chrom(k + dk) - c0
        k = k + np.linalg.solve(jac, target - c0)
    chrom(k)
